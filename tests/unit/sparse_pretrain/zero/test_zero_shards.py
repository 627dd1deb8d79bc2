"""Masks sharded with DeepSpeed ZeRO partitions, across real processes (torchrun, gloo, CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import free_port

ROOT = Path(__file__).resolve().parents[4]
SUPPORT = ROOT / "tests" / "support"


def run_worker(tmp_path, world_size, stage, method, final, *extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(SUPPORT)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(SUPPORT / "dist_zero_worker.py"), str(tmp_path), str(stage), method, str(final), *map(str, extra)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("world_size, stage, method, final", [
    (2, 1, "unstructured", 0.9), (3, 1, "unstructured", 0.9),
    (2, 2, "unstructured", 0.9), (3, 2, "unstructured", 0.9),
    (2, 3, "unstructured", 0.9), (3, 3, "unstructured", 0.9),
    (3, 2, "block", 0.8), (3, 3, "block", 0.8), (2, 1, "block", 0.8),
    (2, 0, "unstructured", 0.9),
])
def test_sharded_masks_under_zero(tmp_path, world_size, stage, method, final):
    result = run_worker(tmp_path, world_size, stage, method, final)
    # the masks of the last update equal one-process masks computed from the same gathered weights
    assert result["masks_equal_one_process"]
    for name, c in result["counts"].items():
        # exact target zeros in the fp32 master, in the working copy a forward reads, and in the masks
        assert c["master_zeros"] == c["working_zeros"] == c["mask_pruned"] == c["expected"], name
        assert c["pruned_nonzero"] == 0, name
    per_rank, total = result["mask_bytes"], result["total"]
    if stage == 0:
        assert per_rank == [total] * world_size                 # whole replicas
    else:
        assert sum(per_rank) == total                           # shards tile the pruned weights once
        if stage == 3:                                          # ds_tensor partitions: 1/world each
            assert max(per_rank) <= total / world_size + 64 * len(result["counts"])
        else:                                                   # flat partitions of ALL params
            assert max(per_rank) < total


@pytest.mark.slow
@pytest.mark.parametrize("method, final", [("unstructured", 0.9), ("block", 0.8)])
def test_persistent_zero3_parameters_are_masked_everywhere(tmp_path, method, final):
    """With ZeRO-3's default persistence threshold every weight of a tiny model stays whole on every
    rank as well as partitioned: the whole copies must carry the zeros too."""
    result = run_worker(tmp_path, 2, 3, method, final, 100_000)
    assert len(result["persistent"]) == len(result["counts"])
    assert result["masks_equal_one_process"]
    for name, c in result["counts"].items():
        assert c["master_zeros"] == c["working_zeros"] == c["mask_pruned"] == c["expected"], name
        assert c["pruned_nonzero"] == 0, name
