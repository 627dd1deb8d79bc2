"""Preemption (sparse_pretrain/runtime/preemption.py): the watch (signals, stop file, the all-reduce that makes
every rank stop at the same step), the batch-script snippet (trap -> stop file, exit 75 -> requeue), and a
real SLURM job that is signalled, checkpoints, is requeued and ends bit for bit like an uninterrupted run."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from launcher.submit import requeue_snippet
from slurm_cluster import job_env, model_tensors, shared_dir, tiny_student, tiny_student_reference
from sparse_pretrain.runtime.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE, STOP_FILE_ENV, PreemptionWatch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def watch_factory():
    made = []

    def make(*args, **kwargs):
        made.append(PreemptionWatch(*args, **kwargs))
        return made[-1]
    yield make
    for watch in reversed(made):     # the test process's own handlers come back, whatever happened
        watch.close()


def test_sigusr1_sets_the_flag_and_close_restores_the_handlers(watch_factory):
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    watch = watch_factory(stop_file=None)
    assert not watch.should_stop()
    os.kill(os.getpid(), signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while watch.received is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert watch.should_stop() and watch.reason() == "SIGUSR1"
    watch.close()
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before


def test_first_sigterm_asks_to_stop_the_second_ends_the_process():
    code = textwrap.dedent("""
        import os, signal, sys, time
        from sparse_pretrain.runtime.preemption import PreemptionWatch
        watch = PreemptionWatch(stop_file=None)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        print("flag", watch.should_stop(), watch.reason(), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("still alive")
    """)
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == "flag True SIGTERM\n"
    assert done.returncode == -signal.SIGTERM


def test_stop_file_from_the_environment_looked_at_by_the_watching_rank_only(tmp_path, monkeypatch, watch_factory):
    stop = tmp_path / "out" / "STOP"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    watching, other = watch_factory(signals=()), watch_factory(watch_file=False, signals=())
    assert watching.stop_file == stop
    assert not watching.should_stop() and not other.should_stop()
    stop.parent.mkdir()
    stop.touch()
    assert watching.should_stop() and watching.reason() == f"stop file {stop}"
    assert not other.should_stop()                  # rank > 0: learns it from the all-reduce
    watching.clear_stop_file()
    assert not stop.exists() and not watching.should_stop()
    monkeypatch.delenv(STOP_FILE_ENV)
    assert watch_factory(signals=()).stop_file is None


def test_one_all_reduce_of_one_int_per_check_combines_the_ranks(watch_factory):
    sent = []

    def all_reduce(value):          # another rank was asked to stop
        sent.append(value)
        return max(value, 1)
    watch = watch_factory(stop_file=None, all_reduce=all_reduce, signals=())
    assert watch.should_stop() and sent == [0]
    assert watch.reason() == "another rank"


WORKER = """
import sys
from pathlib import Path
import torch.distributed as dist
from sparse_pretrain.runtime.preemption import PreemptionWatch, max_all_reduce
rank, store, stop = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
watch = PreemptionWatch(stop_file=stop, all_reduce=max_all_reduce(), watch_file=rank == 1, signals=())
answers = [watch.should_stop()]
if rank == 1:
    stop.touch()
answers.append(watch.should_stop())
print(answers)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_all_reduce_across_real_gloo_ranks(tmp_path):
    """Only rank 1 looks at the stop file; both ranks answer the same at each check."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(tmp_path / "store"), str(tmp_path / "STOP")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [o.strip() for o, _ in outputs] == ["[False, True]"] * 2


# -- the batch-script side, with a fake scontrol (no SLURM needed) ------------------------------------

FAKE_COMMAND = """
import os, sys, time
from pathlib import Path
out, mode = Path(sys.argv[1]), sys.argv[2]
stop = Path(os.environ["PRUNE_OFA_STOP_FILE"])
print("started", flush=True)
deadline = time.time() + 30
while mode == "wait-for-stop" and not stop.exists() and time.time() < deadline:
    time.sleep(0.01)
if mode == "wait-for-stop":
    (out / "PREEMPTED").write_text("1")
    sys.exit(75)
sys.exit(int(mode))
"""


def run_snippet(tmp_path: Path, mode: str, signal_after_start: bool = False,
                signal_during_setup: bool = False) -> tuple[int, str, list[str]]:
    out = tmp_path / f"out-{mode}"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / f"scontrol-{mode}.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    (tmp_path / "fake.py").write_text(FAKE_COMMAND)
    script = tmp_path / f"job-{mode}.sh"
    setup = "echo setup\nsleep 1\n" if signal_during_setup else ""     # the job's setup lines run after the snippet
    script.write_text(f"#!/bin/bash\nset -euo pipefail\n{requeue_snippet()}\n{setup}"
                      f"prune_ofa_preemptible {out} {sys.executable} {tmp_path / 'fake.py'} {out} {mode}\n"
                      "echo returned\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42")
    env.pop(STOP_FILE_ENV, None)
    out.mkdir()
    (out / "STOP").touch()                  # stale files from an earlier attempt are cleared first
    (out / PREEMPTED_MARKER).write_text("old")
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    if signal_during_setup:
        while "setup" not in proc.stdout.readline():
            pass
        proc.send_signal(signal.SIGUSR1)
    if signal_after_start:
        line = proc.stdout.readline()
        while "started" not in line:
            line = proc.stdout.readline()
        proc.send_signal(signal.SIGUSR1)    # to the batch shell only, as `--signal=B:USR1` does
    rest = proc.communicate(timeout=60)[0]
    return proc.returncode, rest, calls.read_text().splitlines() if calls.exists() else []


def test_snippet_forwards_usr1_as_the_stop_file_and_requeues_on_exit_75(tmp_path):
    rc, log, calls = run_snippet(tmp_path, "wait-for-stop", signal_after_start=True)
    assert rc == 0 and calls == ["requeue 42"]
    assert "USR1 received" in log and "requeueing job 42" in log and "returned" not in log


def test_a_warning_during_the_setup_lines_is_kept_and_the_ranks_stop_at_once(tmp_path):
    """USR1 before prune_ofa_preemptible runs (module loads, staging) would end the batch shell with the job
    failed; the snippet keeps it, and the run stops at its first step and is requeued."""
    rc, log, calls = run_snippet(tmp_path, "wait-for-stop", signal_during_setup=True)
    assert rc == 0 and calls == ["requeue 42"], log
    assert "before the run started" in log and "started" in log and "returned" not in log


def test_snippet_passes_other_exit_codes_through_without_requeue(tmp_path):
    rc, log, calls = run_snippet(tmp_path, "0")      # the stale marker was removed: no requeue
    assert (rc, calls) == (0, []) and "returned" in log
    rc, log, calls = run_snippet(tmp_path, "3")      # under `set -e` the script ends with the command's code
    assert (rc, calls) == (3, []) and "returned" not in log


# -- a real SLURM job: signalled, checkpointed, requeued, bitwise equal to an uninterrupted run ---------

@pytest.mark.slow
def test_preempted_job_checkpoints_is_requeued_and_ends_like_an_uninterrupted_run(slurm_cluster, tmp_path_factory):
    shared = shared_dir(tmp_path_factory, "slurm-student")
    recipe = tiny_student(shared)                      # 12 steps, no periodic checkpoint
    root = tmp_path_factory.mktemp("preempt")
    out = root / "run"
    script = f"""#!/bin/bash
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
{requeue_snippet()}
prune_ofa_preemptible {out} {sys.executable} -m torch.distributed.run --nproc-per-node 2 \\
    --master-addr 127.0.0.1 --master-port $((20000 + SLURM_JOB_ID % 20000)) \\
    -m sparse_pretrain --config {recipe} training.output_dir={out} training.zero_stage=2
"""
    job = slurm_cluster.submit(script, "--nodes=1", "--ntasks=1", "--cpus-per-task=2",
                               f"--output={root}/job-%j.out", "--export=ALL", env=job_env())
    log_file = root / f"job-{job}.out"
    deadline = time.monotonic() + 300
    while "step 2/12" not in (log_file.read_text() if log_file.exists() else ""):   # training has started
        assert time.monotonic() < deadline and slurm_cluster.state(job) in ("PENDING", "RUNNING"), \
            log_file.read_text()[-5000:] if log_file.exists() else slurm_cluster.job(job)
        time.sleep(0.2)                                 # each look asks slurmctld for the state too
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_cluster.env, check=True)
    reference = tiny_student_reference(shared)   # uninterrupted, local torchrun: made while the job requeues
    state = slurm_cluster.wait(job, 600)
    log = log_file.read_text()
    assert state == "COMPLETED", log[-5000:]
    assert slurm_cluster.job(job)["Restarts"] == "1"
    assert log.count("trap installed") == 2                     # two starts of the same job
    stopped = re.search(r"preempted \(stop file .*\) after step (\d+): checkpoint saved", log)
    assert stopped, log[-5000:]
    step = int(stopped.group(1))
    assert 2 <= step < 12
    assert f"exiting with {REQUEUE_EXIT_CODE}" in log
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'} at step {step}" in log
    assert not (out / PREEMPTED_MARKER).exists() and not (out / "STOP").exists()

    _, weights = model_tensors(out / "model")
    _, reference = model_tensors(reference)
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[n], reference[n]) for n in weights)
