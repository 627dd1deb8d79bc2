"""Scores of block and N:M units for a weight split across ranks at arbitrary flat boundaries.

A ZeRO partition is a contiguous range ``[offset, offset + numel)`` of the flattened 2-D weight, so
a boundary can cut a block (1x4: at most one per boundary; 4x1: up to a block row) or an N:M group.
Units are always those of the real 2-D weight. Only the units that some boundary cuts (a handful
per rank) cross ranks, with one summing all-reduce each way; no rank sees another's weights.

Block units: each rank sums |w| over the parts of blocks it holds. A block touched by one rank is
scored there; a cut block's partial sums are added up across ranks and it is scored by the rank
holding its first element (its owner). After the selection the owners' keep decisions for cut
blocks are shared the same way, and every rank expands decisions to its own elements.

N:M groups (M consecutive weights of a row, contiguous in memory): the magnitudes of the cut
groups are shared, so every rank can tell which N weights of each of its groups are protected;
the units themselves stay single weights, selected like unstructured ones.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from sparse_pretrain.core.methods import BlockMagnitude, NMMagnitude
from sparse_pretrain.core.threshold import AllReduce, ScoreShard


def all_ranges(ranges: Sequence[tuple[int, int]], rank: int, world_size: int,
               all_reduce: Optional[AllReduce], device=None) -> torch.Tensor:
    """[params, world, 2] (offset, end) of every rank's shard of every parameter (one all-reduce)."""
    table = torch.zeros(len(ranges), world_size, 2, dtype=torch.int64, device=device)
    for i, (start, end) in enumerate(ranges):
        table[i, rank, 0], table[i, rank, 1] = start, end
    if all_reduce is not None:
        all_reduce(table)
    return table.cpu()


def cut_points(rank_ranges: torch.Tensor) -> list[int]:
    """Flat indices where one rank's shard ends and another's begins (inside the tensor)."""
    starts = {int(s) for s, e in rank_ranges.tolist() if e > s}
    return sorted(s for s in starts if s > 0)


