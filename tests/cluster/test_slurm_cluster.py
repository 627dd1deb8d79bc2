"""The test suite's SLURM cluster (tests/support/slurm_cluster.py), and student pruning as a 2-node batch job
on it: one torchrun per node, ZeRO-2 and ZeRO-3, the same masks as a local torchrun."""
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch

from slurm_cluster import (
    SlurmCluster,
    is_running,
    job_env,
    missing_binaries,
    model_tensors,
    process_state,
    shared_dir,
    tiny_student,
    tiny_student_reference,
)


def read_output(cluster, job_id: str) -> str:
    return Path(cluster.job(job_id)["StdOut"]).read_text()


def test_two_node_job_runs_one_task_per_node(slurm_cluster):
    job = slurm_cluster.submit("#!/bin/bash\nsrun bash -c 'echo task $SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME'\n",
                               "--nodes=2", "--ntasks-per-node=1", f"--output={slurm_cluster.workdir}/two-%j.out")
    assert slurm_cluster.wait(job, 60) == "COMPLETED"
    tasks = sorted(line for line in read_output(slurm_cluster, job).splitlines() if line.startswith("task "))
    assert tasks == ["task 0 0 node1", "task 1 1 node2"]
    assert slurm_cluster.job(job)["NodeList"] == "node[1-2]"
    assert slurm_cluster.node_addr("node1") == "127.0.0.1"


def test_afterok_dependency_runs_after_success_and_is_cancelled_after_failure(slurm_cluster):
    out = f"--output={slurm_cluster.workdir}/dep-%j.out"
    ok = slurm_cluster.submit("#!/bin/bash\nsleep 1\n", out)
    after_ok = slurm_cluster.submit("#!/bin/bash\necho child ran\n", out, f"--dependency=afterok:{ok}")
    failed = slurm_cluster.submit("#!/bin/bash\nexit 3\n", out)
    after_failed = slurm_cluster.submit("#!/bin/bash\necho must not run\n", out, f"--dependency=afterok:{failed}")
    assert slurm_cluster.wait(after_ok, 60) == "COMPLETED"
    assert slurm_cluster.job(ok)["EndTime"] <= slurm_cluster.job(after_ok)["StartTime"]
    assert slurm_cluster.wait(failed, 60) == "FAILED"
    assert slurm_cluster.job(failed)["ExitCode"] == "3:0"
    # not left pending (DependencyNeverSatisfied) but cancelled: DependencyParameters=kill_invalid_depend
    assert slurm_cluster.wait(after_failed, 30) == "CANCELLED"
    assert not (slurm_cluster.workdir / f"dep-{after_failed}.out").exists()


@pytest.mark.skipif(bool(missing_binaries()), reason="SLURM not installed: run `make slurm-deps`")
def test_stop_leaves_no_daemon_and_no_job_behind(tmp_path):
    cluster = SlurmCluster(tmp_path, nodes=1).start()
    pids = cluster.daemon_pids()
    job = cluster.submit(f"#!/bin/bash\necho $$ > {tmp_path}/job.pid\nexec sleep 300\n", f"--output={tmp_path}/job.out")
    cluster.wait_running(job)
    deadline = time.monotonic() + 30
    while not (tmp_path / "job.pid").is_file() or not (tmp_path / "job.pid").read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job_pid = int((tmp_path / "job.pid").read_text())
    assert is_running(job_pid)
    assert set(pids) == {"munged", "slurmctld", "slurmd-node1"}
    for name, pid in pids.items():       # the PID files name the daemons we started
        assert is_running(pid), name
        assert name.split("-")[0] in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"), name
    cluster.stop()
    assert {name: process_state(pid) for name, pid in pids.items()} == {name: None for name in pids}
    assert not cluster.munge_socket.parent.exists()
    assert not is_running(job_pid)               # a job still running was cancelled first


# -- student pruning on two emulated nodes ----------------------------------------------------------

def two_node_script(recipe: Path, *overrides: str) -> str:
    """What users run: one task per node, each `prune-ofa launch pretrain`, which finds the rendezvous
    (first node's address: emulated node names do not resolve, so its NodeAddr; a port from the job
    id) and its node rank in SLURM's variables and starts this node's rank."""
    launch = " ".join(shlex.quote(a) for a in [str(Path(sys.executable).parent / "prune-ofa"), "launch", "pretrain",
                                                "--config", str(recipe), *overrides])
    return f"""#!/bin/bash
set -euo pipefail
srun --ntasks-per-node=1 bash -c {shlex.quote('echo "node $SLURM_NODEID on $SLURMD_NODENAME"; exec ' + launch)}
"""


@pytest.mark.slow
def test_student_pruning_on_two_nodes_has_the_masks_of_a_local_run(slurm_cluster, tmp_path_factory):
    shared = shared_dir(tmp_path_factory, "slurm-student")
    recipe = tiny_student(shared)
    root = tmp_path_factory.mktemp("two-nodes")
    jobs = {}
    for stage in (2, 3):       # one CPU per node each: SLURM runs both at once
        script = two_node_script(recipe, f"training.output_dir={root / f'slurm-z{stage}'}",
                                 f"training.zero_stage={stage}")
        jobs[stage] = slurm_cluster.submit(script, "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                                           f"--output={root}/z{stage}-%j.out", "--export=ALL", env=job_env())
    # while the jobs run: the local torchrun, 2 ranks, ZeRO-2 (made once, shared with test_preemption.py)
    local_masks, local_weights = model_tensors(tiny_student_reference(shared))
    for stage, job in jobs.items():
        state = slurm_cluster.wait(job, 600)
        log = read_output(slurm_cluster, job)
        assert state == "COMPLETED", log[-5000:]
        assert f"x 2 ranks, ZeRO-{stage}" in log          # world size 2: one rank per node
        assert "node 0 on node1" in log and "node 1 on node2" in log
    assert len(local_masks) == 2 * 6 + 1 and all(m.any() for m in local_masks.values())
    for stage in (2, 3):
        masks, weights = model_tensors(root / f"slurm-z{stage}" / "model")
        assert masks.keys() == local_masks.keys()
        assert all(torch.equal(masks[n], local_masks[n]) for n in masks), f"ZeRO-{stage}: masks differ"
        if stage == 2:   # same world size and stage as the local run: the same model, bit for bit
            assert weights.keys() == local_weights.keys()
            assert all(torch.equal(weights[n], local_weights[n]) for n in weights)
