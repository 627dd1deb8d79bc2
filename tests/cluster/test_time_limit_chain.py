"""SLURM's own time limit on the rendered scripts of a pipeline (tests/support/slurm_cluster.py: a real
cluster, two emulated nodes): a two-node student pruning job gets SLURM's warning signal mid-run (no
scancel), checkpoints, is requeued and resumed, and ends bit for bit like an uninterrupted run; its
``afterok`` dependents start after its final completion, not after the requeued first run; a dependent
that fails cancels its own dependents, which never start.

When the warning comes (measured on Slurm 22.05): slurmctld tests time limits every 30 s (a compile-time
period, nothing in slurm.conf changes it) and signals a job at the first test at or after
``end - signal_seconds - 30 s``; it ends the job at the first test at or after ``end``. With ``time: 2``
minutes and ``signal_seconds: 30`` the warning comes 60-90 s after the start and the limit 60 s later.

The 12 tiny steps take 5 s, far less than a minute, so the first run is slowed by a test hook (a
``sitecustomize`` on the job's PYTHONPATH): in a job's first run (no SLURM_RESTART_COUNT) each rank
waits SLOW_STEP_SECONDS before its per-step preemption check, which moves no number. 12 x 8 s outlast
the warning whenever it comes, and the run stops within one slowed step of it, long before the limit.
Once the first run is requeued the test gives the job 10 minutes (``scontrol update``, as an operator
would): on a loaded machine a resumed run's start-up alone (30 s idle, 100 s seen with load 10 on 2
cores) may outlast its own warning, and each further requeue would cost 2 minutes.
"""
import concurrent.futures
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from launcher.pipeline import load_pipeline
from launcher.submit import ACTIVE_STATES, submit_pipeline
from slurm_cluster import model_tensors, process_state, shared_dir, tiny_student, tiny_student_reference
from sparse_pretrain.runtime.preemption import PREEMPTED_MARKER

ROOT = Path(__file__).resolve().parents[2]
TIME_LIMIT_MINUTES = 2
SIGNAL_SECONDS = 30
SLURM_TEST_PERIOD = 30            # seconds between slurmctld's time-limit tests (PERIODIC_TIMEOUT)
SLOW_STEP_SECONDS = 8
TOTAL_STEPS = 12                  # tiny_student's recipe

SLOW_FIRST_RUN = '''
"""Test hook (tests/cluster/test_time_limit_chain.py): in the first run of a SLURM job, every training
rank waits PRUNE_OFA_TEST_SLOW_STEP seconds before each per-step preemption check."""
import os
DELAY = float(os.environ.get("PRUNE_OFA_TEST_SLOW_STEP") or 0)
if DELAY and "LOCAL_RANK" in os.environ and not os.environ.get("SLURM_RESTART_COUNT"):
    import time
    from sparse_pretrain.runtime import preemption
    _check = preemption.PreemptionWatch.should_stop

    def should_stop(self):
        time.sleep(DELAY)
        return _check(self)
    preemption.PreemptionWatch.should_stop = should_stop
    print(f"test hook: rank {os.environ.get('RANK')} waits {DELAY:g} s per step in this run", flush=True)
'''


