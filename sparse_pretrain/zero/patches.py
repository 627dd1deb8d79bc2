"""Run-time patches of DeepSpeed: what this project changes in DeepSpeed's behaviour, and why."""
from __future__ import annotations

import os
import sys

import torch


def skip_cpu_shm_build() -> None:
    """On CPU, DeepSpeed's ``init_distributed`` JIT-compiles a shared-memory op (~60 s on 2 cores, and
    again whenever the Python environment moves) that only its inference all-reduce uses; training
    never calls it, so the build is skipped. Nothing to do with CUDA."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.comm.torch  # noqa: F401  (`import a.b.torch as x` would bind the real torch package)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
