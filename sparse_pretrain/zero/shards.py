"""Where this rank's part of each pruned weight lives under DeepSpeed, and how masks reach it.

The one engine adapter of the sparsity core (which itself never imports DeepSpeed). For each pruned
weight it describes this rank's shard as a :class:`~sparse_pretrain.core.masks.PrunedParameter`:

- ZeRO-1/2: the fragment of the flat fp32 partition this rank updates (``p._hp_mapping``); a rank
  may hold none of a weight, or a piece that starts or ends mid-row.
- ZeRO-3: the ``ds_tensor`` partition (rank r holds flat ``[r*ps, (r+1)*ps)``, padded on the last
  rank) and its fp32 master in the optimizer's flat sub-group partition; small "persistent"
  parameters are partitioned the same way but also kept whole on every rank.
- ZeRO-0 (plain data parallel, fp32): the whole tensor.

Masks are kept on every step from INSIDE the optimizer step, with the torch optimizer's own step
hooks: before the inner step the fp32 gradient fragments of pruned weights are zeroed, after it
the fp32 master fragments. DeepSpeed then copies masters to the working (bf16/fp16) copies and
all-gathers them as it always does, so keeping zeros costs two in-place passes per step
(``zero_pruned_``, reading one byte of mask per element) and no extra communication. Only when masks
are recomputed (every f steps) do the working copies need a refresh outside the step:
:meth:`ZeroShards.after_step` (both recipes call it after each step).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from sparse_pretrain.core.masks import MaskedParameters, PrunedParameter, zero_pruned_
from sparse_pretrain.core.pruner import GradualPruner


def _empty_view(param: torch.Tensor) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.float32, device=param.device)


class ZeroShards:
    def __init__(self, engine, named_params: list[tuple[str, torch.nn.Parameter]]):
        self.engine = engine
        self.stage = engine.zero_optimization_stage()
        self.zero = engine.optimizer
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.named_params = named_params
        # (flat fp32 tensor this optimizer steps) -> [(name, master view fn, grad view fn)]
        self._by_flat: dict[int, list] = defaultdict(list)
        self.params = [self._describe(name, p) for name, p in named_params]
        self._has_persistent = self.stage == 3 and any(getattr(p, "ds_persist", False) for _, p in named_params)
        self._hooks = []

    @classmethod
    def for_parameters(cls, engine, named: Iterable[tuple[str, torch.nn.Parameter]]) -> "ZeroShards":
        """The shards of the weights ``named`` (``(name, parameter)`` of the model the engine wraps,
        e.g. ``find_prunable(model)``), each as the engine's module holds it under that name."""
        held = dict(engine.module.named_parameters())
        return cls(engine, [(name, held[name]) for name, _ in named])

    # -- where a shard lives ---------------------------------------------------------------------
    def _describe(self, name: str, p: torch.nn.Parameter) -> PrunedParameter:
        if self.stage in (1, 2):
            return self._describe_zero12(name, p)
        if self.stage == 3:
            return self._describe_zero3(name, p)
        return self._describe_whole(name, p)

    def _describe_whole(self, name, p):
        def master():
            return p.data.view(-1)

        def grad():
            return None if p.grad is None else p.grad.view(-1)
        self._by_flat[id(p)].append((name, master, grad))
        return PrunedParameter(name, p.shape, lambda: [master()], grad)

    def _describe_zero12(self, name, p):
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # this rank updates no element of p
            return PrunedParameter(name, p.shape, lambda: [_empty_view(p)], offset=0, numel=0)
        group = mapping.param_group_index
        start, numel = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
        flat = self.zero.single_partition_of_fp32_groups[group]

        def master():
            return flat.data.narrow(0, start, numel)

        def grad():
            return None if flat.grad is None else flat.grad.narrow(0, start, numel)
        self._by_flat[id(flat)].append((name, master, grad))
        return PrunedParameter(name, p.shape, lambda: [master()], grad,
                               offset=mapping.lp_fragment_address.start, numel=numel)

    def _describe_zero3(self, name, p):
        partition = p.ds_tensor.ds_numel
        offset = min(self.rank * partition, p.ds_numel)
        numel = max(0, min(partition, p.ds_numel - offset))
        sub_group, dest, _ = self.zero.grad_position[self.zero.get_param_id(p)]

        def master():
            return self.zero.fp32_partitioned_groups_flat[sub_group].data.narrow(0, dest, numel)

        def grad():
            g = self.zero.fp32_partitioned_groups_flat[sub_group].grad
            return None if g is None else g.narrow(0, dest, numel)

        def working():  # the partition the next forward all-gathers (re-read: DeepSpeed re-points it)
            return p.ds_tensor.data.view(-1).narrow(0, 0, numel)
        self._by_flat[id(self.zero.fp32_partitioned_groups_flat[sub_group])].append((name, master, grad))
        return PrunedParameter(name, p.ds_shape, lambda: [master(), working()], grad, offset=offset, numel=numel)

    # -- keeping zeros inside the optimizer step ------------------------------------------------------
    def inner_optimizer(self) -> torch.optim.Optimizer:
        return self.zero.optimizer if self.stage in (1, 2, 3) else self.zero

    def install(self, masked: MaskedParameters) -> None:
        """Zero pruned gradients before, and pruned fp32 masters after, every inner optimizer step."""
        def zero_pruned_fragments(optimizer, gradients: bool) -> None:
            """The fp32 masters (or their gradients) of the pruned weights this inner step updates."""
            if not masked.any_pruned:      # before the first pruning every mask keeps everything
                return
            views, masks = [], []
            for group in optimizer.param_groups:
                for tensor in group["params"]:
                    for name, master, grad in self._by_flat.get(id(tensor), ()):
                        view = grad() if gradients else master()
                        if view is not None and view.numel():
                            views.append(view)
                            masks.append(masked.masks[name])
            zero_pruned_(views, masks)

        def before(optimizer, args, kwargs):
            zero_pruned_fragments(optimizer, gradients=True)

        def after(optimizer, args, kwargs):
            zero_pruned_fragments(optimizer, gradients=False)

        opt = self.inner_optimizer()
        self._hooks = [opt.register_step_pre_hook(before), opt.register_step_post_hook(after)]

    def uninstall(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def sync_working_copies(self) -> None:
        """After masks were recomputed and applied to the masters (``masked.apply_masks()``):
        bring the working copies every forward reads up to date. Collective: call on all ranks."""
        if self.stage in (1, 2):
            self.zero.update_lp_params()          # fp32 -> bit16 partitions, then all-gather
        elif self.stage == 3 and self._has_persistent:
            persistent = self.zero.persistent_parameters
            persistent[0].all_gather(persistent)   # whole copies of small params from their partitions

    def apply_masks(self, masked: MaskedParameters) -> None:
        """Zero the pruned weights in every copy this rank holds: the fp32 masters (``masked``'s own
        views), then the working copies. Collective: call on all ranks."""
        masked.apply_masks()
        self.sync_working_copies()

    def after_step(self, pruner: GradualPruner) -> Optional[float]:
        """After optimizer step t: advance the pruner's clock and, when it recomputes the masks, apply
        them (:meth:`apply_masks`; between updates the step hooks keep the zeros). Returns the new
        target sparsity when the masks were recomputed. Collective: call on all ranks."""
        target = pruner.advance()
        if target is not None:
            self.apply_masks(pruner)
        return target

    def all_reduce(self) -> Optional[Callable[[torch.Tensor], None]]:
        if self.world_size == 1 or self.stage == 0:
            return None   # ZeRO-0 ranks hold whole replicas: nothing to sum
        return lambda t: dist.all_reduce(t)

    def shard_world(self) -> tuple[int, int]:
        """(rank, world size) of the sharding: (0, 1) where ranks hold whole replicas."""
        return (0, 1) if self.stage == 0 else (self.rank, self.world_size)


@torch.no_grad()
def set_full_weights(engine, full: dict[str, torch.Tensor]) -> None:
    """Load whole fp32 weights into whatever partitions this rank holds (any ZeRO stage, any world
    size): the fp32 masters and the working copies. Collective: call on every rank.

    (DeepSpeed's ``safe_set_full_fp32_param`` fails on ZeRO-3's padded last partition.)"""
    named = [(name, p) for name, p in engine.module.named_parameters() if name in full and p.requires_grad]
    shards = ZeroShards(engine, named)
    for shard in shards.params:
        value = full[shard.name].reshape(-1)[shard.offset:shard.offset + shard.numel]
        for view in shard.views():
            view.copy_(value.to(device=view.device, dtype=view.dtype))
    shards.sync_working_copies()
