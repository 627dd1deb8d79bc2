"""Fixtures shared across test modules, how the tests split over pytest-xdist workers
(tests/support/xdist_split.py: each module on one worker, the longest modules first), and the
summary of skipped tests by reason, with the fix, at the end of a run (tests/support/skip_summary.py)."""
from skip_summary import pytest_terminal_summary  # noqa: F401
from slurm_cluster import slurm_cluster  # noqa: F401  (a real SLURM cluster on this machine, one per worker)
from xdist_split import pytest_collection_modifyitems, pytest_xdist_make_scheduler  # noqa: F401
