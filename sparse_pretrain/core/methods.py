"""Pruning methods, registered by name behind one small interface.

A method turns a 2-D weight (out_features x in_features, as ``nn.Linear`` stores it) into
*units* with a score each, and turns a keep-decision per unit back into an element mask:

    scores(weight)          -> non-negative score per unit (lower is pruned first)
    expand(unit_keep, shape) -> element keep-mask of ``shape``
    units(element_keep)     -> unit keep-mask (inverse of ``expand`` for a valid pattern)

Which units are pruned at a target sparsity is decided by :mod:`sparse_pretrain.core.threshold`, the
same exact selection for every method, per layer or globally, in one process or across shards.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

import torch

PRUNING_METHODS: dict[str, type["PruningMethod"]] = {}


def register_method(cls):
    PRUNING_METHODS[cls.name] = cls
    return cls


def build_method(name: str, **options) -> "PruningMethod":
    if name not in PRUNING_METHODS:
        raise ValueError(f"unknown pruning method {name!r}; known: {sorted(PRUNING_METHODS)}")
    return PRUNING_METHODS[name](**options)


class PruningMethod(ABC):
    name: ClassVar[str]
    #: highest sparsity the method can reach (N:M keeps N of every M)
    max_sparsity: float = 1.0

    def shape_problem(self, shape: Sequence[int]) -> str | None:
        """Why this method cannot prune a weight of ``shape``, or None."""
        return None if len(shape) == 2 else f"expects a 2-D weight, got shape {tuple(shape)}"

    @abstractmethod
    def scores(self, weight: torch.Tensor) -> torch.Tensor: ...

    def expand(self, unit_keep: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return unit_keep.reshape(shape)

    def units(self, element_keep: torch.Tensor) -> torch.Tensor:
        return element_keep

    def units_per_weight(self, shape: Sequence[int]) -> int:
        return int(torch.Size(shape).numel())

    def options(self) -> dict:
        return {}


@register_method
class UnstructuredMagnitude(PruningMethod):
    """Each weight is a unit scored by |w|."""

    name = "unstructured"

    def scores(self, weight):
        return weight.detach().abs().float()


@register_method
class BlockMagnitude(PruningMethod):
    """Blocks of ``block_shape`` (rows x columns of the real 2-D weight; 1x4 = four consecutive
    input weights of one output) scored by their mean |w|; whole blocks are kept or dropped."""

    name = "block"

    def __init__(self, block_shape: Sequence[int] = (1, 4)):
        if len(block_shape) != 2 or any(int(b) < 1 for b in block_shape):
            raise ValueError(f"block_shape must be two positive integers, got {list(block_shape)}")
        self.block_shape = (int(block_shape[0]), int(block_shape[1]))

    def shape_problem(self, shape):
        problem = super().shape_problem(shape)
        if problem:
            return problem
        (rows, cols), (bh, bw) = shape, self.block_shape
        if rows % bh or cols % bw:
            return f"block shape {bh}x{bw} does not divide the weight shape {rows}x{cols}"
        return None

    def _blocked(self, x):
        (rows, cols), (bh, bw) = x.shape, self.block_shape
        return x.reshape(rows // bh, bh, cols // bw, bw)

    def scores(self, weight):
        return self._blocked(weight.detach().abs().float()).mean(dim=(1, 3))

    def expand(self, unit_keep, shape):
        bh, bw = self.block_shape
        return unit_keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1).reshape(shape)

    def units(self, element_keep):
        return self._blocked(element_keep).any(dim=3).any(dim=1)

    def units_per_weight(self, shape):
        return int(shape[0]) // self.block_shape[0] * (int(shape[1]) // self.block_shape[1])

    def options(self):
        return {"block_shape": list(self.block_shape)}


@register_method
class NMMagnitude(PruningMethod):
    """N:M sparsity along the input dimension: of every M consecutive weights in a row, the N
    largest |w| are never pruned; the others are pruned by magnitude like unstructured weights.
    At sparsity 1 - N/M (the final target) that is exactly the N:M pattern; on the way there,
    no group has more than M - N zeros."""

    name = "nm"

    def __init__(self, n: int = 2, m: int = 4):
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise ValueError(f"N:M needs integers 0 < n < m, got n={n!r}, m={m!r}")
        self.n, self.m = n, m
        self.max_sparsity = 1.0 - n / m

    def shape_problem(self, shape):
        problem = super().shape_problem(shape)
        if problem:
            return problem
        if shape[1] % self.m:
            return f"M={self.m} does not divide the input dimension of the weight shape {tuple(shape)}"
        return None

    def scores(self, weight):
        rows, cols = weight.shape
        magnitude = weight.detach().abs().float().reshape(rows, cols // self.m, self.m)
        # The N largest of each group are protected with an infinite score. Ties: the higher
        # position is protected, matching the selection's "lower position pruned first".
        order = torch.argsort(magnitude, dim=-1, stable=True)
        protected = torch.zeros_like(magnitude, dtype=torch.bool)
        protected.scatter_(-1, order[..., self.m - self.n:], True)
        return torch.where(protected, torch.full_like(magnitude, float("inf")), magnitude).reshape(rows, cols)

    def options(self):
        return {"n": self.n, "m": self.m}


def is_valid_nm(element_keep: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive input weights keeps at least ``n``."""
    rows, cols = element_keep.shape
    return bool((element_keep.reshape(rows, cols // m, m).sum(-1) >= n).all())


def is_valid_block_pattern(element_keep: torch.Tensor, block_shape: Sequence[int]) -> bool:
    """True when every block is entirely kept or entirely pruned."""
    method = BlockMagnitude(block_shape)
    blocked = method._blocked(element_keep)
    return bool((blocked.all(dim=3).all(dim=1) == blocked.any(dim=3).any(dim=1)).all())
