"""Linear-decay learning rate with warmup and rewinding, as the paper's reference code computes it.

With T total steps, w warmup steps, the pruning POLICY window [t_s, t_e) of length P = t_e - t_s and
the mask-update interval f, the multiplier of the base learning rate at step t is

    t < w                 t / w                                  (warmup wins, even inside the window)
    t < t_s               (T - P - t) / (T - P - w)
    t_s <= t < t_e        (T - P - t_s - ((t - t_s) mod f)) / (T - P - w)   (the clock replays from t_s)
    t >= t_e              (T - t) / (T - P - w)                  (decay resumes from the t_s value)

The decay's clock leaves the window out, so the curve has no drop at t_e. With the paper's setting
(T 100k, w 1k, t_s 0, t_e 50k, f 1k) the factor inside the window is (50000 - t mod 1000) / 49000, up
to 1.0204, and decays from 1.0204 to 0 over [50k, 100k]. That is what the published models were
trained with, so it is reproduced here as is.

Without rewinding (the paper's "no LRR" ablation) the factor is the ordinary linear schedule with
warmup: t / w, then (T - t) / (T - w).
"""
from __future__ import annotations

import torch


def rewound_lr_factor(step: int, total_steps: int, warmup_steps: int, start: int, policy_end: int,
                      interval: int) -> float:
    """Multiplier of the base LR at ``step`` (see the module docstring for the formula)."""
    window = policy_end - start
    decay_steps = total_steps - window - warmup_steps
    if step < warmup_steps:
        return step / warmup_steps
    if step < start:
        clock = step
    elif step < policy_end:
        clock = start + (step - start) % interval
    else:
        clock = step - window
    return max(0.0, (total_steps - window - clock) / decay_steps)


def linear_lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """The ordinary linear decay with warmup (no rewinding)."""
    if step < warmup_steps:
        return step / warmup_steps
    return max(0.0, (total_steps - step) / (total_steps - warmup_steps))


class RewoundLinearLR:
    """Callable LR multiplier for ``torch.optim.lr_scheduler.LambdaLR``.

    A callable object (not a closure) so that ``LambdaLR.state_dict()`` saves its settings; the
    step itself is ``LambdaLR``'s ``last_epoch``, so resuming a ``LambdaLR`` resumes the curve.
    """

    def __init__(self, total_steps: int, warmup_steps: int, start: int, policy_end: int, interval: int,
                 rewind: bool = True):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        window = policy_end - start if rewind else 0
        if total_steps - window - warmup_steps <= 0:
            raise ValueError(
                f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})"
                + (f" plus the pruning policy window ({window} steps)" if rewind else ""))
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.start = start
        self.policy_end = policy_end
        self.interval = interval
        self.rewind = rewind

    def __call__(self, step: int) -> float:
        if self.rewind:
            return rewound_lr_factor(step, self.total_steps, self.warmup_steps, self.start,
                                     self.policy_end, self.interval)
        return linear_lr_factor(step, self.total_steps, self.warmup_steps)


def rewound_lr_scheduler(optimizer: torch.optim.Optimizer, lr_factor: RewoundLinearLR,
                         last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` driving every param group of ``optimizer`` with ``lr_factor``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor, last_epoch=last_epoch)
