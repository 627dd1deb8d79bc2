"""Exact "prune the k lowest scores" selection, for scores that may be split across ranks.

Each rank passes the shards of scores it holds. A shard is a flat tensor of non-negative scores
plus the global position of its first element; positions are unique within a selection group
(a layer for per-layer pruning, all pruned layers for global pruning). With target sparsity s
over a group of n scores, exactly k = round(s * n) (half up) scores are pruned: those with the
lowest score, ties broken by position (the lower position is pruned first). The answer does not
depend on how the scores are split across ranks.

Why not sort or kthvalue: both need the whole tensor on one rank, and a ZeRO rank holds only its
partition. Instead this is a radix select on the bit pattern of the float32 scores (monotone in
the value for non-negative floats): four rounds, each a 256-bin histogram per group summed with
ONE all-reduce for all groups, narrow the k-th smallest key down 8 bits at a time. If the k-th
key is shared by more scores than are needed, a second radix select over the positions of the
tied scores picks the lowest positions. Nothing but histograms crosses ranks.

``all_reduce`` is any callable that sums an int64 CPU/GPU tensor in place across ranks
(``torch.distributed.all_reduce`` does); ``None`` means one process. Every rank must call
with the same groups in the same order, even a rank that holds no shard of a group.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch

AllReduce = Callable[[torch.Tensor], object]

_RADIX_BITS = 8
_BINS = 1 << _RADIX_BITS


class ScoreShard(NamedTuple):
    """Scores this rank holds for one contiguous run of a group's positions (or for the explicit,
    sorted-or-not but unique, ``positions``)."""

    scores: torch.Tensor             # any shape; read flat
    offset: int = 0                  # global position of scores.flatten()[0]
    prior_keep: Optional[torch.Tensor] = None  # units already pruned (False) are pruned first
    positions: Optional[torch.Tensor] = None   # int64 global positions; overrides offset


def pruned_count(sparsity: float, n: int) -> int:
    """round(sparsity * n), half up: the number of units pruned at ``sparsity``."""
    return min(n, int(math.floor(sparsity * n + 0.5)))


def _score_keys(shard: ScoreShard) -> torch.Tensor:
    """int32 keys ordered like the scores; previously pruned units sort before everything."""
    s = shard.scores.detach().reshape(-1).float()
    if s.numel() and (torch.isnan(s).any() or (s < 0).any()):
        raise ValueError("pruning scores must be non-negative and not NaN (are the weights finite?)")
    keys = (s + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    if shard.prior_keep is None:
        return keys
    # Shift live keys up by one so that key 0 is free for units pruned before: they are pruned
    # first, so a pruned weight can never be chosen to return. (+inf + 1 still fits in int32.)
    return torch.where(shard.prior_keep.reshape(-1).to(keys.device), keys + 1, torch.zeros_like(keys))


def _all_reduce(tensor: torch.Tensor, all_reduce: Optional[AllReduce]) -> torch.Tensor:
    if all_reduce is not None:
        all_reduce(tensor)
    return tensor


def _radix_select(candidates: list[list[torch.Tensor]], k: list[int], total_bits: int,
                  all_reduce: Optional[AllReduce], device) -> tuple[list[int], list[int], list[int]]:
    """For each group g, the k[g]-th smallest key over all ranks (k[g] >= 1), how many of the
    keys equal to it are among the k[g] smallest, and how many keys equal it in all."""
    groups = len(candidates)
    prefix = [0] * groups
    remaining = list(k)
    ties = [0] * groups
    for shift in range(total_bits - _RADIX_BITS, -1, -_RADIX_BITS):
        hist = torch.zeros(groups, _BINS, dtype=torch.int64, device=device)
        digits = [[(c >> shift) & (_BINS - 1) for c in cands] for cands in candidates]
        for g in range(groups):
            for d in digits[g]:
                if d.numel():
                    hist[g] += torch.bincount(d, minlength=_BINS)
        cum = _all_reduce(hist, all_reduce).cumsum(1).cpu()
        hist = hist.cpu()
        for g in range(groups):
            bucket = int(torch.searchsorted(cum[g], torch.tensor(remaining[g])))
            remaining[g] -= int(cum[g, bucket - 1]) if bucket else 0
            ties[g] = int(hist[g, bucket])
            prefix[g] = (prefix[g] << _RADIX_BITS) | bucket
            candidates[g] = [c[d == bucket] for c, d in zip(candidates[g], digits[g])]
    return prefix, remaining, ties


def keep_masks(groups: Sequence[Sequence[ScoreShard]], sparsity: float | Sequence[float],
               all_reduce: Optional[AllReduce] = None) -> list[list[torch.Tensor]]:
    """Boolean keep-masks (True = kept), one per shard, shaped like each shard's scores.

    ``sparsity`` is one target for every group or one per group.
    """
    if isinstance(sparsity, (int, float)):
        sparsity = [float(sparsity)] * len(groups)
    if len(sparsity) != len(groups):
        raise ValueError(f"{len(sparsity)} sparsity targets for {len(groups)} groups")
    device = next((sh.scores.device for grp in groups for sh in grp), torch.device("cpu"))
    keys = [[_score_keys(sh) for sh in grp] for grp in groups]

    sizes = torch.tensor([[sum(k.numel() for k in grp)] for grp in keys], dtype=torch.int64, device=device)
    sizes = _all_reduce(sizes, all_reduce).flatten().tolist()
    k = [pruned_count(s, n) for s, n in zip(sparsity, sizes)]
    active = [g for g in range(len(groups)) if k[g] > 0]

    threshold = {g: -1 for g in range(len(groups))}      # prune keys < threshold ...
    last_position = {g: -1 for g in range(len(groups))}  # ... and keys == threshold up to here
    if active:
        kth, needed, ties = _radix_select([list(keys[g]) for g in active], [k[g] for g in active],
                                          32, all_reduce, device)
        for i, g in enumerate(active):
            threshold[g] = kth[i]
            last_position[g] = (1 << 63) - 1 if needed[i] == ties[i] else None
        split = [(i, g) for i, g in enumerate(active) if last_position[g] is None]
        if split:
            # More scores equal the k-th than are needed: prune the tied ones at the lowest positions.
            tied_positions = [[_positions(sh)[keys[g][j] == threshold[g]]
                               for j, sh in enumerate(groups[g])] for _, g in split]
            cut, _, _ = _radix_select(tied_positions, [needed[i] for i, _ in split], 64, all_reduce, device)
            for (_, g), position in zip(split, cut):
                last_position[g] = position

    masks = []
    for g, grp in enumerate(groups):
        shard_masks = []
        for j, sh in enumerate(grp):
            key = keys[g][j]
            pruned = key < threshold[g]
            if last_position[g] >= 0:
                pruned |= (key == threshold[g]) & (_positions(sh) <= last_position[g])
            shard_masks.append((~pruned).reshape(sh.scores.shape))
        masks.append(shard_masks)
    return masks


def _positions(shard: ScoreShard) -> torch.Tensor:
    if shard.positions is not None:
        return shard.positions.reshape(-1).to(torch.int64) + shard.offset
    return torch.arange(shard.offset, shard.offset + shard.scores.numel(), dtype=torch.int64,
                        device=shard.scores.device)
