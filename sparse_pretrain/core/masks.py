"""Masked parameters: which weights are pruned, their boolean masks, and keeping zeros zero.

A pruned weight is seen through a :class:`PrunedParameter`: the part of it this rank holds (the
whole tensor in one process or under DDP; a ZeRO partition under DeepSpeed, described by an engine
adapter), as flat views that are masked in place. Masks are held per shard, so a rank's mask memory
is one byte per weight element it holds.

:func:`zero_pruned_` is how a mask is applied, in every path (here and in ZeRO's step hooks):
pruned elements become +0.0, kept ones are left bit for bit.

:class:`MaskedParameters` is the part shared by the gradual pruner and pattern-lock: apply masks to
weights and gradients, report sparsity, and save/restore masks (bit-packed).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from sparse_pretrain.core.threshold import AllReduce

DEFAULT_MODULE_TYPES = ("Linear",)
#: ``include`` left unset (None): the model's structure decides what is pruned (:func:`structural_selection`)
DEFAULT_INCLUDE = None


@dataclass
class PrunedParameter:
    """One pruned weight as this rank holds it.

    ``views()`` returns flat views of this rank's elements ``[offset, offset + numel)`` of the
    flattened weight: the first is read for scores (the fp32 master where there is one), all are
    masked in place (master and working copies). ``grad()`` returns the flat gradient of the same
    elements, or None.
    """

    name: str
    shape: torch.Size
    views: Callable[[], list[torch.Tensor]]
    grad: Callable[[], Optional[torch.Tensor]] = lambda: None
    offset: int = 0
    numel: Optional[int] = None

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if self.numel is None:
            self.numel = self.shape.numel() - self.offset

    @property
    def is_whole(self) -> bool:
        return self.offset == 0 and self.numel == self.shape.numel()

    @classmethod
    def whole(cls, name: str, param: nn.Parameter) -> "PrunedParameter":
        """The whole tensor on this process (single process, DDP, Accelerate)."""
        def grad():
            return None if param.grad is None else param.grad.view(-1)
        return cls(name, param.shape, lambda: [param.data.view(-1)], grad)


def typed_modules(model: nn.Module, module_types: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module whose type (or a base class) is named in ``module_types`` and
    that has a ``weight`` tensor, in model order."""
    return [(name, module) for name, module in model.named_modules()
            if any(cls.__name__ in module_types for cls in type(module).__mro__)
            and isinstance(getattr(module, "weight", None), torch.Tensor)]


def layer_count(model: nn.Module) -> Optional[int]:
    """How many layers the model's config says it runs (``num_hidden_layers``; DistilBERT's ``n_layers``
    and GPT-2's ``n_layer`` are mapped to it by transformers), or None for a model without one."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return count if isinstance(count, int) and count > 0 else None


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the model's stacks of layers: the outermost ``ModuleList``s whose entries are distinct
    modules of one class, as many as the config's ``num_hidden_layers`` (two or more where the model
    has no config). ``bert.encoder.layer``, ``distilbert.transformer.layer``, ``model.layers`` (Llama,
    Qwen2, Mistral, ModernBERT), ``transformer.h`` (GPT-2); lists nested in a block (a mixture of
    experts) belong to it.

    Raises ValueError where the config counts layers that no such list holds: the layers share their
    weights (ALBERT runs one layer group ``num_hidden_layers`` times), so a layer cannot be pruned on its
    own, and the selection has to be named with ``pruning.include``."""
    count = layer_count(model)
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or any(name.startswith(f + ".") for f in found):
            continue
        entries = list(module)
        if (len(entries) == count if count else len(entries) >= 2) and len({type(e) for e in entries}) == 1 \
                and len({id(e) for e in entries}) == len(entries):
            found.append(name)
    if not found:
        shared = f"its config runs {count} layers (num_hidden_layers) but no list holds {count} distinct ones: " \
                 "its layers share weights (as ALBERT's do), so pruning one layer would prune them all" \
            if count else "it has no list of two or more layers of one class"
        raise ValueError(f"pruning.include: cannot derive the weights to prune from {type(model).__name__}'s "
                         f"structure: {shared}; name the modules to prune with pruning.include (regexes)")
    return found