class ShardedBlocks:
    """Block units of one weight, for the shard ``[offset, offset + numel)`` of this rank."""

    def __init__(self, method: BlockMagnitude, shape: Sequence[int], offset: int, numel: int,
                 rank_ranges: torch.Tensor):
        self.method, self.offset, self.numel = method, offset, numel
        self.rows, self.cols = int(shape[0]), int(shape[1])
        self.bh, self.bw = method.block_shape
        self.blocks_per_row = self.cols // self.bw
        self.cut = self._cut_units(cut_points(rank_ranges))          # same sorted list on every rank
        unit_of_element = self.unit_of_element()
        if numel:
            self.first_unit = int(unit_of_element.min())
            self.span = int(unit_of_element.max()) - self.first_unit + 1
        else:
            self.first_unit, self.span = 0, 0
        touched = torch.zeros(self.span, dtype=torch.bool)
        touched[unit_of_element - self.first_unit] = True
        local_ids = torch.nonzero(touched).flatten() + self.first_unit
        is_cut = torch.isin(local_ids, self.cut)
        first_here = (self._first_element(local_ids) >= offset) & (self._first_element(local_ids) < offset + numel)
        self.owned = local_ids[~is_cut | first_here]                  # units this rank scores
        self.cut_here = torch.isin(self.cut, local_ids)               # cut units this rank touches

    def unit_of_element(self) -> torch.Tensor:
        """Block id of each element this rank holds (computed when needed: 8 bytes an element)."""
        flat = torch.arange(self.offset, self.offset + self.numel, dtype=torch.int64)
        row, col = flat // self.cols, flat % self.cols
        return (row // self.bh) * self.blocks_per_row + col // self.bw

    def _first_element(self, units: torch.Tensor) -> torch.Tensor:
        block_row, block_col = units // self.blocks_per_row, units % self.blocks_per_row
        return block_row * self.bh * self.cols + block_col * self.bw

    def _last_element(self, units: torch.Tensor) -> torch.Tensor:
        return self._first_element(units) + (self.bh - 1) * self.cols + self.bw - 1

    def _cut_units(self, cuts: list[int]) -> torch.Tensor:
        found = []
        for b in cuts:
            block_row = (b // self.cols) // self.bh
            candidates = block_row * self.blocks_per_row + torch.arange(self.blocks_per_row)
            inside = (self._first_element(candidates) < b) & (self._last_element(candidates) >= b)
            found.append(candidates[inside])
        return torch.unique(torch.cat(found)) if found else torch.zeros(0, dtype=torch.int64)

    def score_shard(self, values: torch.Tensor, keep: torch.Tensor, all_reduce: Optional[AllReduce]) -> ScoreShard:
        """Mean |w| of the units this rank owns, their ids as positions, and their prior state."""
        device = values.device
        sums = torch.zeros(self.span, dtype=torch.float32, device=device)
        sums.index_add_(0, (self.unit_of_element() - self.first_unit).to(device), values.detach().abs().float())
        cut_sums = torch.zeros(len(self.cut), dtype=torch.float32, device=device)
        here = self.cut[self.cut_here]
        cut_sums[self.cut_here.to(device)] = sums[(here - self.first_unit).to(device)]
        if all_reduce is not None:
            all_reduce(cut_sums)
        if len(here):
            sums[(here - self.first_unit).to(device)] = cut_sums[self.cut_here.to(device)]
        owned_local = (self.owned - self.first_unit).to(device)
        scores = sums[owned_local] / (self.bh * self.bw)
        # a pruned block is pruned in every element, so its first element (held by the owner) tells
        prior = keep[(self._first_element(self.owned) - self.offset).to(device)]
        return ScoreShard(scores, 0, prior, self.owned.to(device))

    def element_keep(self, owned_keep: torch.Tensor, all_reduce: Optional[AllReduce]) -> torch.Tensor:
        """This rank's element mask from the owners' decisions (sharing those for cut units)."""
        device = owned_keep.device
        unit_keep = torch.zeros(self.span, dtype=torch.bool, device=device)
        unit_keep[(self.owned - self.first_unit).to(device)] = owned_keep
        cut_keep = torch.zeros(len(self.cut), dtype=torch.int64, device=device)
        owned_cut = torch.isin(self.cut, self.owned).to(device)
        if owned_cut.any():
            cut_keep[owned_cut] = unit_keep[(self.cut[owned_cut.cpu()] - self.first_unit).to(device)].long()
        if all_reduce is not None:
            all_reduce(cut_keep)
        here = self.cut[self.cut_here]
        if len(here):
            unit_keep[(here - self.first_unit).to(device)] = cut_keep[self.cut_here.to(device)].bool()
        return unit_keep[(self.unit_of_element() - self.first_unit).to(device)]


class ShardedGroups:
    """N:M groups of one weight, for the shard ``[offset, offset + numel)`` of this rank."""

    def __init__(self, method: NMMagnitude, shape: Sequence[int], offset: int, numel: int,
                 rank_ranges: torch.Tensor):
        self.method, self.offset, self.numel, self.m = method, offset, numel, method.m
        self.cut = torch.tensor(sorted({b // self.m for b in cut_points(rank_ranges) if b % self.m}),
                                dtype=torch.int64)
        self.first_group = offset // self.m
        end_group = -(-(offset + numel) // self.m)
        self.groups = max(0, end_group - self.first_group)
        local_groups = torch.arange(self.first_group, self.first_group + self.groups)
        self.cut_here = torch.isin(self.cut, local_groups)

    def score_shard(self, values: torch.Tensor, keep: torch.Tensor, all_reduce: Optional[AllReduce]) -> ScoreShard:
        device = values.device
        lead = self.offset - self.first_group * self.m
        padded = torch.zeros(self.groups * self.m, dtype=torch.float32, device=device)
        padded[lead:lead + self.numel] = values.detach().abs().float()
        padded = padded.view(self.groups, self.m)
        cut_values = torch.zeros(len(self.cut), self.m, dtype=torch.float32, device=device)
        rows = (self.cut[self.cut_here] - self.first_group).to(device)
        cut_values[self.cut_here.to(device)] = padded[rows]
        if all_reduce is not None:
            all_reduce(cut_values)                    # each element is held by exactly one rank
        if len(rows):
            padded[rows] = cut_values[self.cut_here.to(device)]
        scores = self.method.scores(padded).reshape(-1)[lead:lead + self.numel]
        return ScoreShard(scores, self.offset, keep)
