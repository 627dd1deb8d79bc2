"""The gradual magnitude pruner: an optimizer-like object that owns masks and a GMP clock.

Use, once per optimizer step::

    loss.backward()
    pruner.mask_gradients()      # pruned weights get no update from the gradient
    optimizer.step(); lr_scheduler.step()
    pruner.step()                # recompute masks if the schedule says so, then zero pruned weights

Pruned weights are zeroed in place and, when masks are recomputed, units pruned before are
pruned first: a pruned weight never returns. (The paper's reference code keeps dense shadow
weights and re-chooses masks from them, so weights can return between policy_end and end; this
variant is cheaper in memory and is what SparseML does.)
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from sparse_pretrain.core.gmp_schedule import GMPClock, GMPSchedule
from sparse_pretrain.core.masks import MaskedParameters, PrunedParameter
from sparse_pretrain.core.methods import PruningMethod
from sparse_pretrain.core.shard_units import ShardedBlocks, ShardedGroups, all_ranges
from sparse_pretrain.core.threshold import AllReduce, ScoreShard, keep_masks

SCOPES = ("layer", "global")


class GradualPruner(MaskedParameters):
    def __init__(self, params: Iterable[PrunedParameter], method: PruningMethod, schedule: GMPSchedule,
                 scope: str = "layer", all_reduce: Optional[AllReduce] = None, rank: int = 0,
                 world_size: int = 1):
        super().__init__(params, all_reduce)
        if scope not in SCOPES:
            raise ValueError(f"pruning.scope: must be one of {SCOPES}, got {scope!r}")
        if schedule.final_sparsity > method.max_sparsity + 1e-12:
            raise ValueError(f"pruning.final_sparsity: {schedule.final_sparsity} is above what "
                             f"method {method.name!r} can reach ({method.max_sparsity})")
        for p in self.params:
            problem = method.shape_problem(p.shape)
            if problem:
                raise ValueError(f"pruning.method: {p.name}: {problem}")
        self.method = method
        self.scope = scope
        self.clock = GMPClock(schedule)
        self.last_mask_changes = 0.0
        # Sharded block and N:M units: decided by world size, the same on every rank, because the
        # exchange of cut units is collective (a rank may hold a whole weight, another none of it).
        self._sharded_units = {}
        if world_size > 1 and method.name != "unstructured":
            device = self.params[0].views()[0].device if self.params else None
            table = all_ranges([(p.offset, p.offset + p.numel) for p in self.params], rank, world_size,
                               all_reduce, device)
            units = {"block": ShardedBlocks, "nm": ShardedGroups}[method.name]
            self._sharded_units = {p.name: units(method, p.shape, p.offset, p.numel, table[i])
                                   for i, p in enumerate(self.params)}

    @property
    def schedule(self) -> GMPSchedule:
        return self.clock.schedule

    def step(self) -> Optional[float]:
        """After optimizer step t: recompute masks if t is an update step, then apply them.
        Returns the new target sparsity when masks were recomputed."""
        target = self.advance()
        self.apply_masks()
        return target

    def advance(self) -> Optional[float]:
        """Advance the clock by one optimizer step and recompute the masks if due (weights are not
        touched: engines whose optimizer hooks apply the masks call this instead of ``step``)."""
        target = self.clock.tick()
        if target is not None:
            self.update_masks(target)
        return target

    def _score_shards(self, params) -> list[ScoreShard]:
        shards = []
        for p in params:
            values = p.views()[0]
            mask = self.masks[p.name]
            if p.name in self._sharded_units:
                shards.append(self._sharded_units[p.name].score_shard(values, mask, self.all_reduce))
            elif p.is_whole:
                shards.append(ScoreShard(self.method.scores(values.view(p.shape)), 0,
                                         self.method.units(mask.view(p.shape))))
            else:  # unstructured: a unit is an element, its position its flat index
                shards.append(ScoreShard(values.detach().abs().float(), p.offset, mask))
        return shards

    #: the most units (of whole layers, so every rank cuts the same chunks) one per-layer search holds
    SEARCH_CHUNK_UNITS = 1 << 24

    def _search_chunks(self) -> list[list]:
        """Consecutive layers, at most SEARCH_CHUNK_UNITS units per chunk (a larger layer alone)."""
        chunks, size = [], 0
        for p in self.params:
            units = self.method.units_per_weight(p.shape)
            if not chunks or size + units > self.SEARCH_CHUNK_UNITS:
                chunks.append([])
                size = 0
            chunks[-1].append(p)
            size += units
        return chunks

    def update_masks(self, sparsity: float) -> None:
        """Recompute every mask at ``sparsity`` from the current weights (no weight changes yet)."""
        keeps = []
        if self.scope == "layer":
            # one search per chunk of layers rather than one for all: the search holds ~17 bytes per
            # unit of what it searches (0.7 GB per rank for BERT-Base, 2.4 GB for BERT-Large at 2
            # ranks, bench/threshold_memory.py), a chunk at most SEARCH_CHUNK_UNITS
            for chunk in self._search_chunks():
                groups = [[shard] for shard in self._score_shards(chunk)]
                keeps += [keep for group in keep_masks(groups, sparsity, self.all_reduce) for keep in group]
        else:  # one threshold over all pruned units: positions continue from layer to layer
            base, groups = 0, [[]]
            for p, shard in zip(self.params, self._score_shards(self.params)):
                groups[0].append(shard._replace(offset=base + shard.offset))
                base += self.method.units_per_weight(p.shape)
            keeps = [keep for group in keep_masks(groups, sparsity, self.all_reduce) for keep in group]
        changed = torch.zeros(2, dtype=torch.int64, device=self.params[0].views()[0].device if self.params else None)
        for p, keep in zip(self.params, keeps):
            units = self._sharded_units.get(p.name)
            if isinstance(units, ShardedBlocks):
                keep = units.element_keep(keep, self.all_reduce)
            elif units is None and p.is_whole:
                keep = self.method.expand(keep, p.shape)
            keep = keep.reshape(-1).to(self.masks[p.name].device)
            changed[0] += (keep != self.masks[p.name]).sum().to(changed.device)
            changed[1] += keep.numel()
            self.masks[p.name] = keep
        changed = self._sum(changed)
        #: fraction of all mask entries that changed at the last update (TensorBoard: sparsity/mask_changes)
        self.last_mask_changes = float(changed[0]) / max(1, int(changed[1]))
        self._masks_changed()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(clock=self.clock.state_dict(), method=self.method.name,
                     method_options=self.method.options(), scope=self.scope)
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = (state["method"], state["method_options"], state["scope"])
        if saved != (self.method.name, self.method.options(), self.scope):
            raise ValueError(f"the checkpoint was written with method/options/scope {saved}, this run "
                             f"uses {(self.method.name, self.method.options(), self.scope)}")
        super().load_state_dict(state)
        self.clock.load_state_dict(state["clock"])
