"""A real SLURM cluster on this machine for the test suite: munged, slurmctld and two emulated
compute nodes (``slurmd -N node1`` / ``-N node2``, Debian's build has MULTIPLE_SLURMD), every file in
one temporary directory (but munged's socket: a short directory of its own under /tmp), every port
picked free.

Why each slurm.conf setting is there: /work/shared/notes/slurm-local.md (measured on Slurm 22.05).
The daemons run in the foreground as children of the test process (so they are reaped, and they get
SIGTERM if the test process dies: PR_SET_PDEATHSIG); they are stopped by the PIDs in their own PID
files, never by name.

    cluster = SlurmCluster(tmp_dir).start()
    job = cluster.submit("#!/bin/bash\\nsrun hostname\\n", "--nodes=2", "--ntasks-per-node=1")
    assert cluster.wait(job, 60) == "COMPLETED"
    cluster.stop()

``slurm_cluster`` (tests/conftest.py) is one instance per pytest process (each xdist worker that runs a
test on it starts its own, on ports of its own); a missing SLURM skips its tests.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "sinfo")
CPUS_PER_NODE = 2          # two single-CPU tasks per node fit
DAEMON_STOP_TIMEOUT = 10.0


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_ports(count: int = 1) -> int:
    """The first of ``count`` consecutive free TCP ports (a node range's ``Port=[a-b]``)."""
    def is_free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))       # slurmd and slurmctld listen on every address
                return True
            except OSError:
                return False
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + count < 65536 and all(is_free(p) for p in range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it goes away."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass


def process_state(pid: int) -> Optional[str]:
    """The state letter from /proc/PID/stat (``Z`` for a zombie), None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def is_running(pid: int) -> bool:
    return process_state(pid) not in (None, "Z", "X")


def clean_environment(env: Optional[dict] = None) -> dict:
    """``env`` (default: this process's) without SLURM's own variables, so a test suite that itself
    runs inside a SLURM job does not hand that job's settings to this cluster's sbatch and srun."""
    return {k: v for k, v in (os.environ if env is None else env).items()
            if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}


class SlurmCluster:
    def __init__(self, workdir: Path, nodes: int = 2, cpus_per_node: int = CPUS_PER_NODE,
                 min_job_age: int = 300, cred_expire: int = 5):
        self.workdir = Path(workdir)
        self.nodes = tuple(f"node{i}" for i in range(1, nodes + 1))
        self.cpus_per_node = cpus_per_node
        self.min_job_age = min_job_age      # finished jobs stay visible to `scontrol show job` this long
        self.cred_expire = cred_expire      # also the delay before a requeued job may start again (default 120 s)
        self.conf = self.workdir / "slurm.conf"
        self.munge_socket: Optional[Path] = None    # in a short /tmp directory of its own, see _start_munge
        self.env = dict(clean_environment(), SLURM_CONF=str(self.conf))   # jobs inherit it
        self._processes: dict[str, subprocess.Popen] = {}     # name -> daemon started by us
        self._pid_files: dict[str, Path] = {}

    # -- start ----------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        missing = missing_binaries()
        if missing:
            raise FileNotFoundError(f"SLURM not installed ({', '.join(missing)} missing): run `make slurm-deps`")
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-f", str(self.conf)],
                        self.workdir / "slurmctld.pid")
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", [_binary("slurmd"), "-D", "-f", str(self.conf), "-N", node],
                            self.workdir / f"slurmd-{node}.pid")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        # munged wants every directory above its socket searchable by all (pytest's are 0700), and a
        # socket path is limited to 107 bytes: the socket gets a directory of its own under /tmp
        run_dir = Path(tempfile.mkdtemp(prefix="munge-"))
        self.munge_socket = run_dir / "munge.socket"
        key_dir, state = (self.workdir / "munge" / d for d in ("etc", "lib"))
        for d, mode in ((key_dir, 0o700), (run_dir, 0o755), (state, 0o700)):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(mode)
        key = key_dir / "munge.key"
        subprocess.run([_binary("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o400)
        pid_file = state / "munged.pid"
        self._spawn("munged", [_binary("munged"), "--foreground", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={pid_file}",
                               f"--log-file={state / 'munged.log'}", f"--seed-file={state / 'munged.seed'}"],
                    pid_file)
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"munged did not create {self.munge_socket}")
            time.sleep(0.02)

    def _write_conf(self) -> None:
        """slurm.conf; the reasons are in the notes. Beyond them: ``sched_interval=1`` lets a requeued
        job start as soon as it may (else the next pass can be up to a minute away), ``cred_expire``
        (see __init__) and ``KillWait=10`` bound how long a cancelled job's processes may linger.
        Time limits need nothing here: slurmctld tests them every 30 s (compiled in, PERIODIC_TIMEOUT),
        sends ``--signal`` at the first test at or after ``end - seconds - 30 s`` and ends the job at the
        first at or after ``end`` (OverTimeLimit 0), SIGKILL KillWait later; a requeued run gets a full
        limit and a new warning (test_time_limit_chain.py)."""
        w = self.workdir
        (w / "state").mkdir(exist_ok=True)
        (w / "spool").mkdir(exist_ok=True)
        for node in self.nodes:
            (w / "spool" / node).mkdir(exist_ok=True)
        ctld_port = free_ports()
        first_node_port = free_ports(len(self.nodes))
        while first_node_port <= ctld_port < first_node_port + len(self.nodes):
            first_node_port = free_ports(len(self.nodes))
        host = socket.gethostname().split(".")[0]
        n = len(self.nodes)
        ports = f"{first_node_port}-{first_node_port + n - 1}"
        self.conf.write_text(f"""\
ClusterName=pytest{ctld_port}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={w / 'state'}
SlurmdSpoolDir={w / 'spool'}/%n
SlurmctldPidFile={w / 'slurmctld.pid'}
SlurmdPidFile={w}/slurmd-%n.pid
SlurmctldLogFile={w / 'slurmctld.log'}
SlurmdLogFile={w}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0,sched_interval=1
DependencyParameters=kill_invalid_depend
SlurmdParameters=config_overrides
MailProg=/bin/true
JobRequeue=1
MinJobAge={self.min_job_age}
ReturnToService=2
KillWait=10
NodeName=node[1-{n}] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{ports}] CPUs={self.cpus_per_node} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str], pid_file: Path) -> None:
        # the child keeps its own copy of the descriptor: ours is closed once it is spawned
        with open(self.workdir / f"{name}.stdout", "wb") as log:
            self._processes[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                                     preexec_fn=_die_with_parent)
        self._pid_files[name] = pid_file

    def _check_alive(self) -> None:
        for name, process in self._processes.items():
            if process.poll() is not None:
                logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                               for p in sorted(self.workdir.glob("*.log")) + [self.workdir / f"{name}.stdout"]
                               if p.is_file())
                raise RuntimeError(f"{name} exited with {process.returncode}{logs}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            last = done.stdout + done.stderr
            states = dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)
            if done.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.2)
        raise TimeoutError(f"nodes not idle after {timeout} s: {last}")

    # -- stop -----------------------------------------------------------------------------------

    def daemon_pids(self) -> dict[str, int]:
        """PID of every daemon this instance started, from its PID file (the Popen PID where the
        daemon has not written one yet)."""
        pids = {}
        for name, process in self._processes.items():
            pid = process.pid
            try:
                pid = int(self._pid_files[name].read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
            pids[name] = pid
        return pids

    def stop(self, timeout: float = DAEMON_STOP_TIMEOUT) -> None:
        """SIGTERM to each daemon (compute nodes first, munged last), wait until /proc shows it gone
        or a zombie, SIGKILL after ``timeout``; then reap our children."""
        try:
            self._cancel_jobs(timeout)
        except (subprocess.SubprocessError, OSError):
            pass
        order = sorted(self._processes, key=lambda n: (n == "munged", n == "slurmctld"))
        pids = self.daemon_pids()
        for name in order:
            pid = pids[name]
            if pid != self._processes[name].pid and not is_running(pid):
                pid = self._processes[name].pid        # a stale PID file: use the process we started
            if is_running(pid):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while is_running(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
            try:
                self._processes[name].wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._processes[name].kill()
                self._processes[name].wait()
        if self.munge_socket is not None:
            shutil.rmtree(self.munge_socket.parent, ignore_errors=True)

    def _cancel_jobs(self, timeout: float) -> None:
        """Jobs still queued or running (a failed test's) are cancelled first: a stopped slurmd would
        leave their processes running."""
        if "slurmctld" not in self._processes or self._processes["slurmctld"].poll() is not None:
            return
        def queued() -> list[str]:
            done = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                                  timeout=30)
            return done.stdout.split() if done.returncode == 0 else []
        jobs = queued()
        if not jobs:
            return
        subprocess.run(["scancel", *jobs], env=self.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout
        while queued() and time.monotonic() < deadline:
            time.sleep(0.2)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- jobs -----------------------------------------------------------------------------------

    def submit(self, script: str | Path, *sbatch_args: str, env: Optional[dict] = None) -> str:
        """``sbatch --parsable``; ``script`` is a path or the script's text. Returns the job id.
        The job inherits ``env`` (default: this cluster's ``env``, SLURM_CONF included)."""
        if not isinstance(script, Path) and "\n" in str(script):
            path = self.workdir / "scripts" / f"job-{time.monotonic_ns()}.sh"
            path.parent.mkdir(exist_ok=True)
            path.write_text(str(script))
            script = path
        job_env = dict(self.env if env is None else clean_environment(env), SLURM_CONF=str(self.conf))
        done = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script)], env=job_env,
                              capture_output=True, text=True, cwd=self.workdir)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch failed: {done.stderr}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        done = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {done.stderr}")
        fields = {}
        for token in done.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def state(self, job_id: str) -> str:
        return self.job(job_id)["JobState"]

    def wait(self, job_id: str, timeout: float = 120.0) -> str:
        """Poll ``squeue`` until the job left the queue, every 0.2 s, after 5 s every second (each poll
        is a process and an RPC: a test waiting minutes would spend CPU seconds on them); returns its
        final JobState."""
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            done = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], env=self.env,
                                  capture_output=True, text=True)
            if done.returncode != 0 or not done.stdout.strip():
                break
            time.sleep(0.2 if time.monotonic() - started < 5 else 1.0)
        else:
            raise TimeoutError(f"job {job_id} still {self.state(job_id)} after {timeout} s")
        return self.state(job_id)

    def wait_running(self, job_id: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while (state := self.state(job_id)) != "RUNNING":
            if state not in ("PENDING", "CONFIGURING") or time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} is {state}, not RUNNING")
            time.sleep(0.1)

    def node_addr(self, name: str) -> str:
        done = subprocess.run(["scontrol", "show", "node", "-o", name], env=self.env, capture_output=True,
                              text=True, check=True)
        for token in done.stdout.split():
            if token.startswith("NodeAddr="):
                return token.split("=", 1)[1]
        raise KeyError(f"no NodeAddr for {name}")


