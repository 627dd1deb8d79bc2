"""Gradual magnitude pruning schedule (Zhu & Gupta 2017; Eq. 1 of Prune Once for All).

The target sparsity follows a cubic curve from ``initial_sparsity`` at ``start`` to
``final_sparsity`` at ``policy_end`` and stays there. Masks are recomputed at the steps
``start, start + interval, ...`` that are ``<= end``; after ``end`` they are frozen.

Step numbering: step ``t`` is the t-th optimizer step, counting from 0, the same ``t`` that a
``LambdaLR`` passes to its lambda for the learning rate of that step. The pruner runs after
optimizer step ``t`` and recomputes the masks if ``t`` is an update step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


def cubic_sparsity(step: int, initial: float, final: float, start: int, policy_end: int) -> float:
    """s_t = s_f + (s_i - s_f) * (1 - (t - t_s) / (t_e - t_s))^3, clamped to [t_s, t_e]."""
    if step <= start:
        return initial
    if step >= policy_end:
        return final
    remaining = 1.0 - (step - start) / (policy_end - start)
    return final + (initial - final) * remaining**3


@dataclass(frozen=True)
class GMPSchedule:
    """When to recompute masks and at which target sparsity. Immutable: the clock lives in
    :class:`GMPClock` (or in the pruner that owns one)."""

    final_sparsity: float
    start: int = 0
    policy_end: int = 50_000
    end: int = 80_000
    interval: int = 1_000
    initial_sparsity: float = 0.0

    def __post_init__(self):
        problems = schedule_problems(self.initial_sparsity, self.final_sparsity, self.start,
                                     self.policy_end, self.end, self.interval)
        if problems:
            key, message = problems[0]
            raise ValueError(f"{key}: {message}")

    def sparsity(self, step: int) -> float:
        """Target sparsity at ``step`` (the curve itself, whether or not masks update there)."""
        return cubic_sparsity(step, self.initial_sparsity, self.final_sparsity, self.start, self.policy_end)

    def is_update_step(self, step: int) -> bool:
        return self.start <= step <= self.end and (step - self.start) % self.interval == 0

    def update_steps(self) -> range:
        return range(self.start, self.end + 1, self.interval)

    def sparsity_for_mask_at(self, step: int) -> float:
        """Sparsity of the masks in force after step ``step``: the target of the last update step
        at or before it (0-sparsity masks, i.e. no pruning, before ``start``)."""
        if step < self.start:
            return 0.0
        last = min(step, self.end)
        last -= (last - self.start) % self.interval
        return self.sparsity(last)


def schedule_problems(initial, final, start, policy_end, end, interval) -> list[tuple[str, str]]:
    """Every problem with a schedule as (config key, message); empty when valid."""
    problems = []
    for key, value in (("initial_sparsity", initial), ("final_sparsity", final)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
            problems.append((key, f"must be a number in [0, 1), got {value!r}"))
    for key, value in (("start", start), ("policy_end", policy_end), ("end", end), ("interval", interval)):
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append((key, f"must be an integer step, got {value!r}"))
    if problems:
        return problems
    if start < 0:
        problems.append(("start", f"must be >= 0, got {start}"))
    if policy_end <= start:
        problems.append(("policy_end", f"must be > start ({start}), got {policy_end}"))
    if end < policy_end:
        problems.append(("end", f"must be >= policy_end ({policy_end}), got {end}"))
    if interval <= 0:
        problems.append(("interval", f"must be > 0, got {interval}"))
    if initial > final:
        problems.append(("initial_sparsity", f"must be <= final_sparsity ({final}), got {initial}"))
    if not problems:   # the target is reached only by a mask update in [policy_end, end]
        last = start + (end - start) // interval * interval
        if last < policy_end:
            reached = cubic_sparsity(last, initial, final, start, policy_end)
            reached = next((f"{reached:.{d}g}" for d in (4, 6) if f"{reached:.{d}g}" != f"{final:.{d}g}"),
                           repr(reached))
            updates = range(start, end + 1, interval)
            shown = ", ".join(map(str, updates)) if len(updates) <= 6 else f"{start}, {start + interval}, ..., {last}"
            problems.append(("interval", (
                f"mask updates at {shown} (start + k*interval, up to end) never fall in [policy_end, end] = "
                f"[{policy_end}, {end}], so the masks would stop at sparsity {reached} (step {last}) instead of "
                f"final_sparsity {final}; set end >= {last + interval} or an interval with an update in "
                f"[{policy_end}, {end}]")))
    return problems


class GMPClock:
    """The stateful side of the schedule: which step comes next and which target is in force.

    ``tick()`` is called once after every optimizer step; it returns the target sparsity when
    masks must be recomputed after that step, else ``None``.
    """

    def __init__(self, schedule: GMPSchedule):
        self.schedule = schedule
        self.next_step = 0
        self.current_sparsity = 0.0

    def tick(self) -> float | None:
        step = self.next_step
        self.next_step += 1
        if not self.schedule.is_update_step(step):
            return None
        self.current_sparsity = self.schedule.sparsity(step)
        return self.current_sparsity

    def state_dict(self) -> dict:
        return {"next_step": self.next_step, "current_sparsity": self.current_sparsity,
                "schedule": asdict(self.schedule)}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("schedule")
        if saved is not None and saved != asdict(self.schedule):
            raise ValueError(
                f"the checkpoint was written with pruning schedule {saved}, but this run is "
                f"configured with {asdict(self.schedule)}; resume with the same schedule")
        self.next_step = int(state["next_step"])
        self.current_sparsity = float(state["current_sparsity"])
