"""Preemption: checkpoint when SLURM warns that a job is about to end, then requeue it.

SLURM sends a signal some time before it ends a job (``#SBATCH --signal=B:USR1@<seconds>``: to the
batch shell, ``<seconds>`` before the time limit or a preemption) and ``scancel --signal=USR1 --batch``
sends the same by hand. slurmctld tests time limits every 30 s, so the warning comes up to 30 s early and
the job ends up to 30 s late: a run has between ``<seconds>`` and ``<seconds>`` + 60 s after the signal
(measured on Slurm 22.05 by tests/cluster/test_time_limit_chain.py). Launchers (torchrun, the deepspeed
launcher) die on a raw SIGUSR1, so the batch shell traps it and forwards it as a file: ``touch
"$PRUNE_OFA_STOP_FILE"`` (a path in the run's output directory, on the shared filesystem). Every rank
then stops at the same step:

1. ``PreemptionWatch.should_stop()`` runs once per optimizer step on every rank: this rank's flag
   (set by SIGUSR1 or SIGTERM sent to the rank itself, as ``srun`` does when it runs one task per
   rank) or the stop file (looked at by rank 0 only: one ``stat`` per step on the shared filesystem),
   combined across ranks with one all-reduce(MAX) of a single int on a CPU (gloo) group: no GPU
   synchronisation, one small round trip per step.
2. The trainer then saves a checkpoint at that step (the periodic save's) and calls
   ``PreemptionWatch.requeue``: rank 0 writes ``<output_dir>/PREEMPTED``, the stop file is removed
   and every rank exits with ``REQUEUE_EXIT_CODE`` (75, EX_TEMPFAIL) after a barrier. A run that
   ends normally calls ``PreemptionWatch.finish`` instead.
3. The batch script sees 75 (or, behind a launcher that turns a worker's exit code into its own, the
   marker) and runs ``scontrol requeue $SLURM_JOB_ID``. SLURM starts the same job again; the trainer
   resumes from the newest complete checkpoint, bit for bit on the same world size.

The shell side is ``slurm/preemption.sh``, pasted into every stage's batch script by
``launcher.submit``: a function
``prune_ofa_preemptible OUTPUT_DIR COMMAND...`` that sets ``PRUNE_OFA_STOP_FILE`` (default
``OUTPUT_DIR/STOP``), clears a stale stop file and marker, installs the trap, runs COMMAND in the
background (bash runs a trap only between commands, so a foreground COMMAND would delay it until
the end), waits for it and requeues. OUTPUT_DIR must be the recipe's ``training.output_dir``. The
batch script needs ``#SBATCH --requeue`` and ``#SBATCH --signal=B:USR1@<seconds>`` (enough seconds for
one step plus a checkpoint), and ``--open-mode=append`` keeps the first run's log::

    #SBATCH --signal=B:USR1@300
    #SBATCH --requeue
    #SBATCH --open-mode=append
    <slurm/preemption.sh>
    prune_ofa_preemptible runs/bert-base-90 srun torchrun ... -m sparse_pretrain --config RECIPE

A second SIGTERM to a rank ends it at once (the default action), so a launcher that tears its
workers down with SIGTERM, then waits, is not kept waiting by a rank that is stuck in a collective.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Callable, NoReturn, Optional

from sparse_pretrain.runtime.atomic import write_text

#: exit code of a rank that stopped for preemption after checkpointing (EX_TEMPFAIL: try again)
REQUEUE_EXIT_CODE = 75
#: the environment variable naming the stop file
STOP_FILE_ENV = "PRUNE_OFA_STOP_FILE"
#: written by rank 0 into the output directory when the run stopped for preemption
PREEMPTED_MARKER = "PREEMPTED"

def default_stop_file() -> Optional[Path]:
    value = os.environ.get(STOP_FILE_ENV)
    return Path(value) if value else None


def max_all_reduce() -> Callable[[int], int]:
    """``all_reduce(value) -> max over ranks`` on a CPU tensor: the default group under gloo, a gloo
    group of its own under NCCL (so the check never waits for the GPU). Collective to create."""
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return lambda value: value
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def reduce(value: int) -> int:
        flag = torch.tensor([value], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag.item())
    return reduce


class PreemptionWatch:
    """Has anyone asked this run to stop? Checked once per step on every rank, answered alike.

    ``stop_file``: default ``$PRUNE_OFA_STOP_FILE`` (None: no file). ``all_reduce``: combines an int
    across ranks with MAX (``max_all_reduce()``); None in one process. ``watch_file``: whether this
    rank looks at the stop file (rank 0 only in the trainer). ``signals``: handled by setting the
    flag (SIGUSR1 and SIGTERM; installed only from the main thread)."""

    def __init__(self, stop_file: Optional[Path] = None, all_reduce: Optional[Callable[[int], int]] = None,
                 watch_file: bool = True, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.stop_file = Path(stop_file) if stop_file is not None else default_stop_file()
        self.all_reduce = all_reduce
        self.watch_file = watch_file
        self.received: Optional[int] = None      # the signal that set the flag
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()                   # a forked child (a DataLoader worker) keeps the default
        if threading.current_thread() is threading.main_thread():
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid or (signum == signal.SIGTERM and self.received == signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)      # a forked child, or the second SIGTERM: die now
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    def requested_here(self) -> bool:
        return self.received is not None or (self.watch_file and self.stop_file is not None
                                              and self.stop_file.exists())

    def should_stop(self) -> bool:
        """Collective (one all-reduce of one int): True on every rank if any rank was asked to stop."""
        local = int(self.requested_here())
        return bool(self.all_reduce(local) if self.all_reduce is not None else local)

    def reason(self) -> str:
        if self.received is not None:
            return signal.Signals(self.received).name
        if self.watch_file and self.stop_file is not None and self.stop_file.exists():
            return f"stop file {self.stop_file}"
        return "another rank"

    def clear_stop_file(self) -> None:
        if self.stop_file is not None:
            self.stop_file.unlink(missing_ok=True)

    def close(self) -> None:
        """Put the previous signal handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def requeue(self, output_dir: Path, step: int, main: bool, say: Callable[[str], object]) -> NoReturn:
        """End a run that was asked to stop, once its checkpoint of ``step`` is saved: ``say`` why,
        mark ``output_dir`` PREEMPTED and remove the stop file (``main``: one process does), wait for
        every rank (the all-reduce is the barrier), and exit with :data:`REQUEUE_EXIT_CODE`, which
        the batch script turns into a requeue. Collective: every rank calls it."""
        say(f"preempted ({self.reason()}) after step {step}: checkpoint saved, exiting with "
            f"{REQUEUE_EXIT_CODE} for a requeue")
        if main:
            write_text(Path(output_dir) / PREEMPTED_MARKER, f"{step}\n")
            self.clear_stop_file()
        if self.all_reduce is not None:
            self.all_reduce(0)
        raise SystemExit(REQUEUE_EXIT_CODE)

    def finish(self, output_dir: Path, main: bool) -> None:
        """The run ended: the previous signal handlers back and, by ``main``, the PREEMPTED marker an
        earlier attempt left and a stop file removed (a finished run is not a preempted one)."""
        self.close()
        if main:
            (Path(output_dir) / PREEMPTED_MARKER).unlink(missing_ok=True)
            self.clear_stop_file()
