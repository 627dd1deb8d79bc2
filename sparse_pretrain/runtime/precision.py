"""A run's numeric precision: the one place that decides it, for every recipe (pre-training,
fine-tuning, QAT).

A recipe asks for ``auto | bf16 | fp16 | fp32`` (:data:`PRECISIONS`); :func:`resolve_precision`
turns the request into what this process's device can run, or one error naming the recipe key:

- ``auto``: bf16 where the device computes it natively (a CUDA GPU for which
  ``torch.cuda.is_bf16_supported(including_emulation=False)``: Ampere and later), else fp32. Never
  fp16: fp16 needs loss scaling and overflows where bf16 does not, so it is only ever asked for.
- ``bf16``: mixed precision with bfloat16 autocast: on a CUDA GPU that supports it (natively or
  emulated), and on CPU (torch's CPU autocast runs bf16; slower than fp32 on CPUs without bf16
  instructions, but the same numerics as on a GPU, so a GPU run's precision can be checked on CPU).
- ``fp16``: mixed precision with float16 autocast and loss scaling: CUDA only.
- ``fp32``: no autocast, strict IEEE fp32 (TF32 off; see :func:`enable_tf32`).

Mixed precision here is autocast: the weights, their gradients and the optimizer state stay fp32;
the matmuls run in 16 bits (:func:`autocast`). torch and the standard library only: every stage and
the GPU check scripts import it.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Union

import torch

#: what a recipe's precision key accepts
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
#: what :func:`resolve_precision` returns: a precision that runs
RESOLVED = ("bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(requested: str, device: Union[str, torch.device], key: str = "training.precision",
                      error: type[Exception] = ValueError) -> str:
    """``requested`` (one of :data:`PRECISIONS`) as the precision this process runs on ``device``:
    ``"bf16"``, ``"fp16"`` or ``"fp32"``; ``error`` (a message starting with ``key``) when the device
    cannot run it."""
    if requested not in PRECISIONS:
        raise error(f"{key}: must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    kind = torch.device(device).type
    cuda = kind == "cuda" and torch.cuda.is_available()
    if requested == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if requested == "fp16" and not cuda:
        raise error(f"{key}: fp16 needs a CUDA GPU (loss-scaled float16 autocast), and this process runs on "
                    f"{kind}; use bf16 (CPU autocast runs it), fp32 or auto")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise error(f"{key}: bf16: this GPU ({torch.cuda.get_device_name()}) cannot compute in bfloat16; "
                    f"use fp16, fp32 or auto")
    return requested


def enable_tf32(precision: str) -> bool:
    """Set TF32 for fp32 matmuls and cuDNN convolutions on CUDA to follow ``precision`` (resolved:
    bf16, fp16 or fp32); returns whether TF32 is now on.

    The policy: TF32 on under mixed precision (bf16/fp16), off for fp32. Under autocast, what still
    runs in fp32 (ops autocast leaves alone, code outside it) is the leftover of a run that already
    trades precision for speed, and TF32's 10-bit mantissa is finer than bf16's 7. A run that asks for
    fp32 asks for IEEE fp32 (reproducing a CPU run, or QAT, whose fake-quantized GEMMs must stay on
    the int8 grid), so TF32 is switched off, also for cuDNN, whose torch default is on.

    Through the long-standing flags ``torch.backends.cuda.matmul.allow_tf32`` and
    ``torch.backends.cudnn.allow_tf32``: they change CUDA alone and leave every reader of either the
    old or the new (``fp32_precision``) API working. ``torch.set_float32_matmul_precision`` would also
    switch oneDNN's CPU matmuls to TF32, and setting the per-backend ``fp32_precision`` attributes
    makes later reads of ``allow_tf32`` and ``get_float32_matmul_precision()`` raise (torch 2.9+)."""
    if precision not in RESOLVED:
        raise ValueError(f"enable_tf32: a resolved precision ({', '.join(RESOLVED)}), got {precision!r}")
    on = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on


def autocast(precision: str, device: Union[str, torch.device]) -> ContextManager:
    """The autocast of ``precision`` (resolved) on ``device``'s type; no autocast for fp32."""
    if precision not in RESOLVED:
        raise ValueError(f"autocast: a resolved precision ({', '.join(RESOLVED)}), got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])
