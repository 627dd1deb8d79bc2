"""``datasets.Dataset.map(num_proc=N)`` rebinds ``os.environ`` to a deep copy of itself (datasets 4.x,
arrow_dataset.py). A function whose default argument is ``os.environ`` then reads the mapping of before,
and misses every variable set since (in the suite: a profile named by $PRUNE_OFA_CLUSTER was not seen, an
HF_HUB_OFFLINE removed by a test was still seen). So no project function takes ``os.environ`` as a default:
they read it when called."""
import ast
import copy
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("launcher", "sparse_pretrain", "finetune")


def _is_os_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ" and \
        isinstance(node.value, ast.Name) and node.value.id == "os"


def test_no_function_binds_os_environ_as_a_default():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    defaults = node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
                    if any(_is_os_environ(d) for d in defaults):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == [], f"os.environ bound at import time (read it at call time instead): {found}"


def test_variables_set_after_os_environ_is_rebound_are_seen(monkeypatch):
    from launcher.cluster import cluster_argument
    from launcher.fetch import offline_variables
    from sparse_pretrain.runtime.rendezvous import from_slurm
    monkeypatch.setattr(os, "environ", copy.deepcopy(os.environ))     # what Dataset.map(num_proc=2) does
    monkeypatch.setenv("PRUNE_OFA_CLUSTER", "/site/cluster.yaml")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert cluster_argument(None) == "/site/cluster.yaml"
    assert "HF_HUB_OFFLINE" in offline_variables()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert "HF_HUB_OFFLINE" not in offline_variables()
    with pytest.raises(ValueError, match="SLURM job 77: no SLURM_JOB_NODELIST"):    # it sees the job
        from_slurm()
