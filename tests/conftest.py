"""Fixtures shared across test modules, and how the tests split over pytest-xdist workers."""
import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (a real SLURM cluster on this machine, session-wide)


def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup``, a module's tests run on one worker (its module-scoped fixtures,
    some of which train a model, are built once, and tests that read what an earlier one wrote keep
    their order), and every test on the SLURM cluster runs on one worker, so one cluster starts."""
    for item in items:
        group = "slurm" if "slurm_cluster" in item.fixturenames else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
