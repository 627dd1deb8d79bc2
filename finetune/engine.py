"""The fine-tuning recipe's engine adapter: Accelerate's plain data parallel (DDP, or one process) or
its DeepSpeed plugin, behind one object the loop in finetune/trainer.py calls without asking which.

The adapter owns the masks where this engine keeps its weights (a pattern-lock from the zeros of the
loaded weights, or the gradual pruner ``trainer.pruner_for`` built), their upkeep around each
optimizer step, and saving and loading the training state through the checkpoint protocol both
recipes share (:mod:`sparse_pretrain.runtime.checkpoints`):

- DDP: whole weights in the module on every process. The masks are whole tensors; pruned
  gradients are zeroed before the optimizer step and pruned weights after it.
- DeepSpeed plugin: this rank's ZeRO partitions (:class:`~sparse_pretrain.zero.shards.ZeroShards`).
  The optimizer's step hooks keep the zeros; after a mask update the working copies are refreshed.

A state holds Accelerate's own (model, optimizer, scheduler, RNG: ``save_state``), this rank's masks
(``masks_rank<R>.pt``, pattern-lock) or pruner state (``pruner_rank<R>.pt``: masks and the schedule's
clock), and the recipe's record in step.json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from sparse_pretrain.core.masks import MaskedParameters, find_prunable
from sparse_pretrain.core.pattern_lock import PatternLock
from sparse_pretrain.core.pruner import GradualPruner
from sparse_pretrain.runtime import checkpoints


class DDPAdapter:
    """Plain data parallel (or one process): every process holds the whole weights in its module."""

    def __init__(self, accelerator, model, any_rank: Callable[[int], int]):
        self.accelerator = accelerator
        self.model = model                        # as accelerator.prepare returned it
        self.any_rank = any_rank                  # max of an int over the processes (also a barrier)
        self.masks: Optional[MaskedParameters] = None   # whichever keeps zeros: the lock or the pruner
        self.lock: Optional[PatternLock] = None
        self.pruner: Optional[GradualPruner] = None
        self.shards = None

    # -- the masks, where this engine keeps its weights ---------------------------------------------
    def lock_pattern(self, model, min_sparsity: float) -> PatternLock:
        """Masks from the zeros of ``model``'s loaded weights (the unwrapped model), kept from now on;
        a model less sparse than ``min_sparsity`` is refused."""
        lock = self._pattern_lock(model)
        sparsity = lock.sparsity()["global"]
        if sparsity < min_sparsity:
            raise ValueError(f"model.pattern_lock: the model is {sparsity:.1%} sparse, below model.min_sparsity "
                             f"({min_sparsity:.0%}); pattern-lock needs a sparse pre-trained model (or set "
                             f"model.pattern_lock=false to fine-tune a dense one)")
        self.masks = self.lock = lock
        return lock

    def _pattern_lock(self, model) -> PatternLock:
        return PatternLock.from_model(model)

    def prune_with(self, pruner: GradualPruner, shards=None) -> None:
        """Keep ``pruner``'s masks (``shards``: the ZeRO adapter it was built on, None under DDP)."""
        self.masks = self.pruner = pruner
        self.shards = shards

    # -- around each optimizer step ---------------------------------------------------------------
    def before_step(self) -> None:
        """Between backward and the optimizer step: zero the gradients of pruned weights."""
        if self.masks is not None:
            self.masks.mask_gradients()

    def after_step(self) -> Optional[float]:
        """After the optimizer step: pruned weights back to zero; the pruner first recomputes its masks
        when the schedule says so. Returns the new target sparsity when it did."""
        return self.masks.step() if self.masks is not None else None

    # -- the training state -----------------------------------------------------------------------
    def _masks_file(self) -> str:
        return f"{'pruner' if self.pruner is not None else 'masks'}_rank{self.accelerator.process_index}.pt"

    def save(self, state_dir: Path, step: int, record: Optional[dict] = None, run: Optional[tuple] = None) -> None:
        """Collective: the state of ``step`` under ``state_dir`` (:func:`checkpoints.save`: complete or
        absent; a full disk on any process fails on all with one message)."""
        files = {self._masks_file(): self.masks.state_dict()} if self.masks is not None else {}
        checkpoints.save(state_dir, step, lambda directory: self.accelerator.save_state(str(directory)), files,
                         rank=self.accelerator.process_index, any_rank=self.any_rank, record=record, run=run)

    def load(self, state: Path) -> dict:
        """Load a saved state: weights, optimizer, scheduler, RNG and this rank's masks or pruner state
        (masks, the schedule's clock). Returns the state's record (its step.json)."""
        self.accelerator.load_state(str(state))
        saved = checkpoints.record(state)
        if self.masks is not None:
            self.masks.load_state_dict(torch.load(state / self._masks_file()))
        return saved


class DeepSpeedAdapter(DDPAdapter):
    """Accelerate's DeepSpeed plugin: each rank holds ZeRO partitions of the weights, and the masks of
    its own partitions, kept zero inside the optimizer step by its step hooks."""

    def _pattern_lock(self, model) -> PatternLock:
        from sparse_pretrain.zero.shards import ZeroShards
        shards = ZeroShards.for_parameters(self.model, find_prunable(model))
        lock = PatternLock(shards.params, all_reduce=shards.all_reduce())
        shards.install(lock)
        return lock

    def before_step(self) -> None:
        """Nothing: the optimizer's step pre-hook zeroes the pruned gradients (``ZeroShards.install``)."""

    def after_step(self) -> Optional[float]:
        """The step post-hook zeroed the pruned fp32 masters; the pruner recomputes its masks when due and
        then refreshes the working copies (``ZeroShards.after_step``)."""
        return self.shards.after_step(self.pruner) if self.pruner is not None else None


def adapter_for(accelerator, model, any_rank: Callable[[int], int]) -> DDPAdapter:
    """The adapter of the engine ``accelerator`` runs (``model``: as ``accelerator.prepare`` returned it)."""
    cls = DeepSpeedAdapter if accelerator.state.deepspeed_plugin is not None else DDPAdapter
    return cls(accelerator, model, any_rank)
