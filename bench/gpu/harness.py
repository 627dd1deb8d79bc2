"""How the device check spends a fixed time: measurements in priority order under one budget, each
result (or error, or the reason it was skipped) written to the JSON file as soon as it is known, and
the markdown table of all rows. Standard library only: the tests import it without a GPU or DeepSpeed."""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

#: the numbers of a result row, in table order: (key, column heading, format)
COLUMNS = (("tokens_per_s", "tokens/s", "{:,.0f}"), ("step_ms", "step (ms)", "{:.1f}"), ("mfu", "MFU", "{:.1%}"),
           ("peak_gib", "peak GiB", "{:.2f}"), ("ratio", "ratio", "{:.3f}"))


@dataclass(frozen=True)
class Measurement:
    key: str                          # JSON key, e.g. "1_dense"
    title: str                        # what it measures, for the table
    estimate_s: float                 # what it is expected to take here, to decide whether it still fits
    run: Callable[[], list[dict]]     # -> result rows (dicts with COLUMNS keys, "model", "variant", ...)


class Budget:
    """Seconds left of a total, on a clock the tests can replace."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic):
        self.total_s, self.clock, self.start = total_s, clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()


class ResultFile:
    """The JSON the check leaves: a header (device, versions, date) and one entry per measurement,
    rewritten atomically (temporary file, then rename) after each, so a run killed at its time limit
    still leaves every result it had."""

    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        self.data = {**header, "measurements": {}}
        self.write()

    def record(self, key: str, entry: dict) -> None:
        self.data["measurements"][key] = entry
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


class OverBudget(Exception):
    """A measurement ran past the budget and its grace: stopped, so the rest is still written and printed."""


@contextmanager
def deadline(seconds: float):
    """Raise OverBudget in this (main) thread after ``seconds`` of wall time (SIGALRM); a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def stop(signum, frame):
        raise OverBudget(f"stopped after {seconds:.0f} s, past the budget")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_plan(plan: list[Measurement], budget: Budget, results: ResultFile, grace_s: float = 30.0,
             say: Callable[[str], None] = print) -> None:
    """Each measurement in order, unless its estimate no longer fits the budget: then it is recorded
    as skipped and the next (smaller) one may still run. An error is recorded and the plan goes on; one
    still running ``grace_s`` after the budget is spent is stopped (OverBudget) and recorded as an error."""
    for m in plan:
        if not budget.fits(m.estimate_s):
            entry = {"title": m.title, "status": "skipped",
                     "reason": f"needs ~{m.estimate_s:.0f} s, {max(0.0, budget.left()):.0f} s of the budget left"}
        else:
            say(f"[{budget.elapsed():6.1f} s] {m.key}: {m.title}")
            start, cpu = budget.clock(), time.process_time()
            try:
                with deadline(budget.left() + grace_s):
                    entry = {"title": m.title, "status": "ok", "rows": m.run()}
            except Exception as err:  # noqa: BLE001  (one failed measurement must not lose the others)
                entry = {"title": m.title, "status": "error", "error": f"{type(err).__name__}: {err}",
                         "traceback": traceback.format_exc(limit=-8)}
            entry.update(seconds=round(budget.clock() - start, 2), cpu_s=round(time.process_time() - cpu, 2))
        if entry["status"] != "ok":
            say(f"  {entry['status']}: {entry.get('reason') or entry.get('error')}")
        results.record(m.key, entry)


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return fmt.format(value)


def render_table(data: dict) -> str:
    """Markdown: a header line (device, versions, date), then one row per result row of each
    measurement, or one row saying why a measurement has none."""
    lines = [f"# GPU check: {data.get('device')}, torch {data.get('torch')}, CUDA {data.get('cuda')}, "
             f"{data.get('date')} ({data.get('mode')})", "",
             "| measurement | model | variant | " + " | ".join(h for _, h, _ in COLUMNS) + " | note |",
             "|" + "---|" * (len(COLUMNS) + 4)]
    for key, entry in data["measurements"].items():
        if entry["status"] != "ok":
            why = entry.get("reason") or entry.get("error", "")
            lines.append(f"| {key} | | | " + " | " * len(COLUMNS) + f"{entry['status']}: {why} |")
            continue
        for row in entry["rows"]:
            cells = " | ".join(_cell(row.get(k), fmt) for k, _, fmt in COLUMNS)
            lines.append(f"| {key} | {row.get('model', '')} | {row.get('variant', '')} | {cells} | "
                         f"{row.get('note', '')} |")
    return "\n".join(lines)


def ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    return value / base if value is not None and base else None
