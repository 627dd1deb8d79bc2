"""Step time of student pruning: what mask maintenance and distillation cost, measured in one run.

Variants, interleaved (A B C A B C ...) on the same DeepSpeed engine so that machine noise hits all:
  dense      student step (forward, backward, ZeRO step), no pruning
  masked     the same with the pruner's masks kept (90% sparse; hooks zero gradients and fp32
             masters inside the optimizer step; the pruner's clock advances)
  masked+kd  the same plus the frozen teacher's forward under inference mode and the KD loss
Ratios: masked/dense = mask maintenance overhead; (masked+kd)/masked = distillation overhead.

CPU (default):  python bench/pretrain_step.py --model minilm --seq 128 --micro 8
GPU (bf16):     python bench/pretrain_step.py --device cuda --bf16 --model bert-base --seq 512 --micro 32 --zero 2
Run it under torchrun for several ranks. ``--device`` defaults to cuda where one is visible, and
``--bf16`` to on with cuda (DeepSpeed's bf16 mixed precision, the teacher in bf16); on CPU fp32.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(model_name: str):
    from transformers import BertConfig, BertForPreTraining
    if model_name == "bert-base":
        config = BertConfig()
    elif model_name == "bert-large":
        config = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    elif model_name == "minilm":
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    else:
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return BertForPreTraining(config), BertForPreTraining(config), config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm", choices=["tiny", "minilm", "bert-base", "bert-large"])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="DeepSpeed bf16 (default: with cuda)")
    args = parser.parse_args()
    if (args.device == "cuda") != torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch.cuda.is_available() is {torch.cuda.is_available()} "
                     "(DeepSpeed picks its accelerator by itself; hide GPUs with CUDA_VISIBLE_DEVICES= for cpu)")

    import deepspeed
    import torch.distributed as dist

    from sparse_pretrain.core.distill import DistillationWeights, pretraining_distillation_loss
    from sparse_pretrain.core.gmp_schedule import GMPSchedule
    from sparse_pretrain.core.masks import find_prunable
    from sparse_pretrain.core.methods import build_method
    from sparse_pretrain.core.pruner import GradualPruner
    from sparse_pretrain.runtime.monitor import flops_per_token, peak_tflops
    from sparse_pretrain.zero.runtime import init_distributed
    from sparse_pretrain.zero.shards import ZeroShards

    init_distributed()
    world = dist.get_world_size()
    cuda = args.device == "cuda"
    bf16 = cuda if args.bf16 is None else args.bf16
    student, teacher, config = build(args.model)
    ds_config = {"train_micro_batch_size_per_gpu": args.micro, "train_batch_size": args.micro * world,
                 "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
                 "zero_optimization": {"stage": args.zero}, "steps_per_print": 10 ** 9}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    teacher.to(engine.device, dtype=torch.bfloat16 if bf16 else torch.float32).eval().requires_grad_(False)
    shards = ZeroShards(engine, find_prunable(engine.module))
    rank, world_sh = shards.shard_world()
    pruner = GradualPruner(shards.params, build_method("unstructured"),
                           GMPSchedule(final_sparsity=0.9, start=0, policy_end=1, end=1, interval=1),
                           all_reduce=shards.all_reduce(), rank=rank, world_size=world_sh)
    pruner.advance()
    pruner.advance()                        # masks at 90%, then frozen: steady-state maintenance cost
    pruner.apply_masks()
    shards.sync_working_copies()

    g = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.randint(1000, config.vocab_size, (args.micro, args.seq), generator=g).to(engine.device)
    labels = torch.where(torch.rand(ids.shape, generator=g).to(engine.device) < 0.15, ids, -100)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "next_sentence_label": torch.zeros(args.micro, dtype=torch.long, device=engine.device)}
    weights = DistillationWeights()

    def step(variant):
        out = engine(**batch)
        loss = out.loss
        if variant == "masked+kd":
            with torch.inference_mode():
                t = teacher(input_ids=ids, attention_mask=batch["attention_mask"])
            loss = pretraining_distillation_loss(weights, out.loss, out.prediction_logits, t.prediction_logits.clone(),
                                                 batch["attention_mask"], labels, out.seq_relationship_logits,
                                                 t.seq_relationship_logits.clone())["loss"]
        engine.backward(loss)
        engine.step()
        if variant != "dense":
            pruner.advance()

    times = {v: [] for v in ("dense", "masked", "masked+kd")}
    for _ in range(args.rounds + 1):
        for variant in times:
            if variant == "dense":
                shards.uninstall()
            elif not shards._hooks:
                shards.install(pruner)
            step(variant)                                  # warm-up of this variant
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(variant)
            if cuda:
                torch.cuda.synchronize()
            times[variant].append((time.perf_counter() - start) / args.steps)
    times = {v: statistics.median(t[1:]) for v, t in times.items()}   # the first round warms up
    if dist.get_rank() == 0:
        tokens = args.micro * args.seq * world
        peak = peak_tflops(None)
        device = torch.cuda.get_device_name() if cuda else "CPU"
        print(f"# {args.model}, seq {args.seq}, micro {args.micro} x {world} ranks, ZeRO-{args.zero}, "
              f"{'bf16' if bf16 else 'fp32'}, {device}, median of {args.rounds} rounds x {args.steps} steps")
        print("| variant | step (ms) | tokens/s | ratio | MFU |")
        print("|---|---|---|---|---|")
        base = {"dense": "dense", "masked": "dense", "masked+kd": "masked"}
        for variant, seconds in times.items():
            fpt = flops_per_token(config, args.seq, variant == "masked+kd")
            mfu = f"{tokens / seconds * fpt / (peak * 1e12 * world):.1%}" if peak else "n/a"
            print(f"| {variant} | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} | "
                  f"{seconds / times[base[variant]]:.3f} vs {base[variant]} | {mfu} |")


if __name__ == "__main__":
    main()