# -- a tiny student pruning for jobs on the cluster (test_slurm_cluster.py, test_preemption.py) --

def shared_dir(tmp_path_factory, name: str) -> Path:
    """``name`` in the temporary directory that every xdist worker of this pytest run shares (a
    worker's own is a folder in it), so that what one worker builds there the others reuse."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@contextlib.contextmanager
def _exclusive(lock: Path):
    """Hold an exclusive lock on the file ``lock`` (another worker building the same thing waits)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def tiny_student(root: Path) -> Path:
    """The tiny BERT, corpus, student recipe (12 steps, masks final after step 4, no periodic
    checkpoint) and its prepared data under ``root``, made once for every test module (and every
    worker, see ``shared_dir``) given the same root; returns the recipe."""
    from pretrain_fixtures import env, make_corpus, make_tiny_bert, write_recipe
    recipe = root / "student.yaml"
    with _exclusive(root.with_name(root.name + ".student.lock")):
        if (root / "READY").is_file():
            return recipe
        root.mkdir(parents=True, exist_ok=True)
        model = make_tiny_bert(root / "tiny-bert")
        corpus = make_corpus(root / "corpus.jsonl")
        write_recipe(
            recipe, stage="student",
            model={"name_or_path": str(model)},
            data={"data_files": [str(corpus)], "max_seq_length": 32, "cache_dir": str(root / "prepared"),
                  "validation_fraction": 0.05},
            training={"total_steps": 12, "global_batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-3,
                      "warmup_steps": 1, "save_interval": 1000, "log_interval": 1, "eval_interval": 1000,
                      "eval_batches": 1, "dataloader_workers": 0, "zero3_persistence_threshold": 0,
                      "output_dir": str(root / "unused")},
            pruning={"final_sparsity": 0.9, "start": 0, "policy_end": 4, "end": 4, "interval": 2})
        prune_ofa = Path(sys.executable).parent / "prune-ofa"
        done = subprocess.run([str(prune_ofa), "prepare-data", "--config", str(recipe)], env=env(),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        (root / "READY").write_text("")
    return recipe


def tiny_student_reference(root: Path) -> Path:
    """The exported model of ``tiny_student(root)`` run uninterrupted by a local torchrun, 2 ranks,
    ZeRO-2 (made once); what the runs on the cluster are compared with."""
    from pretrain_fixtures import torchrun
    recipe = tiny_student(root)
    out = root / "reference"
    with _exclusive(root.with_name(root.name + ".reference.lock")):
        if not (out / "model" / "sparsity.json").is_file():
            done = torchrun(2, recipe, f"training.output_dir={out}", "training.zero_stage=2")
            assert "x 2 ranks, ZeRO-2" in done.stdout
    return out / "model"


def job_env() -> dict:
    """What a training job needs besides SLURM_CONF: the project on PYTHONPATH, one thread per rank,
    offline, and unbuffered output so the job's log shows progress as it happens."""
    from pretrain_fixtures import env
    return dict(env(), PYTHONUNBUFFERED="1")


def model_tensors(model_dir: Path) -> tuple[dict, dict]:
    """(zero pattern of every pruned weight, every tensor) of an exported model directory."""
    import json

    from safetensors.torch import load_file
    weights = load_file(model_dir / "model.safetensors")
    layers = json.loads((model_dir / "sparsity.json").read_text())["layers"]
    return {name: weights[name] == 0 for name in layers}, weights


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """One real SLURM cluster (controller + node1, node2) for the whole session of this process."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing): run `make slurm-deps`")
    try:
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except RuntimeError:    # a daemon exited at start: a port picked free was taken before it bound it
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()   # (another worker's cluster?): new ports
    try:
        yield cluster
    finally:
        cluster.stop()
