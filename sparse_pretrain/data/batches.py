"""The order in which samples are trained on: deterministic, resumable, independent of world size.

For epoch ``e`` the samples are permuted by a ``torch.Generator`` seeded from ``(seed, e)``; global
batch ``b`` is positions ``[b*G, (b+1)*G)`` of that order (a last partial batch is dropped). Rank
``r`` of ``W`` takes the ``r``-th contiguous ``G/W`` of each global batch and splits it into
``G/(W*micro)`` micro-batches (the gradient accumulation steps). The position is the number of
global batches consumed, so a checkpoint taken on 8 GPUs resumes on 4 at the same global sample.

Use as a DataLoader ``batch_sampler`` (it is an endless stream: the trainer decides when to
stop), with the trainer calling :meth:`PretrainingBatches.step` after every optimizer step, like an
LR scheduler; the DataLoader's prefetching runs ahead of the training loop, so the position is
what the trainer has consumed, not what the sampler has handed out::

    batches = PretrainingBatches(len(train), G, micro, world_size, rank, seed)
    batches.load_state_dict(checkpoint["batches"])        # when resuming (any world size)
    loader = DataLoader(PretrainingRows(train), batch_sampler=batches, collate_fn=MaskingCollator(tok),
                        num_workers=2, pin_memory=True)
    for step, micro_batch in zip(range(start, total), chunked(loader, batches.accumulation_steps)):
        ...; optimizer.step(); batches.step()

Re-create the DataLoader iterator after ``load_state_dict``: an iterator starts from the position
at the moment it is created.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Union

import torch

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-mixed non-negative 63-bit seed from integers (splitmix64 chained): the same in every
    process and Python run."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


def epoch_order(dataset_len: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of sample indices for one epoch."""
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x0E))
    return torch.randperm(dataset_len, generator=generator)


class PretrainingBatches:
    """Micro-batches of dataset indices for one rank; see the module docstring.

    ``with_mask_seeds=True`` yields ``(index, mask_seed)`` pairs instead of bare indices, the seed
    being a function of ``(seed, epoch, global position)``: :class:`PretrainingRows` passes it on
    to :class:`~sparse_pretrain.data.collator.MaskingCollator`, which then masks every sample the
    same way whatever the world size, number of workers or resume point.
    """

    def __init__(self, dataset_len: int, global_batch_size: int, micro_batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0, with_mask_seeds: bool = False):
        if micro_batch_size < 1 or world_size < 1 or global_batch_size < 1:
            raise ValueError("global_batch_size, micro_batch_size and world_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if global_batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"global batch size {global_batch_size} is not a multiple of micro batch size "
                f"{micro_batch_size} x world size {world_size} = {micro_batch_size * world_size}")
        if dataset_len < global_batch_size:
            raise ValueError(f"{dataset_len} samples do not fill one global batch of {global_batch_size}")
        self.dataset_len = dataset_len
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.with_mask_seeds = with_mask_seeds
        self.accumulation_steps = global_batch_size // (micro_batch_size * world_size)
        self.batches_per_epoch = dataset_len // global_batch_size
        self.consumed = 0                        # global batches the trainer has stepped over

    # -- position -----------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.consumed // self.batches_per_epoch

    def step(self, global_batches: int = 1) -> None:
        """The trainer consumed ``global_batches`` more global batches (one per optimizer step)."""
        self.consumed += global_batches

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "epoch": self.epoch, "seed": self.seed,
                "dataset_len": self.dataset_len, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "dataset_len", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the batch order: {key} was {state[key]}, "
                                 f"now {getattr(self, key)} (the global sample order would change)")
        self.consumed = int(state["consumed"])

    # -- the order ----------------------------------------------------------------------------
    def global_batch(self, consumed: int) -> list[Union[int, tuple[int, int]]]:
        """Global batch number ``consumed`` (counting across epochs): all ranks' samples."""
        return self._global_batch(consumed, {})

    def _global_batch(self, consumed: int, cache: dict) -> list:
        epoch, b = divmod(consumed, self.batches_per_epoch)
        if cache.get("epoch") != epoch:
            cache["epoch"], cache["order"] = epoch, epoch_order(self.dataset_len, self.seed, epoch).tolist()
        start = b * self.global_batch_size
        indices = cache["order"][start:start + self.global_batch_size]
        if not self.with_mask_seeds:
            return indices
        return [(index, mix_seed(self.seed, epoch, start + k, 0x3A5C)) for k, index in enumerate(indices)]

    def micro_batches(self, consumed: int, cache: Optional[dict] = None) -> list[list]:
        """This rank's micro-batches of global batch number ``consumed``."""
        batch = self._global_batch(consumed, {} if cache is None else cache)
        per_rank = self.global_batch_size // self.world_size
        mine = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
        m = self.micro_batch_size
        return [mine[i:i + m] for i in range(0, per_rank, m)]

    def __iter__(self) -> Iterator[list]:
        cache: dict = {}
        consumed = self.consumed
        while True:
            yield from self.micro_batches(consumed, cache)
            consumed += 1


class PretrainingRows(torch.utils.data.Dataset):
    """A prepared split as a map-style dataset for :class:`PretrainingBatches`: accepts bare indices
    or ``(index, mask_seed)`` pairs, and fetches a micro-batch in one columnar read."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence) -> list[dict]:
        indices = [k[0] if isinstance(k, (tuple, list)) else int(k) for k in keys]
        columns = self.dataset[indices]
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        for row, key in zip(rows, keys):
            if isinstance(key, (tuple, list)):
                row["mask_seed"] = key[1]
        return rows


def evaluation_batches(dataset_len: int, batch_size: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    """Held-out batches in order with fixed mask seeds, so every evaluation sees the same masks."""
    keys = [(i, mix_seed(seed, i, 0xE7A1)) for i in range(dataset_len)]
    return [keys[i:i + batch_size] for i in range(0, dataset_len, batch_size)]
