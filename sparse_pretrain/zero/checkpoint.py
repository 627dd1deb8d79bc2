"""Checkpoints of a pre-training run: DeepSpeed's own, plus what else the run needs, made atomic.

Layout under ``<output_dir>/checkpoints``::

    step_000200/            engine.save_checkpoint(tag="step_000200"): model, optimizer, LR scheduler
    step_000200/trainer/rank00003.pt   per rank: mask pieces, pruner clock, data position, RNG states
    step_000200/COMPLETE    written by rank 0 after every rank has finished writing
    latest                  the tag of the newest COMPLETE checkpoint (replaced atomically)

``latest`` moves only after ``COMPLETE`` exists, so a run killed while saving resumes from the
previous checkpoint. Mask pieces carry their flat ranges, so the masks load on any world size.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from sparse_pretrain.runtime.atomic import torch_save, write_text
from sparse_pretrain.runtime.pause_points import pause

LATEST = "latest"
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def rng_states() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_tag(root: Path) -> Optional[str]:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (root / tag / COMPLETE).is_file() else None


def save(engine, root: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch_save(trainer_state, root / tag / "trainer" / f"rank{rank:05d}.pt")
    pause("checkpoint", step, root / tag, rank)     # tests: killed here, the checkpoint is incomplete
    dist.barrier()
    if rank == 0:
        write_text(root / tag / COMPLETE, f"{dist.get_world_size()}\n")
        write_text(root / LATEST, tag + "\n")
        for old in sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != tag)[:-max(0, keep - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / tag


def trainer_states(checkpoint: Path) -> list[dict]:
    """Every rank's trainer state saved in ``checkpoint`` (any world size), in rank order."""
    files = sorted((checkpoint / "trainer").glob("rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{checkpoint} has no trainer state")
    return [torch.load(f, weights_only=False) for f in files]


def saved_world_size(checkpoint: Path) -> int:
    return int((checkpoint / COMPLETE).read_text().split()[0])
