"""Starting DeepSpeed's distributed runtime the same way on GPUs (NCCL) and CPUs (gloo)."""
from __future__ import annotations

import os

import torch

from sparse_pretrain.runtime.rendezvous import export_torch_env, free_port
from sparse_pretrain.zero.patches import skip_cpu_shm_build


def init_distributed() -> None:
    """``deepspeed.init_distributed`` with the backend this machine supports (NCCL with CUDA, gloo
    otherwise), under a launcher, as an srun task, or alone, without the CPU shared-memory op's build."""
    import deepspeed

    export_torch_env()             # a task of `srun python -m sparse_pretrain`: RANK etc. from SLURM's variables
    if "RANK" not in os.environ:   # one process, started without a launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