def structural_selection(model: nn.Module, module_types: Sequence[str] = DEFAULT_MODULE_TYPES) -> list[str]:
    """Module names the default selection prunes: every module of ``module_types`` inside the model's
    repeated blocks (:func:`repeated_blocks`), and the backbone's pooler (BERT's ``pooler.dense``: the
    paper prunes every Linear of the encoder, pooler included). Not embeddings or their projections,
    MLM/LM heads, or task heads (a classifier, DeBERTa's task-head pooler) outside the backbone."""
    blocks = repeated_blocks(model)
    base = getattr(model, "base_model", model)
    pooler = getattr(base, "pooler", None)
    owners = {id(module): name for name, module in model.named_modules()}
    pooler_name = owners.get(id(pooler)) if isinstance(pooler, nn.Module) else None
    roots = tuple(f"{b}." for b in blocks) + ((f"{pooler_name}.",) if pooler_name else ())
    return [name for name, _ in typed_modules(model, module_types)
            if f"{name}.".startswith(roots) or name == pooler_name]


def find_prunable(model: nn.Module, module_types: Sequence[str] = DEFAULT_MODULE_TYPES,
                  include: Optional[Sequence[str]] = DEFAULT_INCLUDE, exclude: Sequence[str] = ()
                  ) -> list[tuple[str, nn.Parameter]]:
    """The ``weight`` of every module whose type (or a base class) is named in ``module_types``, selected
    by the model's structure (``include`` None: :func:`structural_selection`) or by name (a module's name
    fully matches one ``include`` regex), and whose name matches no ``exclude`` regex; in model order.

    A pattern that selects nothing is an error naming the config key (``pruning.include[i]``).
    """
    candidates = typed_modules(model, module_types)
    for key, patterns in (("include", include or ()), ("exclude", exclude)):
        for i, pattern in enumerate(patterns):
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise ValueError(f"pruning.{key}[{i}]: {pattern!r} is not a valid regex ({err})") from None
            if not any(regex.fullmatch(name) for name, _ in candidates):
                raise ValueError(f"pruning.{key}[{i}]: pattern {pattern!r} matches no "
                                 f"{'/'.join(module_types)} module of {type(model).__name__}")
    if include is None:
        chosen = set(structural_selection(model, module_types))
        candidates = [(name, module) for name, module in candidates if name in chosen]
    else:
        candidates = [(name, module) for name, module in candidates if any(re.fullmatch(p, name) for p in include)]
    selected = [(f"{name}.weight", module.weight) for name, module in candidates
                if not any(re.fullmatch(p, name) for p in exclude)]
    if not selected:
        raise ValueError("pruning.include/exclude: together they select no weight to prune")
    return selected


def describe_selection(names: Sequence[str], numels: Optional[Sequence[int]] = None) -> str:
    """The pruned weights in a few lines: per stack of numbered layers, how many layers and the
    weights of one (``bert.encoder.layer.{0..11}: attention.self.query, ...``), then the others."""
    groups: dict[str, dict] = {}
    others = []
    for name in names:
        found = re.match(r"(.*?)\.(\d+)\.(.+)\.weight$", name)
        if found:
            group = groups.setdefault(found[1], {"layers": set(), "weights": {}})
            group["layers"].add(int(found[2]))
            group["weights"][found[3]] = None
        else:
            others.append(name[:-len(".weight")] if name.endswith(".weight") else name)
    lines = [f"{len(names)} weights" + (f", {sum(numels):,} elements" if numels is not None else "")]
    for stack, group in groups.items():
        layers = sorted(group["layers"])
        span = f"{{{layers[0]}..{layers[-1]}}}" if layers == list(range(layers[0], layers[-1] + 1)) else \
            "{" + ",".join(map(str, layers)) + "}"
        lines.append(f"  {stack}.{span}: {', '.join(group['weights'])}")
    if others:
        lines.append(f"  and {', '.join(others)}")
    return "\n".join(lines)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bits (8 elements a byte, first element in the lowest bit)."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].bool()


