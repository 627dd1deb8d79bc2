"""What a pre-training run shows: TensorBoard scalars, a tqdm bar and a log line, on rank 0 only;
and model-FLOPs utilisation when the device's peak is known."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("sparse_pretrain")

#: dense bf16 peak TFLOP/s per device, by a substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


def peak_tflops(configured: Optional[float]) -> Optional[float]:
    if configured:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in name:
                return value
    return None


def flops_per_token(model_config, seq_len: int, with_teacher: bool, projected_fraction: float = 1.0) -> float:
    """Training FLOPs a token costs (6N + attention, Kaplan et al./PaLM appendix), plus a forward
    of an identical teacher (2N + attention/3) when distilling. N counts the encoder's matrices and
    the MLM vocabulary projection, the latter times ``projected_fraction``: the share of positions
    the heads project (1 when every position is; the masked share when only masked rows are), so
    that MFU counts only work done. (Embedding lookups, the head's transform, norms and biases are
    left out, as usual.)"""
    layers = model_config.num_hidden_layers if hasattr(model_config, "num_hidden_layers") else model_config.n_layers
    hidden = model_config.hidden_size if hasattr(model_config, "hidden_size") else model_config.dim
    inner = getattr(model_config, "intermediate_size", None) or getattr(model_config, "hidden_dim", 4 * hidden)
    vocab = model_config.vocab_size
    params = layers * (4 * hidden * hidden + 2 * hidden * inner) + vocab * hidden * projected_fraction
    attention = 12 * layers * hidden * seq_len
    train = 6 * params + attention
    return train + (2 * params + attention / 3 if with_teacher else 0.0)


class Monitor:
    def __init__(self, output_dir: Path, rank: int, total_steps: int, start_step: int):
        self.rank = rank
        self.writer = None
        self.bar = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm
            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                if value is not None:
                    self.writer.add_scalar(tag, value, step)

    def advance(self, steps: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def line(self, text: str) -> None:
        if self.rank == 0:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
