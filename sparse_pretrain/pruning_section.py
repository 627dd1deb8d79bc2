"""The ``pruning`` section both recipes share: gradual magnitude pruning's keys, their checks, and the
sparsity core's objects built from them.

The pre-training recipe (:mod:`sparse_pretrain.recipe`) and fine-tune pruning
(:mod:`finetune.recipe`) read the same keys with the same meaning; steps count each recipe's own
optimizer steps. The section builds its schedule (:class:`GMPSchedule`), its method and its LR factor
(:class:`RewoundLinearLR`) from its fields and the run length it is given. What depends on that
length is checked by :meth:`PruningConfig.length_problem`, in words each recipe gives it; what depends
on the model (include patterns, block shapes) by :meth:`PruningConfig.check_against_model`, on a
meta-device skeleton before any weights load.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, field_validator, model_validator

from sparse_pretrain.core.gmp_schedule import GMPSchedule, schedule_problems
from sparse_pretrain.core.lr_rewind import RewoundLinearLR
from sparse_pretrain.core.masks import DEFAULT_MODULE_TYPES, find_prunable
from sparse_pretrain.core.methods import PRUNING_METHODS, build_method
from sparse_pretrain.runtime.schema import ConfigError, Fraction, NonNegativeInt, PositiveInt, Section, Text, rule

__all__ = ["PruningConfig"]


class PruningConfig(Section):
    method: Text = "unstructured"       # a registered method: unstructured | block | nm
    scope: Literal["layer", "global"] = "layer"   # layer: each tensor reaches the target; global: one threshold
    initial_sparsity: Fraction = 0.0
    final_sparsity: Fraction = 0.9
    start: NonNegativeInt = 0
    policy_end: NonNegativeInt = 50_000  # (> start: a rule of the schedule, with its own message)
    end: NonNegativeInt = 80_000
    interval: PositiveInt = 1_000
    block_shape: Annotated[list[PositiveInt], Field(min_length=2, max_length=2,
                                                    description="two positive integers (rows, columns)")] = [1, 4]
    n: PositiveInt = 2
    m: PositiveInt = 4
    module_types: Annotated[list[Text], Field(min_length=1, description="a non-empty list of module class names, "
                                                                        "e.g. [Linear]")] = list(DEFAULT_MODULE_TYPES)
    # unset: every Linear inside the model's repeated blocks, and the pooler (core.masks.structural_selection)
    include: Annotated[Optional[list[Text]], Field(min_length=1, description="a non-empty list of regexes "
                                                                          "(module names to prune)")] = None
    exclude: Annotated[list[Text], Field(description="a list of regexes (module names not to prune)")] = []

    @field_validator("method")
    @classmethod
    def _registered(cls, value):
        if value not in PRUNING_METHODS:   # the registry, not a fixed list: methods register themselves
            raise ValueError(f"unknown method {value!r}; known: {sorted(PRUNING_METHODS)}")
        return value

    @model_validator(mode="after")
    def _schedule_and_pattern(self):
        problems = schedule_problems(self.initial_sparsity, self.final_sparsity, self.start, self.policy_end,
                                     self.end, self.interval)
        if problems:
            raise rule(*problems[0])
        if self.n >= self.m:
            raise rule("n", f"N:M needs 0 < n < m, got n={self.n}, m={self.m}")
        if self.method == "nm" and abs(self.final_sparsity - (1 - self.n / self.m)) > 1e-9:
            raise rule("final_sparsity", f"N:M {self.n}:{self.m} prunes exactly {1 - self.n / self.m:g}; "
                                         f"got {self.final_sparsity}")
        return self

    # -- against the run's length ------------------------------------------------------------------
    def length_problem(self, total_steps: int, warmup_steps: int, rewind: bool, length_key: str,
                       length: str) -> Optional[tuple[str, str]]:
        """The first way this schedule does not fit a run of ``total_steps`` optimizer steps
        (``warmup_steps`` of them warm-up; ``rewind``: with LR rewinding), as (dotted key, message),
        or None. The recipe names its length: ``length_key`` as the subject of a message (pre-training:
        ``training.total_steps``), ``length`` where a message about ``pruning.end`` compares with it."""
        if total_steps <= 0:
            return length_key, f"must be > 0, got {total_steps}"
        window = self.policy_end - self.start
        if rewind and total_steps - window - warmup_steps <= 0:
            return length_key, (f"must exceed warmup_steps + the pruning window ({window}) for LR rewinding, "
                                f"got {total_steps}")
        if self.end >= total_steps:
            return "pruning.end", f"must be < {length} ({total_steps}), got {self.end}"
        return None

    # -- what the sparsity core builds from the section ---------------------------------------------
    def gmp_schedule(self) -> GMPSchedule:
        return GMPSchedule(final_sparsity=self.final_sparsity, start=self.start, policy_end=self.policy_end,
                           end=self.end, interval=self.interval, initial_sparsity=self.initial_sparsity)

    def pruning_method(self):
        options = {"block": {"block_shape": self.block_shape}, "nm": {"n": self.n, "m": self.m}}.get(self.method, {})
        return build_method(self.method, **options)

    def lr_factor(self, total_steps: int, warmup_steps: int, rewind: bool) -> RewoundLinearLR:
        """Linear warm-up and decay over ``total_steps``, rewound at each pruning step of the policy
        window when ``rewind``."""
        return RewoundLinearLR(total_steps, warmup_steps, self.start, self.policy_end, self.interval, rewind)

    # -- against the model -------------------------------------------------------------------------
    def check_against_model(self, model) -> list:
        """The weights this section selects in ``model``, as (name, param), checked: each include or
        exclude pattern matches a module, the method fits each weight's shape (block shape, N:M).
        The model's structure is enough (a meta-device skeleton). Raises ConfigError naming the key."""
        try:
            selected = find_prunable(model, self.module_types, self.include, self.exclude)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        method = self.pruning_method()
        for name, param in selected:
            problem = method.shape_problem(param.shape)
            if problem:
                key = {"block": "pruning.block_shape", "nm": "pruning.m"}.get(self.method, "pruning.method")
                raise ConfigError(f"{key}: {name}: {problem}")
        return selected
