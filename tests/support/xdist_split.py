"""How the test suite splits over pytest-xdist workers (`make test`: ``-n 2 --dist loadgroup``); the
hooks are imported into tests/conftest.py.

Each module's tests run on one worker, so that its module-scoped fixtures (some train a model, some
build a SLURM job's data) are built once and tests that read what an earlier one wrote keep their
order. Modules, not ``xdist_group`` marks: xdist 3.8's loadgroup writes a test's group into its node
id, which pytest 9.2 no longer lets it change, so every mark is ignored and the tests are handed out
one by one (pytest-dev/pytest-xdist#1386). A module is the part of a node id before ``::``, which
xdist's ``loadfile`` scheduling groups by; tests that must share a worker share a module. Each worker
that runs a SLURM test starts its own cluster (a few seconds), and the SLURM jobs' tiny student and its
reference run are built once for all workers (slurm_cluster.shared_dir).

Modules are handed out the longest first (a module's tests keep their order): the ones of a few
minutes start at once and the last ones are a few seconds long, so both workers end together.
"""
from __future__ import annotations

import pytest

#: What a module's tests took in `make test` (seconds, 2026-12-01, 2-core VM). Only the order in which
#: modules are handed out uses them: a stale value costs a little balance, never a result. A module not
#: listed is estimated from its tests' marks.
MODULE_SECONDS = {
    "tests/recipes/test_pretrain.py": 470,
    "tests/recipes/test_finetune_resume.py": 360,
    "tests/unit/sparse_pretrain/zero/test_zero_shards.py": 360,
    "tests/bench/test_fidelity_smoke.py": 300,
    "tests/recipes/test_finetune.py": 165,
    "tests/cluster/test_time_limit_chain.py": 200,
    "tests/cluster/test_submit_on_slurm.py": 160,
    "tests/recipes/test_bad_inputs.py": 130,
    "tests/recipes/test_finetune_pruning.py": 125,
    "tests/unit/launcher/test_launch.py": 125,
    "tests/cluster/test_slurm_cluster.py": 110,
    "tests/cluster/test_preemption.py": 90,
    "tests/recipes/test_finetune_squad_training.py": 85,
    "tests/unit/launcher/test_cli.py": 45,
    "tests/unit/sparse_pretrain/data/test_prepare_robustness.py": 35,
    "tests/bench/test_gpu_check.py": 25,
    "tests/unit/sparse_pretrain/core/test_distributed.py": 20,
}
SLOW_TEST_SECONDS = 20.0     # a test marked slow in a module not listed (it starts processes)
FAST_TEST_SECONDS = 0.1


def module_of(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``: whole modules, in the order the workers collected them (see below)
    rather than xdist's most-tests-first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadFileScheduling
    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """On an xdist worker, the modules the longest first. Every worker orders alike (the same marks,
    the same table), as xdist requires."""
    if not hasattr(config, "workerinput"):
        return
    seconds: dict[str, float] = {}
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        module = module_of(item)
        first.setdefault(module, index)
        if module in MODULE_SECONDS:
            seconds[module] = MODULE_SECONDS[module]
        else:
            slow = item.get_closest_marker("slow") is not None
            seconds[module] = seconds.get(module, 0.0) + (SLOW_TEST_SECONDS if slow else FAST_TEST_SECONDS)
    items.sort(key=lambda item: (-seconds[module_of(item)], first[module_of(item)]))
