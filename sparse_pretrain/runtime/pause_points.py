"""Named points where a run can be held still, so the test suite can kill it exactly there.

``PRUNE_OFA_PAUSE_AT=<point>:<step>`` makes every process that reaches ``pause(point, step, ...)``
write ``<marker_dir>/.paused-<point>-rank<R>`` and then sleep until it is killed. The kill tests use
it to SIGKILL a run while a checkpoint is half-written (each rank's files written, the checkpoint
not yet marked complete), or between a step's backward and its optimizer step, which polling
from outside cannot hit reliably. Unset, it costs one string comparison.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

VARIABLE = "PRUNE_OFA_PAUSE_AT"
_REQUESTED = os.environ.get(VARIABLE)   # read once: a pause inside the training loop costs a compare


def pause(point: str, step: int, marker_dir: Path, rank: int) -> None:
    if _REQUESTED is None or _REQUESTED != f"{point}:{step}":
        return
    marker_dir.mkdir(parents=True, exist_ok=True)
    (marker_dir / f".paused-{point}-rank{rank}").write_text(f"{os.getpid()}\n")
    while True:          # until the test kills this process
        time.sleep(60)
