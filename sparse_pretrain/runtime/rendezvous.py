"""Where a job's processes meet: the address and port of rank 0 and each process's place in the group,
read from SLURM's environment by every node on its own, without communicating.

SLURM starts tasks in one of three settings, and ``from_slurm`` tells them apart:

- ``per-node``: an ``srun`` step with one task per node (``SLURM_STEP_NUM_TASKS == SLURM_STEP_NUM_NODES``);
  each task is a launcher (torchrun, deepspeed, accelerate) that starts this node's processes, as node
  ``SLURM_NODEID`` of ``nnodes``.
- ``per-process``: an ``srun`` step with one task per process (GPU): srun started every rank itself,
  rank = ``SLURM_PROCID``, local rank = ``SLURM_LOCALID``, world = ``SLURM_STEP_NUM_TASKS``.
- ``allocation``: inside a job but in no step: the batch script (on the first node) or an ``salloc``
  shell (on the login node). Tasks have to be started with ``srun`` from here.

Step variables (``SLURM_STEP_*``) are read before job variables (``SLURM_JOB_*``), because a step may
run on fewer nodes than the job holds; the batch script has no ``SLURM_STEP_ID`` (measured on Slurm
22.05: it does have ``SLURM_PROCID=0`` and the job's ``SLURM_NTASKS``, so those alone would mislead).

``export_torch_env`` turns an srun task into a ``torch.distributed`` rank (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...), so ``srun python -m sparse_pretrain`` needs no launcher. This module imports
nothing heavy and has no side effects on import: the trainers call it first thing.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional

# Every node must derive the same rendezvous port without talking to the others, and two jobs (or two
# steps of one job) that share a host must not collide, as they would on torch's fixed default 29500.
# The port is a function of (job id, step id): jobs whose ids differ by less than JOB_SLOTS never share
# a port, nor do the first STEP_SLOTS steps of a job. The range 20000-31999 stays below Linux's
# ephemeral ports (32768-60999), which outgoing connections take at random.
PORT_BASE = 20000
JOB_SLOTS = 1200
STEP_SLOTS = 10


def job_port(job_id, step_id=0) -> int:
    """The rendezvous port of a SLURM job step: the same on every node, different for nearby jobs."""
    step = int(step_id) if str(step_id).isdigit() else 0
    return PORT_BASE + (int(job_id) % JOB_SLOTS) * STEP_SLOTS + step % STEP_SLOTS


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on this machine now (outside SLURM, where only one machine has to agree)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# -- host lists -------------------------------------------------------------------------------------

def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _expand_ranges(body: str) -> list[str]:
    out = []
    for item in body.split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo) if lo.startswith("0") else 0
            out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(item)
    return out


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compact host list in pure Python: ``node[1-3,5]`` -> node1 node2 node3 node5;
    zero padding (``gpu[08-10]``), several groups (``a[1-2]-b[1-2]``) and comma lists (``a,b[1-2]``)."""
    hosts = []
    for part in _split_top_level(nodelist):
        expanded = [""]
        for literal, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            if not literal and not body:
                continue
            choices = _expand_ranges(body) if body else [""]
            expanded = [e + literal + c for e in expanded for c in choices]
        hosts += expanded
    return hosts


def _scontrol(*args: str) -> Optional[str]:
    """``scontrol ARGS`` output, or None where scontrol is missing or fails (no cluster config)."""
    try:
        done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def slurm_hosts(nodelist: str) -> list[str]:
    """The host names of a SLURM node list, in SLURM's order (``scontrol show hostnames``, else the
    pure-Python expander)."""
    out = _scontrol("show", "hostnames", nodelist)
    hosts = out.split() if out else []
    return hosts or expand_hostlist(nodelist)


