"""DeepSpeed's side of a pre-training checkpoint, saved and found by the shared protocol
(:mod:`sparse_pretrain.runtime.checkpoints`: a ``.partial-`` name until every rank has written, then
``step_N`` and ``latest``; a full disk on any rank fails on all with one message).

A checkpoint directory ``<output_dir>/checkpoints/step_00000200`` holds::

    (DeepSpeed's files)      engine.save_checkpoint: model, optimizer, LR scheduler (ZeRO partitions per rank)
    trainer/rank00003.pt     per rank: mask pieces, pruner clock, data position, RNG states, world size, stage
    step.json                the step, written last

DeepSpeed writes into ``<save_dir>/<tag>`` and reads nothing of the tag's name back, so it writes
under the temporary name and loads from the renamed directory. Mask pieces carry their flat ranges,
so the masks load on any world size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from sparse_pretrain.runtime import checkpoints


def save(engine, root: Path, step: int, trainer_state: dict, keep: int, rank: int,
         any_rank: Callable[[int], int], run: Optional[tuple] = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    def write(directory: Path) -> None:
        engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)
    return checkpoints.save(root, step, write, {f"trainer/rank{rank:05d}.pt": trainer_state}, rank=rank,
                            any_rank=any_rank, keep=keep, run=run)


def load(engine, checkpoint: Path) -> None:
    """DeepSpeed's own load, every state bit for bit (the same world size and ZeRO stage only)."""
    engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def fp32_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 weights, consolidated from the ZeRO files of any world size and stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def trainer_states(checkpoint: Path) -> list[dict]:
    """Every rank's trainer state saved in ``checkpoint`` (any world size), in rank order."""
    files = sorted((checkpoint / "trainer").glob("rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{checkpoint} has no trainer state")
    return [torch.load(f, weights_only=False) for f in files]
