"""What a fine-tuning (or QAT) run shows in TensorBoard besides its evaluations: the training scalars
of a window of steps (each loss term's mean, the learning rate, throughput, the masks' sparsity),
when it evaluates, and its evaluations as scalars.

The loss terms are summed on the device each step and read, over all processes, every
:data:`LOG_EVERY` steps (one host sync and one all-reduce). A state saved in the middle of a window
holds the window's sums (:meth:`TrainingWindow.state_dict`), so a resumed run logs the same means
as the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

import torch

#: steps between two logs of the training scalars (and at the last step)
LOG_EVERY = 10
#: the loss terms logged, ``train/<name>``: the loss optimized, the task loss (cross-entropy; SQuAD:
#: the mean of start and end), the KD loss (T^2 x soft cross-entropy, before lambda_kd) and its KL
#: divergence (T^2 x KL(teacher || student): 0 when the student's distribution is the teacher's)
TERMS = ("loss", "loss_task", "loss_kd", "kd_kl")
_KD_TERMS = ("loss_kd", "kd_kl")


def evaluation_due(step: int, eval_every: Optional[int], steps_per_epoch: int) -> bool:
    """Whether the run evaluates after ``step`` (counted from 1): every ``training.eval_every`` steps,
    or, unset, at the end of every epoch (``steps_per_epoch``: optimizer steps of one process)."""
    return step % (eval_every or steps_per_epoch) == 0


def eval_scalars(results: dict) -> dict:
    """``{split: {metric: value}}`` as TensorBoard scalars ``eval/<split>/<metric>`` (numbers only)."""
    return {f"eval/{split}/{name}": value for split, metrics in results.items() if isinstance(metrics, dict)
            for name, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


class TrainingWindow:
    """The steps since the last log: the loss terms summed on the device, the samples and non-padding
    tokens trained (this process's), and the seconds spent training, evaluations and saves left out
    (:meth:`paused`)."""

    def __init__(self, device, distilled: bool):
        self.distilled = distilled            # a teacher: the KD terms are logged too
        self.sums = torch.zeros(len(TERMS) + 1, dtype=torch.float64, device=device)   # the terms, tokens
        self.steps = 0                        # steps in the window (its losses' denominator)
        self._restart()

    def _restart(self) -> None:
        """Throughput counts from now: the samples, the steps timed and the time."""
        self.samples = self.timed_steps = 0
        self.started, self.paused_s = time.perf_counter(), 0.0

    def add(self, terms: dict[str, torch.Tensor], batch: dict) -> None:
        """One optimizer step: its loss terms (0-dim tensors; absent ones count 0) and its batch."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        tokens = mask.sum() if mask is not None else ids.new_tensor(ids.numel())
        zero = self.sums.new_zeros(())
        self.sums += torch.stack([*(terms[k].detach().to(self.sums) if k in terms else zero for k in TERMS),
                                  tokens.to(self.sums)])
        self.samples += ids.shape[0]
        self.steps += 1
        self.timed_steps += 1

    @contextlib.contextmanager
    def paused(self):
        """Time in the block is not training time (an evaluation, a save)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - began

    def scalars(self, reduce: Callable[[torch.Tensor], torch.Tensor], processes: int) -> dict[str, float]:
        """Collective (``reduce``: the sum over the processes): the window's means and rates, then a
        new window. Losses: the mean over the window's steps and the processes."""
        counts = torch.cat([self.sums, self.sums.new_tensor([float(self.samples)])])
        totals = reduce(counts).tolist()
        seconds = max(time.perf_counter() - self.started - self.paused_s, 1e-9)
        values = {f"train/{name}": total / (max(self.steps, 1) * processes) for name, total in zip(TERMS, totals)
                  if self.distilled or name not in _KD_TERMS}
        # tokens and samples of every process; the time of this one (the processes step together)
        values.update({"perf/tokens_per_s": totals[len(TERMS)] / seconds,
                       "perf/samples_per_s": totals[len(TERMS) + 1] / seconds,
                       "perf/step_time": seconds / max(self.timed_steps, 1)})
        self.sums.zero_()
        self.steps = 0
        self._restart()
        return values

    # -- in a saved state --------------------------------------------------------------------------
    def state_dict(self, reduce: Callable[[torch.Tensor], torch.Tensor], main: bool) -> dict:
        """Collective: the window's loss sums over all processes, for the main process's record. They
        stay with the main process (the others' go to zero), so the uninterrupted run and a run resumed
        from this state go on from the same sums and log the same means."""
        terms = reduce(self.sums[:len(TERMS)])
        self.sums[:len(TERMS)] = terms if main else 0.0
        return {"steps": self.steps, "sums": terms.tolist()}

    def load_state_dict(self, state: Optional[dict], main: bool) -> None:
        """A saved window (None: a state saved before windows were saved: a fresh one). Throughput
        restarts: the time before the resume is not known."""
        self.sums.zero_()
        self.steps = 0
        if state is not None:
            self.steps = state["steps"]
            if main:
                self.sums[:len(TERMS)] = torch.tensor(state["sums"], dtype=self.sums.dtype)
        self._restart()