def resolve_host(name: str) -> str:
    """An IP address for a node name: DNS, else the node's ``NodeAddr`` from ``scontrol show node``
    (emulated nodes ``node1``/``node2`` on one machine have no DNS name; their NodeAddr is 127.0.0.1)."""
    try:
        return socket.gethostbyname(name)
    except OSError:
        pass
    out = _scontrol("show", "node", name, "-o")
    match = re.search(r"\bNodeAddr=(\S+)", out or "")
    if match:
        addr = match.group(1)
        try:
            return socket.gethostbyname(addr)
        except OSError:
            pass
    raise ValueError(f"cannot resolve node {name!r} to an address (no DNS entry, no NodeAddr from scontrol); "
                     f"set MASTER_ADDR")


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's ``2(x3),1`` task counts -> [2, 2, 2, 1]."""
    counts = []
    for item in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ValueError(f"cannot parse SLURM tasks per node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


# -- the rendezvous ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rendezvous:
    """Where the process group meets and this task's place in it.

    ``nproc_per_node``/``world_size`` are None where the launcher decides them (``per-node``);
    ``rank``/``local_rank`` are set only where this task is one process (``per-process``)."""
    master_addr: str
    master_port: int
    nnodes: int
    node_rank: int
    nproc_per_node: Optional[int] = None
    world_size: Optional[int] = None
    rank: Optional[int] = None
    local_rank: Optional[int] = None
    mode: str = "local"                 # local | hosts | per-node | per-process | allocation
    job_id: Optional[str] = None
    hosts: tuple[str, ...] = ()

    def with_processes(self, nproc_per_node: int) -> "Rendezvous":
        return dataclasses.replace(self, nproc_per_node=nproc_per_node, world_size=self.nnodes * nproc_per_node)

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed's ``env://`` init reads, for a per-process task."""
        if self.rank is None:
            raise ValueError(f"a {self.mode} rendezvous has no rank of its own")
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_WORLD_SIZE": str(self.nproc_per_node), "NODE_RANK": str(self.node_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def local(nproc_per_node: int = 1, port: Optional[int] = None) -> Rendezvous:
    """One machine outside SLURM: 127.0.0.1 and a port free now."""
    return Rendezvous("127.0.0.1", port or free_port(), 1, 0, nproc_per_node, nproc_per_node, mode="local")


def _int(environ: Mapping[str, str], *names: str) -> Optional[int]:
    for name in names:
        value = environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return None


def current_environ(environ=None):
    """``environ``, or ``os.environ`` as it is bound NOW: never bind it as a default argument, since
    ``datasets.Dataset.map(num_proc=N)`` rebinds ``os.environ`` to a copy (datasets 4.x,
    arrow_dataset.py), after which a default bound at import time reads a stale mapping."""
    return os.environ if environ is None else environ


def from_slurm(environ: Optional[Mapping[str, str]] = None) -> Optional[Rendezvous]:
    """The rendezvous of this SLURM task (None outside SLURM). MASTER_ADDR / MASTER_PORT already set
    by the user win over what SLURM's environment gives."""
    environ = current_environ(environ)
    job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if not job_id:
        return None
    in_step = bool(environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID"))
    if in_step:
        nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST")
                    or environ.get("SLURM_JOB_NODELIST"))
        nnodes = _int(environ, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
        ntasks = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    else:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        nnodes = _int(environ, "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
        ntasks = None
    if not nodelist:
        raise ValueError(f"SLURM job {job_id}: no SLURM_JOB_NODELIST / SLURM_STEP_NODELIST in the environment")
    hosts = tuple(slurm_hosts(nodelist))
    nnodes = nnodes or len(hosts)
    node_rank = _int(environ, "SLURM_NODEID") or 0
    master_addr = environ.get("MASTER_ADDR") or resolve_host(hosts[0])
    master_port = _int(environ, "MASTER_PORT") or job_port(job_id, environ.get("SLURM_STEP_ID")
                                                             or environ.get("SLURM_STEPID") or 0)
    common = dict(master_addr=master_addr, master_port=master_port, nnodes=nnodes, node_rank=node_rank,
                  job_id=str(job_id), hosts=hosts)
    if not in_step:
        return Rendezvous(mode="allocation", **common)
    ntasks = ntasks or nnodes
    if ntasks == nnodes:
        return Rendezvous(mode="per-node", **common)
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    counts = tasks_per_node(spec) if spec else [ntasks // nnodes] * nnodes
    here = counts[node_rank] if node_rank < len(counts) else counts[-1]
    return Rendezvous(mode="per-process", nproc_per_node=here, world_size=ntasks,
                      rank=_int(environ, "SLURM_PROCID") or 0, local_rank=_int(environ, "SLURM_LOCALID") or 0,
                      **common)


def export_torch_env(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Make an srun task a torch.distributed rank: where ``RANK`` is not set yet (no torchrun, deepspeed
    or accelerate launcher started this process) and this process is a task of an srun step, set
    ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``
    from SLURM's variables (keeping MASTER_ADDR/MASTER_PORT the user set). A step with one task per
    node run without a launcher is one process per node, so it is covered too. Returns whether it
    exported anything."""
    environ = current_environ(environ)
    if "RANK" in environ:
        return False
    r = from_slurm(environ)
    if r is None or r.mode not in ("per-process", "per-node"):
        return False
    if r.mode == "per-node":   # one task per node and no launcher: each task is the node's one process
        r = dataclasses.replace(r, nproc_per_node=1, world_size=r.nnodes, rank=r.node_rank, local_rank=0)
    for key, value in r.torch_env().items():
        if key in ("MASTER_ADDR", "MASTER_PORT"):
            environ.setdefault(key, value)
        else:
            environ[key] = value
    return True
