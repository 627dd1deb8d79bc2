"""Pattern-lock: the zeros of a sparse model, held fixed while it is trained further.

Masks are taken once from the nonzeros of the loaded weights and never recomputed. Call
``mask_gradients()`` before and ``apply_masks()`` after each optimizer step, and ``verify()`` at the
end: a pruned weight that became nonzero is an error (:class:`SparsityPatternError`), not a warning.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

from torch import nn

from sparse_pretrain.core.masks import (
    DEFAULT_INCLUDE,
    DEFAULT_MODULE_TYPES,
    MaskedParameters,
    PrunedParameter,
    find_prunable,
    whole_parameters,
)
from sparse_pretrain.core.threshold import AllReduce


class PatternLock(MaskedParameters):
    def __init__(self, params: Iterable[PrunedParameter], all_reduce: Optional[AllReduce] = None):
        super().__init__(params, all_reduce)
        for p in self.params:
            self.masks[p.name] = (p.views()[0] != 0).to(self.masks[p.name].device)
        self._masks_changed()

    @classmethod
    def from_model(cls, model: nn.Module, module_types: Sequence[str] = DEFAULT_MODULE_TYPES,
                   include: Optional[Sequence[str]] = DEFAULT_INCLUDE, exclude: Sequence[str] = ()) -> "PatternLock":
        return cls(whole_parameters(find_prunable(model, module_types, include, exclude)))