#: the integer type of each element size, to view a tensor's bit patterns with
_BIT_PATTERNS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def zero_pruned_(tensors: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor]) -> None:
    """Zero, in place, each tensor's elements where its bool keep-mask (same shape, same device) is False.

    Each tensor's bit patterns (viewed as the integer type of its element size) are multiplied by the
    mask's bytes (1 kept, 0 pruned): a kept element is left bit for bit; a pruned one becomes +0.0,
    whatever it held. ``tensor.mul_(keep)`` gives the same numbers except that it leaves -0.0 where a
    negative value was pruned and NaN where a NaN or inf was; here a pruned weight or gradient is
    always exactly zero. Why not ``mul_(keep)``: torch casts a bool operand element by element on CPU,
    2-3x slower in fp32 (5-8x in bf16) than this integer-by-uint8 multiply, which it vectorizes;
    ``masked_fill_`` and ``torch.where(out=)`` are slower still (bench/mask_overhead.py). Nothing is
    allocated: the views share the tensors' and masks' memory."""
    if tensors:
        torch._foreach_mul_([t.view(_BIT_PATTERNS[t.element_size()]) for t in tensors],
                            [keep.view(torch.uint8) for keep in keeps])


class SparsityPatternError(RuntimeError):
    """A weight that must be zero is not (a pruned weight grew back)."""


