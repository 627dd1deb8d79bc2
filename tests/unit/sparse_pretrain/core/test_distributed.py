"""The sharded threshold search across real processes (torchrun, gloo) equals the one-process answer."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_pretrain.core.gmp_schedule import GMPSchedule
from sparse_pretrain.core.masks import PrunedParameter
from sparse_pretrain.core.methods import build_method
from sparse_pretrain.core.pruner import GradualPruner

ROOT = Path(__file__).resolve().parents[4]
SUPPORT = ROOT / "tests" / "support"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process_answer(scope):
    torch.manual_seed(0)
    weights = [torch.randn(96, 64), torch.randn(33, 17), torch.randn(1, 257)]
    for w in weights:
        w[torch.rand(w.shape) < 0.2] = 0.5
    params = [PrunedParameter(f"w{i}", w.shape, (lambda w=w: [w.view(-1)])) for i, w in enumerate(weights)]
    pruner = GradualPruner(params, build_method("unstructured"),
                           GMPSchedule(final_sparsity=0.9, start=0, policy_end=4, end=4, interval=2), scope)
    for _ in range(5):
        pruner.step()
    return weights, pruner.sparsity()


@pytest.mark.slow
@pytest.mark.parametrize("world_size, scope", [(2, "layer"), (3, "layer"), (3, "global")])
def test_torchrun_gloo_sharded_pruning_equals_one_process(tmp_path, world_size, scope):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(SUPPORT / "dist_threshold_worker.py"), str(tmp_path), scope]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    weights, report = one_process_answer(scope)
    for i, w in enumerate(weights):
        gathered = torch.cat([ranks[r]["slices"][i] for r in range(world_size)])
        assert torch.equal(gathered, w.view(-1))
    assert all(r["report"] == report for r in ranks)
    if scope == "layer":
        assert all(abs(v - 0.9) < 0.01 for v in report.values())
