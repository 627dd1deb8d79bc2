"""Starting DeepSpeed's distributed runtime the same way on GPUs (NCCL) and CPUs (gloo)."""
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


def init_distributed() -> None:
    """``deepspeed.init_distributed`` with the backend this machine supports (NCCL with CUDA, gloo
    otherwise), under a launcher, as an srun task, or alone, without the CPU shared-memory op's build."""
    import deepspeed

    from sparse_pretrain.runtime.rendezvous import export_torch_env
    export_torch_env()             # a task of `srun python -m sparse_pretrain`: RANK etc. from SLURM's variables
    if "RANK" not in os.environ:   # one process, started without a launcher
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