def write_spec(root: Path, recipe: Path, hook: Path) -> Path:
    """The old spec format: explicit ``slurm:`` sections. Student pruning on 2 nodes under a real time
    limit; ``report`` after it; ``broken`` after it fails (a model directory the student does not
    write), so ``orphan`` after ``broken`` must never start."""
    spec = {"name": "limit", "output_root": str(root / "runs"), "workdir": str(ROOT),
            "slurm": {"time": f"00:{TIME_LIMIT_MINUTES:02d}:00", "signal_seconds": SIGNAL_SECONDS,
                      "processes_per_node": 1, "cpus_per_task": 1, "partition": "debug",
                      "env": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                              "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}",
                              "PRUNE_OFA_TEST_SLOW_STEP": SLOW_STEP_SECONDS}},
            "stages": {
                "student": {"kind": "pretrain", "config": str(recipe), "slurm": {"nodes": 2},
                            "overrides": {"training.zero_stage": 2}},
                "report": {"kind": "report", "after": ["student"], "report": {"model": "@student/model"}},
                "broken": {"kind": "report", "after": ["student"], "report": {"model": "@student/no-such-model"}},
                "orphan": {"kind": "report", "after": ["broken"], "report": {"model": "@student/model"}},
            }}
    path = root / "limit.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def job_processes(job_id: str) -> dict[int, tuple[str, str]]:
    """The processes of a SLURM job on this machine (its batch shell, srun, launchers, ranks on both
    nodes: SLURM_JOB_ID in their environment): pid -> (start time in /proc/PID/stat, command line)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if f"SLURM_JOB_ID={job_id}".encode() not in environ:
                continue
            started = (proc / "stat").read_text().rsplit(")", 1)[1].split()[19]
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue                # gone meanwhile, or not ours to read
        found[int(proc.name)] = (started, command)
    return found


def still_running(processes: dict[int, tuple[str, str]]) -> list[str]:
    """Those of ``processes`` that still run (the same PID with the same start time, not a zombie)."""
    alive = []
    for pid, (started, command) in processes.items():
        try:
            same = (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) == started
        except (OSError, IndexError):
            continue
        if same and process_state(pid) not in (None, "Z", "X"):
            alive.append(f"{pid} {command}")
    return alive


def stamps(log: str, stage: str, what: str) -> list[float]:
    """The times of the template's ``prune-ofa: stage NAME start|done TIME`` lines."""
    return [float(t) for t in re.findall(rf"^prune-ofa: stage {re.escape(stage)} {what} (\S+)", log, re.M)]


def read(path: str) -> str:
    return Path(path).read_text(errors="replace") if Path(path).is_file() else ""