class MaskedParameters:
    """Weights with boolean keep-masks, masked in place.

    ``all_reduce`` sums across ranks that hold DISJOINT shards of the weights (ZeRO partitions);
    leave it None where every rank holds whole replicas (one process, DDP).
    """

    def __init__(self, params: Iterable[PrunedParameter], all_reduce: Optional[AllReduce] = None):
        self.params = list(params)
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError("pruned parameter names must be unique")
        self.all_reduce = all_reduce
        self.masks: dict[str, torch.Tensor] = {
            p.name: torch.ones(p.numel, dtype=torch.bool, device=p.views()[0].device) for p in self.params}
        self._any_pruned = False

    def step(self) -> None:
        """After each optimizer step: keep pruned weights at zero."""
        self.apply_masks()

    @property
    def any_pruned(self) -> bool:
        return self._any_pruned

    def _masks_changed(self) -> None:
        # Before the first pruning every mask is all ones: masking would cost a pass over every
        # pruned weight per step for nothing.
        self._any_pruned = any(not bool(m.all()) for m in self.masks.values())

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights in place, in every copy (call after each optimizer step)."""
        if not self._any_pruned:
            return
        views, keeps = [], []
        for p in self.params:
            mask = self.masks[p.name]
            for view in p.views():   # (a copy may live on another device: ZeRO-Offload's masters)
                views.append(view)
                keeps.append(mask if mask.device == view.device else mask.to(view.device))
        zero_pruned_(views, keeps)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights (call between backward and the optimizer step)."""
        if not self._any_pruned:
            return
        grads = [(grad, self.masks[p.name]) for p in self.params if (grad := p.grad()) is not None]
        zero_pruned_([g for g, _ in grads], [m for _, m in grads])

    def _sum(self, counts: torch.Tensor) -> torch.Tensor:
        if self.all_reduce is not None:
            self.all_reduce(counts)
        return counts

    def sparsity(self) -> dict[str, float]:
        """Per-layer fraction of pruned weights, plus ``"global"`` over all pruned weights."""
        counts = torch.tensor([[int((~self.masks[p.name]).sum()), p.numel] for p in self.params],
                              dtype=torch.int64)
        counts = self._sum(counts)
        report = {p.name: float(c[0]) / float(c[1]) for p, c in zip(self.params, counts)}
        totals = counts.sum(0)
        report["global"] = float(totals[0]) / float(totals[1])
        return report

    def nonzeros_where_pruned(self) -> dict[str, int]:
        """Per layer, how many pruned positions hold a nonzero value in any copy (should be 0)."""
        counts = torch.tensor([max(int(((v != 0) & ~self.masks[p.name]).sum()) for v in p.views())
                               for p in self.params], dtype=torch.int64)
        counts = self._sum(counts)
        return {p.name: int(c) for p, c in zip(self.params, counts)}

    def verify(self) -> None:
        """Raise :class:`SparsityPatternError` naming each layer where a pruned weight is nonzero."""
        bad = {name: n for name, n in self.nonzeros_where_pruned().items() if n}
        if bad:
            listing = ", ".join(f"{name} ({n})" for name, n in bad.items())
            raise SparsityPatternError(f"pruned weights are nonzero in {len(bad)} layer(s): {listing}")

    def state_dict(self) -> dict:
        return {"masks": {p.name: {"bits": pack_mask(self.masks[p.name]), "numel": p.numel,
                                   "offset": p.offset} for p in self.params}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["masks"]
        missing = [p.name for p in self.params if p.name not in saved]
        unexpected = [name for name in saved if name not in self.masks]
        if missing or unexpected:
            raise ValueError(f"mask state does not match the pruned parameters: missing {missing}, "
                             f"unexpected {unexpected}")
        for p in self.params:
            entry = saved[p.name]
            if (entry["numel"], entry["offset"]) != (p.numel, p.offset):
                raise ValueError(
                    f"mask of {p.name} was saved for elements [{entry['offset']}, "
                    f"{entry['offset'] + entry['numel']}) but this rank holds [{p.offset}, "
                    f"{p.offset + p.numel}): resume with the same world size and ZeRO stage")
            self.masks[p.name] = unpack_mask(entry["bits"], p.numel).to(self.masks[p.name].device)
        self._masks_changed()

    def mask_pieces(self) -> dict[str, dict]:
        """This rank's masks as pieces of the flattened weights: ``{name: {"offset", "numel",
        "bits"}}``. The pieces of all ranks together are independent of how the weights were
        split, so they can be loaded on another world size or ZeRO stage (:meth:`load_mask_pieces`)."""
        return self.state_dict()["masks"]

    def load_mask_pieces(self, pieces_of_all_ranks: Iterable[dict[str, dict]]) -> None:
        """Rebuild this rank's masks from every rank's :meth:`mask_pieces`, whatever the layout they
        were saved with; fails if the pieces do not cover this rank's elements exactly once."""
        pieces_of_all_ranks = list(pieces_of_all_ranks)
        for p in self.params:
            mask = torch.zeros(p.numel, dtype=torch.bool)
            covered = torch.zeros(p.numel, dtype=torch.int32)
            lo, hi = p.offset, p.offset + p.numel
            for pieces in pieces_of_all_ranks:
                piece = pieces.get(p.name)
                if piece is None:
                    raise ValueError(f"saved masks have no entry for {p.name}")
                start, end = piece["offset"], piece["offset"] + piece["numel"]
                a, b = max(lo, start), min(hi, end)
                if a >= b:
                    continue
                bits = unpack_mask(piece["bits"], piece["numel"])
                mask[a - lo:b - lo] = bits[a - start:b - start]
                covered[a - lo:b - lo] += 1
            if not bool((covered == 1).all()):
                raise ValueError(f"saved masks do not cover {p.name}[{lo}:{hi}] exactly once")
            self.masks[p.name] = mask.to(self.masks[p.name].device)
        self._masks_changed()

    def full_masks(self) -> dict[str, torch.Tensor]:
        """Whole masks shaped like the weights (only for whole, unsharded parameters)."""
        out = {}
        for p in self.params:
            if not p.is_whole:
                raise ValueError(f"{p.name} is sharded on this rank; gather its mask through the engine")
            out[p.name] = self.masks[p.name].reshape(p.shape)
        return out


def whole_parameters(named: Iterable[tuple[str, nn.Parameter]]) -> list[PrunedParameter]:
    return [PrunedParameter.whole(name, param) for name, param in named]