@pytest.mark.slow
def test_time_limit_requeues_the_rendered_two_node_stage_and_its_dependents_wait(slurm_cluster, tmp_path_factory):
    shared = shared_dir(tmp_path_factory, "slurm-student")
    recipe = tiny_student(shared)
    root = tmp_path_factory.mktemp("time-limit")
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_FIRST_RUN)
    pipeline = load_pipeline(write_spec(root, recipe, hook), check_partition=False)
    script = pipeline.slurm_dir / "student.sbatch"

    def sbatch_here(args: list[str]) -> subprocess.CompletedProcess:     # this cluster's clients
        return subprocess.run(args, env=slurm_cluster.env, capture_output=True, text=True, timeout=60)
    record = submit_pipeline(pipeline, run=sbatch_here, echo=lambda line: None)
    jobs = {name: entry["job_id"] for name, entry in record["stages"].items()}
    student = record["stages"]["student"]
    text = script.read_text()
    assert f"#SBATCH --time=00:{TIME_LIMIT_MINUTES:02d}:00" in text and "#SBATCH --nodes=2" in text
    assert f"#SBATCH --signal=B:USR1@{SIGNAL_SECONDS}" in text and "#SBATCH --requeue" in text

    # the uninterrupted run to compare with (local torchrun, 2 ranks, ZeRO-2), made while the job runs
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reference = pool.submit(tiny_student_reference, shared)

        # the first run, training: its processes, on both nodes
        deadline = time.monotonic() + 300
        while not re.search(r"^step 1/12 ", read(student["log"]), re.M):
            assert time.monotonic() < deadline and slurm_cluster.state(jobs["student"]) in ACTIVE_STATES, \
                read(student["log"])[-5000:] + read(student["err"])[-5000:]
            time.sleep(0.5)
        first_run = job_processes(jobs["student"])
        ranks = [c for _, c in first_run.values() if "-m sparse_pretrain" in c and "torch.distributed.run" not in c]
        assert len(ranks) == 2, first_run                           # one rank per node, under torchrun

        # the second run has started: nothing of the first still runs, the dependents still wait
        deadline = time.monotonic() + 240
        while not re.search(r"^prune-ofa: stage student start \S+ job \d+ restart 1 ", read(student["log"]), re.M):
            assert time.monotonic() < deadline and slurm_cluster.state(jobs["student"]) in ACTIVE_STATES, \
                read(student["log"])[-5000:] + read(student["err"])[-5000:]
            time.sleep(0.5)
        subprocess.run(["scontrol", "update", f"JobId={jobs['student']}", "TimeLimit=00:10:00"], env=slurm_cluster.env,
                       check=True, capture_output=True)
        assert still_running(first_run) == []
        for name in ("report", "broken", "orphan"):
            fields = slurm_cluster.job(jobs[name])
            assert (fields["JobState"], fields["Reason"]) == ("PENDING", "Dependency"), (name, fields)

        states = {name: slurm_cluster.wait(job_id, 480) for name, job_id in jobs.items()}
        reference = reference.result()
    logs = {name: read(entry["log"]) for name, entry in record["stages"].items()}
    errors = {name: read(entry["err"]) for name, entry in record["stages"].items()}
    assert states == {"student": "COMPLETED", "report": "COMPLETED", "broken": "FAILED", "orphan": "CANCELLED"}, \
        (states, logs, errors)

    # requeued by SLURM's warning (the trap saw USR1: nobody ran scancel), never ended by the limit itself
    log = logs["student"]
    restarts = int(slurm_cluster.job(jobs["student"])["Restarts"])
    starts = stamps(log, "student", "start")
    assert restarts == 1, log[-5000:]
    assert [int(n) for n in re.findall(r"^prune-ofa: stage student start \S+ job \d+ restart (\d+)", log, re.M)] == \
        [0, 1]
    warned = [float(t) for t in re.findall(r"^preemption: USR1 received at (\d+\.\d+)", log, re.M)]
    assert len(warned) == 1, log[-5000:]
    earliest = TIME_LIMIT_MINUTES * 60 - SIGNAL_SECONDS - SLURM_TEST_PERIOD
    assert earliest - 2 <= warned[0] - starts[0] <= earliest + SLURM_TEST_PERIOD + 2, (starts, warned)
    assert "TIME LIMIT" not in errors["student"], errors["student"][-3000:]
    assert "test hook: rank 0 waits" in log and log.count("test hook:") == 2      # both ranks of the first run only

    # the first run checkpointed mid-way, and the second resumed from there
    stopped = [int(s) for s in re.findall(r"preempted \(stop file .*\) after step (\d+): checkpoint saved", log)]
    assert len(stopped) == 1 and 0 < stopped[0] < TOTAL_STEPS, log[-5000:]
    out = pipeline.stages["student"].output_dir
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", log)
    assert resumed == [(str(out / "checkpoints" / f"step_{stopped[0]:08d}"), str(stopped[0]))], log[-5000:]
    assert not (out / PREEMPTED_MARKER).exists() and not (out / "STOP").exists()

    # the dependents started after the final run ended, not after the first
    [done] = stamps(log, "student", "done")
    assert done > starts[-1]
    for name in ("report", "broken"):
        [started] = stamps(logs[name], name, "start")
        assert started >= done, (name, started, done)
    assert stamps(logs["report"], "report", "done") and (pipeline.stages["report"].output_dir / "report.md").is_file()
    assert "no-such-model" in logs["broken"] + errors["broken"] and not stamps(logs["broken"], "broken", "done")
    # a failed dependent cancels its own: never started (SLURM made no log), not left pending
    assert slurm_cluster.job(jobs["orphan"])["Reason"] == "DependencyNeverSatisfied"
    assert not Path(record["stages"]["orphan"]["log"]).exists()

    # the same masks and weights as the uninterrupted run, bit for bit
    masks, weights = model_tensors(out / "model")
    reference_masks, reference_weights = model_tensors(reference)
    assert masks.keys() == reference_masks.keys() and weights.keys() == reference_weights.keys()
    assert all(torch.equal(masks[n], reference_masks[n]) for n in masks)
    assert all(torch.equal(weights[n], reference_weights[n]) for n in weights)
