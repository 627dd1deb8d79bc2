"""``prune-ofa launch``: the one command that starts a stage wherever it runs.

``build_plan`` is a pure function from a request (stage, recipe, resources, launcher) and the
environment (SLURM's variables, the local CUDA devices) to a ``LaunchPlan``: the argv, the variables
to add, the files to write (a DeepSpeed hostfile), a description, the effective recipe and the
rendezvous. Nothing runs before the plan is complete and checked (``prune-ofa launch`` also runs the
recipe's preflight, ``launcher.preflight``, so no rank starts for a bad path); ``run`` then
replaces this process with the plan's command, so the job's exit code and SLURM's signals
(preemption) reach it directly, or, for torchrun, deepspeed and accelerate, runs it as a child that
gets the same signals and whose first failing rank's one-line message and exit code are kept.

It reads in steps, each a function of its own: ``check_request`` (what the arguments alone tell),
``find_site`` (where: this machine, hosts over ssh, a SLURM step with one task per node or per process,
a batch script; and on how many nodes), ``processes_per_node`` and ``check_gpus``, the recipe's batch
check, ``choose_launcher`` (the table below, and the launchers that cannot work there), then one
command builder per launcher: ``torchrun_command``, ``deepspeed_command``, ``accelerate_command``,
``srun_command``.

Which launcher, where (``--launcher auto``):

========================================  =====================================  ==========================
where                                      pretrain (DeepSpeed recipe)             finetune / qat (Accelerate)
========================================  =====================================  ==========================
this machine, one process                  ``python -m sparse_pretrain``           ``python -m finetune``
this machine, GPUs                         ``deepspeed --num_gpus G``              ``accelerate launch``
this machine, CPU processes                torchrun (``--launcher deepspeed`` ok)  ``accelerate launch``
several hosts, outside SLURM               ``deepspeed --hostfile`` (ssh/pdsh)     not supported
SLURM step, one task per node              torchrun, node rank = SLURM_NODEID      ``accelerate launch`` (multi-machine)
SLURM step, one task per process           ``python -m sparse_pretrain``           ``python -m finetune``
SLURM batch script / salloc shell          ``srun ... python -m ...`` (one task per process)
========================================  =====================================  ==========================

On one machine without GPUs torchrun rather than the deepspeed launcher: both start the same
processes, but deepspeed's launcher takes twice as long to start (11-14 s against 6-7 s measured on
2 cores) and is built around GPU slots. Inside SLURM with one task per node torchrun on GPUs too: it
needs no hostfile and no ssh, only the address and port every node derives from SLURM's
variables (``sparse_pretrain.runtime.rendezvous``); ``--launcher deepspeed`` gives ``deepspeed --no_ssh --node_rank``
with a hostfile each node writes for itself.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from sparse_pretrain.runtime.rendezvous import Rendezvous, from_slurm, local

#: stage -> the module its processes run (None: one plain ``prune-ofa`` process)
STAGES = {"pretrain": "sparse_pretrain", "finetune": "finetune", "qat": "finetune",
          "prepare-data": None, "report": None}
LAUNCHERS = ("auto", "deepspeed", "torchrun", "accelerate", "srun")
DEEPSPEED_DEFAULT_PORT = 29500   # several hosts outside SLURM: a port free on the first host is not knowable here


@dataclass
class LaunchRequest:
    """What the user asked for (the ``prune-ofa launch`` arguments)."""
    stage: str
    config: Optional[str] = None
    overrides: Sequence[str] = ()
    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None
    processes_per_node: Optional[int] = None    # CPU processes per node
    # torchrun's --nproc-per-node / accelerate's --num_processes (over all nodes): processes whose device
    # is the node's (``node_has_gpus``), as those launchers leave it to the script
    nproc_per_node: Optional[int] = None
    total_processes: Optional[int] = None
    launcher: str = "auto"
    hosts: Optional[Sequence[str]] = None
    hostfile: Optional[str] = None
    partition: Optional[str] = None
    partition_gpus: Optional[int] = None        # GPUs per node of the partition, where known
    partition_cpus: Optional[int] = None        # CPUs per node of the partition, where known (srun from outside)
    # pretrain: the recipe's training.zero_stage; finetune/qat: Accelerate's DeepSpeed plugin at this stage
    zero_stage: Optional[int] = None
    master_addr: Optional[str] = None           # the rendezvous address (default: SLURM's first node, 127.0.0.1)
    master_port: Optional[int] = None
    dry_run: bool = False


@dataclass
class LaunchPlan:
    stage: str
    argv: list[str]                  # empty: nothing to run here (a one-process stage on another node)
    env: dict[str, str]              # added to the environment
    description: str
    config: dict                     # the effective recipe (after overrides)
    launcher: str                    # process | torchrun | deepspeed | accelerate | srun
    nodes: int
    processes_per_node: int
    gpu: bool
    rendezvous: Optional[Rendezvous] = None
    files: dict[str, str] = field(default_factory=dict)   # path -> text, written before running
    recipe: object = field(default=None, repr=False)      # the loaded recipe (None: report), for the preflight
    zero_stage: Optional[int] = None          # the ZeRO stage the ranks run (pretrain; finetune on DeepSpeed)
    notes: list[str] = field(default_factory=list)        # what the user should know (printed, and in the summary)

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    def command_line(self) -> str:
        """The command as one shell line (variables first)."""
        if not self.argv:
            return f"# {self.description}"
        return " ".join([f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())] + [shlex.join(self.argv)])

    def summary(self) -> str:
        """The plan and the effective recipe as YAML."""
        import yaml
        launch = {"stage": self.stage, "launcher": self.launcher, "description": self.description,
                  "nodes": self.nodes, "processes_per_node": self.processes_per_node,
                  "world_size": self.world_size, "gpu": self.gpu, "env": dict(sorted(self.env.items())),
                  "zero_stage": self.zero_stage,
                  "rendezvous": self.rendezvous.as_dict() if self.rendezvous else None,
                  "files": sorted(self.files), "notes": list(self.notes)}
        return yaml.safe_dump({"launch": launch, "config": self.config}, sort_keys=False)


# -- resources --------------------------------------------------------------------------------------

def parse_gres_gpus(text: str) -> int:
    """GPUs per node from ``sinfo -o %G`` lines (``gpu:8``, ``gpu:a100:4(S:0-1)``, ``(null)``): the
    largest node of the partition."""
    best = 0
    for line in text.split():
        count = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[A-Za-z0-9_.-]+)*?:(\d+)", line))
        best = max(best, count)
    return best


def _sinfo(partition: str, field_format: str) -> Optional[str]:
    """``sinfo -h -p PART -o FORMAT``'s output, None where sinfo cannot say."""
    try:
        done = subprocess.run(["sinfo", "-h", "-p", partition, "-o", field_format], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 and done.stdout.strip() else None


def partition_gpus(partition: str) -> Optional[int]:
    """GPUs per node of a SLURM partition (``sinfo -h -p PART -o %G``), None where sinfo cannot say."""
    out = _sinfo(partition, "%G")
    return None if out is None else parse_gres_gpus(out)


def parse_sinfo_cpus(text: str) -> Optional[int]:
    """CPUs per node from ``sinfo -o %c`` lines (``64``, ``32+`` where nodes differ): the smallest node."""
    counts = [int(m.group(1)) for m in re.finditer(r"^\s*(\d+)", text, re.M)]
    return min(counts) if counts else None


def partition_cpus(partition: str) -> Optional[int]:
    """CPUs per node of a SLURM partition (``sinfo -h -p PART -o %c``), None where sinfo cannot say."""
    out = _sinfo(partition, "%c")
    return None if out is None else parse_sinfo_cpus(out)


def _slurm_gpus_on_node(environ: Mapping[str, str]) -> Optional[int]:
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        match = re.search(r"(\d+)$", environ.get(name, ""))
        if match:
            return int(match.group(1))
    return None


def _int_env(environ: Mapping[str, str], name: str) -> Optional[int]:
    value = environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _cuda_devices() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """(host, slots) from an MPI-style hostfile, as DeepSpeed reads it."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--hostfile: no such file {path!r}")
    hosts = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^(\S+)\s+slots=(\d+)", line)
        if not match:
            raise ValueError(f"--hostfile {path}: bad line {line!r} (expected 'HOST slots=N')")
        hosts.append((match.group(1), int(match.group(2))))
    if not hosts:
        raise ValueError(f"--hostfile {path}: no hosts")
    return hosts


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def hostfile_path(text: str) -> str:
    """Where a generated hostfile goes: named by its content, so every node writing the same hosts
    writes the same file and a plan stays a pure function."""
    return os.path.join(tempfile.gettempdir(), f"prune-ofa-{hashlib.sha1(text.encode()).hexdigest()[:12]}.hostfile")


# -- the recipe -------------------------------------------------------------------------------------

def _effective_config(stage: str, config: Optional[str], overrides: list[str]):
    """(the recipe object or None, its effective settings as a dict); bad recipes fail here."""
    if stage in ("pretrain", "prepare-data"):
        from sparse_pretrain.recipe import load_recipe
        recipe = load_recipe(config, overrides)
        return recipe, recipe.to_dict()
    if stage in ("finetune", "qat"):
        from finetune.recipe import load_finetune_recipe
        recipe = load_finetune_recipe(config, overrides)
        return recipe, recipe.to_dict()
    return None, {"report_args": list(overrides)}


#: the pre-training recipe's key that ``--zero-stage`` sets (``sparse_pretrain.zero.config`` applies it)
ZERO_STAGE_KEY = "training.zero_stage"


def with_zero_stage(overrides: Sequence[str], zero_stage: Optional[int]) -> list[str]:
    """A pre-training recipe's overrides with ``--zero-stage N`` as ``training.zero_stage=N``. An explicit
    ``training.zero_stage=M`` override stays as it is when it says the same, and is an error when it
    disagrees (neither wins silently)."""
    overrides = list(overrides)
    if zero_stage is None:
        return overrides
    import yaml
    for text in overrides:
        key, _, value = text.partition("=")
        if key.strip() == ZERO_STAGE_KEY:
            try:
                same = yaml.safe_load(value) == zero_stage
            except yaml.YAMLError:
                same = False
            if not same:
                raise ValueError(f"--zero-stage {zero_stage} and {text} disagree: give one of them")
            return overrides
    return overrides + [f"{ZERO_STAGE_KEY}={zero_stage}"]


def check_pretrain_batch(recipe, world_size: int) -> int:
    """The global batch must split into micro batches over the world size: the trainer's own check
    (``deepspeed_config`` raises ConfigError), run before any process starts. Returns the ZeRO stage
    the ranks will run (the DeepSpeed config file's, or ``training.zero_stage``)."""
    from sparse_pretrain.zero.config import deepspeed_config
    return deepspeed_config(recipe, world_size, use_bf16=False)["zero_optimization"].get("stage", 0)


# -- the plan: where, how many processes, which launcher, its command ---------------------------------

#: where the stage starts (``find_site``), in the terms of the module docstring's table
SITES = {
    "machine": "this machine (outside SLURM; in a batch script of one node, or for a one-process stage)",
    "hosts": "several hosts outside SLURM, started by deepspeed over ssh",
    "slurm-node": "a SLURM step with one task per node: each task starts its node's processes",
    "slurm-process": "a SLURM step with one task per process: srun started every rank",
    "srun-allocation": "a SLURM batch script or salloc shell: srun starts the ranks",
    "srun-new": "outside SLURM with --launcher srun: srun allocates the nodes and starts the ranks",
}


@dataclass(frozen=True)
class Site:
    """Where the stage's processes start and on how many nodes, found once (``find_site``)."""
    kind: str                                  # a key of SITES
    nodes: int
    slurm: Optional[Rendezvous] = None         # SLURM's rendezvous (a step or the allocation); None outside
    hosts: tuple[tuple[str, int], ...] = ()    # kind "hosts": (host, slots) of the nodes used

    def __post_init__(self):
        if self.kind not in SITES:
            raise ValueError(f"unknown site {self.kind!r} (known: {', '.join(SITES)})")

    @property
    def starts_here(self) -> bool:
        """This process starts ranks on this machine (so the GPUs asked for must be here)."""
        return self.kind in ("machine", "slurm-node", "slurm-process")


def check_request(r: LaunchRequest) -> None:
    """What the arguments alone can tell, before a recipe loads."""
    module = STAGES.get(r.stage, "?")
    if module == "?":
        raise ValueError(f"unknown stage {r.stage!r} (known: {', '.join(STAGES)})")
    if r.launcher not in LAUNCHERS:
        raise ValueError(f"--launcher: unknown {r.launcher!r} (known: {', '.join(LAUNCHERS)})")
    if r.nodes is not None and r.nodes < 1:
        raise ValueError(f"--nodes must be at least 1, got {r.nodes}")
    if r.gpus_per_node is not None and r.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node must be >= 0, got {r.gpus_per_node}")
    for option, value in (("--processes-per-node", r.processes_per_node), ("--nproc-per-node", r.nproc_per_node),
                          ("--num-processes", r.total_processes)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    if r.gpus_per_node and r.processes_per_node and r.gpus_per_node != r.processes_per_node:
        raise ValueError(f"--gpus-per-node {r.gpus_per_node} and --processes-per-node {r.processes_per_node} "
                         f"disagree: one process per GPU")
    counts = [option for option, value in (("--gpus-per-node", r.gpus_per_node), ("--processes-per-node",
              r.processes_per_node), ("--nproc-per-node", r.nproc_per_node), ("--num-processes", r.total_processes))
              if value is not None]
    if len(counts) > 1 and (r.nproc_per_node is not None or r.total_processes is not None):
        raise ValueError(f"give one of {' and '.join(counts)}: each sets the processes per node")
    if r.hosts and r.hostfile:
        raise ValueError("give --hosts or --hostfile, not both")
    if r.stage != "report" and not r.config:
        raise ValueError(f"launch {r.stage}: --config is required")
    if r.zero_stage is not None and module is None:
        raise ValueError(f"launch {r.stage}: one plain process; --zero-stage does not apply")
    if module is None and r.launcher != "auto":
        raise ValueError(f"launch {r.stage}: one plain process; --launcher does not apply")


def find_site(r: LaunchRequest, environ: Mapping[str, str]) -> Site:
    """Where the stage starts (this machine, hosts over ssh, a SLURM step or allocation) and on how
    many nodes, checked against what SLURM or the hosts given hold."""
    slurm = from_slurm({**environ, **asked_rendezvous_env(r)})     # --master-addr/--master-port win
    if slurm is None:
        if r.launcher == "srun":
            return Site("srun-new", r.nodes or 1)
        if r.hosts or r.hostfile:
            hosts = read_hostfile(r.hostfile) if r.hostfile else [(h, 0) for h in r.hosts]
            nodes = r.nodes or len(hosts)
            if nodes > len(hosts):
                raise ValueError(f"--nodes {nodes}, but only {len(hosts)} host(s) given")
            return Site("hosts", nodes, hosts=tuple(hosts[:nodes]))
        return Site("machine", _one_machine(r))
    if r.hosts or r.hostfile:
        raise ValueError("inside a SLURM job SLURM chooses the nodes: drop --hosts/--hostfile")
    if slurm.mode in ("per-node", "per-process"):
        if r.nodes is not None and r.nodes != slurm.nnodes:
            raise ValueError(f"--nodes {r.nodes}, but this SLURM step runs on {slurm.nnodes} node(s)")
        return Site("slurm-node" if slurm.mode == "per-node" else "slurm-process", slurm.nnodes, slurm)
    on_a_node = bool(environ.get("SLURMD_NODENAME"))   # the batch script; an salloc shell runs on the login node
    if r.launcher == "srun" or (STAGES[r.stage] is not None and (slurm.nnodes > 1 or not on_a_node)):
        if r.launcher not in ("auto", "srun"):     # only srun starts ranks on the nodes from here
            raise ValueError(f"--launcher {r.launcher} starts one node's processes, but this is a batch "
                             f"script or salloc shell of {slurm.nnodes} node(s): run "
                             f"`srun --ntasks-per-node=1 prune-ofa launch ...`, or use --launcher srun")
        nodes = r.nodes or slurm.nnodes
        if nodes > slurm.nnodes:
            raise ValueError(f"--nodes {nodes}, but SLURM job {slurm.job_id} holds {slurm.nnodes} node(s)")
        return Site("srun-allocation", nodes, slurm)
    return Site("machine", _one_machine(r), slurm)


def asked_rendezvous_env(r: LaunchRequest) -> dict[str, str]:
    """``--master-addr`` / ``--master-port`` as the variables every rank reads (srun passes them on)."""
    return {k: str(v) for k, v in (("MASTER_ADDR", r.master_addr), ("MASTER_PORT", r.master_port)) if v}


def _one_machine(r: LaunchRequest) -> int:
    nodes = r.nodes or 1
    if nodes > 1:
        raise ValueError(f"--nodes {nodes} outside SLURM: give the hosts (--hosts h1,h2 or --hostfile F; "
                         f"DeepSpeed starts them over ssh), or --launcher srun to let SLURM allocate them")
    return nodes


def node_has_gpus(r: LaunchRequest, site: Site, environ: Mapping[str, str], cuda_here: Callable[[], int],
                  option: str) -> bool:
    """Whether processes counted without a device (``--nproc-per-node``, ``--num-processes``) run on GPUs:
    in a SLURM job, GPUs allocated on the node (SLURM_GPUS_ON_NODE) or, where the ranks start here, this
    machine's CUDA devices; else the partition's GPUs (``--partition``); else this machine's CUDA devices
    where the ranks start here. Where none of these can tell (``--hosts``, srun from outside a job without
    ``--partition``), refused."""
    if site.slurm is not None:
        return (_slurm_gpus_on_node(environ) or 0) > 0 or (site.starts_here and cuda_here() > 0)
    if r.partition_gpus is not None:
        return r.partition_gpus > 0
    if site.starts_here:
        return cuda_here() > 0
    raise ValueError(f"{option}: whether the nodes have GPUs cannot be seen from here; give --gpus-per-node N "
                     f"(one process per GPU) or --processes-per-node N (CPU processes)")


def asked_count(r: LaunchRequest, site: Site) -> tuple[Optional[int], Optional[bool], str]:
    """(processes per node asked or None, on GPUs: True, False or None where the node decides, the option)."""
    if r.gpus_per_node:
        return r.gpus_per_node, True, "--gpus-per-node"
    if r.processes_per_node is not None:
        return r.processes_per_node, False, "--processes-per-node"
    if r.gpus_per_node == 0:
        return None, False, "--gpus-per-node"
    if r.nproc_per_node is not None:
        return r.nproc_per_node, None, "--nproc-per-node"
    if r.total_processes is not None:
        if r.total_processes % site.nodes:
            raise ValueError(f"--num-processes {r.total_processes} counts the processes of all nodes (as accelerate "
                             f"does) and does not split over {site.nodes} node(s): give --gpus-per-node or "
                             f"--processes-per-node")
        return r.total_processes // site.nodes, None, "--num-processes"
    return None, None, ""


def processes_per_node(r: LaunchRequest, site: Site, environ: Mapping[str, str],
                       cuda_here: Callable[[], int]) -> tuple[int, bool]:
    """(processes per node, on GPUs): as asked, else what srun started, the hostfile's slots, the
    node's GPUs (SLURM's, or this machine's CUDA devices), else one CPU process."""
    one_process = STAGES[r.stage] is None
    asked, on_gpus, option = asked_count(r, site)
    if site.kind == "slurm-process":           # srun started them: the count is given
        procs = site.slurm.nproc_per_node
        if asked and asked != procs:
            raise ValueError(f"srun started {procs} task(s) on this node (one per process), but {asked} "
                             f"process(es) per node were asked")
        gpu = on_gpus if on_gpus is not None else cuda_here() > 0
    elif asked is not None:
        procs = asked
        gpu = on_gpus if on_gpus is not None else (not one_process
                                                   and node_has_gpus(r, site, environ, cuda_here, option))
    elif on_gpus is False:                     # --gpus-per-node 0
        procs, gpu = 1, False
    elif site.kind == "hosts" and r.hostfile:
        procs, gpu = min(slots for _, slots in site.hosts), True
    else:   # the default: every GPU of a node, else one CPU process
        slurm_gpus = _slurm_gpus_on_node(environ) if site.slurm is not None else None
        if slurm_gpus:
            procs, gpu = slurm_gpus, True
        elif site.kind in ("machine", "slurm-node") and not one_process and cuda_here() > 0:
            procs, gpu = cuda_here(), True
        else:
            procs, gpu = 1, False
    return (1, False) if one_process else (procs, gpu)


def check_gpus(r: LaunchRequest, site: Site, procs: int, gpu: bool, cuda_here: Callable[[], int]) -> None:
    """The GPUs per node fit the partition's nodes and, where this process starts them, this machine."""
    if not gpu:
        return
    if r.partition_gpus is not None and procs > r.partition_gpus:
        raise ValueError(f"{procs} GPUs per node asked, but partition {r.partition or '?'} has "
                         + (f"{r.partition_gpus} per node" if r.partition_gpus else "no GPUs"))
    if site.starts_here and not r.dry_run:
        if cuda_here() == 0:
            raise ValueError(f"{procs} GPU(s) per node asked, but this machine has no CUDA device (CPU "
                             f"processes: --processes-per-node N; see the plan: --dry-run)")
        if cuda_here() < procs:
            raise ValueError(f"{procs} GPUs per node asked, but this machine has {cuda_here()}")


def choose_launcher(r: LaunchRequest, site: Site, world: int, gpu: bool) -> str:
    """What starts the ranks (process | torchrun | deepspeed | accelerate | srun): ``r.launcher``, or
    for ``auto`` the module docstring's table; a launcher that cannot work here is refused."""
    finetune = r.stage in ("finetune", "qat")
    if STAGES[r.stage] is None:
        return "process"
    if site.kind == "slurm-process":
        if r.launcher not in ("auto", "srun"):
            raise ValueError(f"--launcher {r.launcher}: srun already started one task per process here "
                             f"(SLURM_STEP_NUM_TASKS={site.slurm.world_size}); for {r.launcher} start one task "
                             f"per node (srun --ntasks-per-node=1)")
        return "process"
    if site.kind in ("srun-allocation", "srun-new"):   # another launcher was refused there (find_site)
        return "srun"
    if site.kind == "hosts":
        if finetune:
            raise ValueError("finetune/qat on several hosts outside SLURM is not supported: accelerate starts "
                             "one host's processes; run it under SLURM (srun one task per node)")
        if r.launcher not in ("auto", "deepspeed"):
            raise ValueError(f"--launcher {r.launcher} starts processes on this host only; several hosts outside "
                             f"SLURM go through deepspeed (ssh/pdsh)")
        return "deepspeed"
    launcher = r.launcher                      # this machine, or one task per node of a SLURM step
    if launcher == "auto":
        if world == 1:                         # one process: no launcher to start
            return "process"
        if finetune:
            return "accelerate"
        # torchrun on CPU and in SLURM (see the module docstring); deepspeed's own launcher for the GPUs
        # of one machine, what DeepSpeed users expect
        return "deepspeed" if gpu and site.kind == "machine" else "torchrun"
    if launcher == "srun":
        raise ValueError("--launcher srun: this is already one task of an srun step")
    if launcher == "accelerate" and not finetune:
        raise ValueError("--launcher accelerate is for finetune/qat; pretrain runs on DeepSpeed "
                         "(torchrun or deepspeed)")
    if launcher == "deepspeed" and finetune:
        raise ValueError("--launcher deepspeed is for pretrain; finetune/qat use accelerate (--zero-stage N "
                         "for Accelerate's DeepSpeed plugin)")
    if launcher == "torchrun" and finetune and r.zero_stage is not None:
        raise ValueError("--zero-stage needs accelerate launch (the default for finetune/qat)")
    return launcher


def site_rendezvous(r: LaunchRequest, site: Site, procs: int) -> Optional[Rendezvous]:
    """Where the ranks meet, as this node sees it (None where srun starts them: each rank reads it
    from SLURM's variables)."""
    if site.kind == "slurm-process":
        return site.slurm
    if site.kind == "slurm-node":
        return site.slurm.with_processes(procs)
    if site.kind == "hosts":
        hosts = tuple(h for h, _ in site.hosts)
        return Rendezvous(r.master_addr or hosts[0], r.master_port or DEEPSPEED_DEFAULT_PORT, site.nodes, 0, procs,
                          site.nodes * procs, mode="hosts", hosts=hosts)
    if site.kind == "machine":
        here = local(procs, port=r.master_port)
        return dataclasses.replace(here, master_addr=r.master_addr) if r.master_addr else here
    return None


# -- one command builder per launcher -----------------------------------------------------------------

def _tool(executable: str, name: str) -> str:
    """A console script of this environment (deepspeed, accelerate, prune-ofa), else the bare name."""
    path = Path(executable).parent / name
    return str(path) if path.exists() else name


def torchrun_command(executable: str, rdzv: Rendezvous, payload: list[str]) -> list[str]:
    """torchrun starting this node's ``rdzv.nproc_per_node`` processes, node ``rdzv.node_rank`` of
    ``rdzv.nnodes``."""
    return [executable, "-m", "torch.distributed.run", f"--nnodes={rdzv.nnodes}", f"--node-rank={rdzv.node_rank}",
            f"--nproc-per-node={rdzv.nproc_per_node}", f"--master-addr={rdzv.master_addr}",
            f"--master-port={rdzv.master_port}", *payload]


def deepspeed_command(executable: str, rdzv: Rendezvous, payload: list[str],
                      hostfile: Optional[str] = None) -> tuple[list[str], dict[str, str]]:
    """deepspeed's launcher and the hostfile it needs where none is given (path -> text): this
    machine's GPUs; several hosts over ssh (``rdzv.mode == "hosts"``); or one node of a SLURM step,
    where every node starts its own processes (no ssh, a hostfile each node writes for itself)."""
    tool, procs, module = _tool(executable, "deepspeed"), rdzv.nproc_per_node, ["--module", *payload[1:]]
    if rdzv.mode != "hosts" and rdzv.nnodes == 1:
        return [tool, f"--num_gpus={procs}", f"--master_addr={rdzv.master_addr}",
                f"--master_port={rdzv.master_port}", *module], {}
    files = {}
    if hostfile is None:
        text = hostfile_text(rdzv.hosts, procs)
        hostfile = hostfile_path(text)
        files = {hostfile: text}
    if rdzv.mode == "hosts":
        return [tool, "--hostfile", hostfile, "--num_nodes", str(rdzv.nnodes), "--num_gpus", str(procs),
                "--master_addr", rdzv.master_addr, "--master_port", str(rdzv.master_port), *module], files
    return [tool, "--hostfile", hostfile, "--no_ssh", f"--node_rank={rdzv.node_rank}",
            f"--master_addr={rdzv.master_addr}", f"--master_port={rdzv.master_port}", *module], files


def accelerate_command(executable: str, rdzv: Rendezvous, payload: list[str], zero_stage: Optional[int]) -> list[str]:
    """``accelerate launch`` of this node's processes: DDP, or Accelerate's DeepSpeed plugin at
    ``zero_stage``; on several machines torchrun on each node (no pdsh)."""
    multi = rdzv.nnodes > 1
    argv = [_tool(executable, "accelerate"), "launch"]
    if zero_stage is not None:
        argv += ["--use_deepspeed", f"--zero_stage={zero_stage}"]
        argv += ["--deepspeed_multinode_launcher=standard"] if multi else []
    elif rdzv.world_size > 1:
        argv += ["--multi_gpu"]
    argv += [f"--num_processes={rdzv.world_size}", f"--num_machines={rdzv.nnodes}"]
    if multi:
        argv += [f"--machine_rank={rdzv.node_rank}", f"--main_process_ip={rdzv.master_addr}", "--same_network"]
    # --mixed_precision only sets ACCELERATE_MIXED_PRECISION (given, accelerate launch neither warns nor takes
    # a default from the user's `accelerate config` file). The recipe's training.precision decides: the trainer
    # passes it to Accelerator(mixed_precision=...), which Accelerate prefers to that variable (AcceleratorState
    # reads the variable only when the argument is None; tests/unit/finetune/test_finetune_precision.py)
    return argv + [f"--main_process_port={rdzv.master_port}", "--mixed_precision=no", "--dynamo_backend=no",
                   *payload]


def srun_cpus_per_task(environ: Mapping[str, str], procs: int, in_job: bool,
                       partition_cpus: Optional[int]) -> tuple[Optional[int], Optional[str]]:
    """(srun's --cpus-per-task, or None and a note saying why not). srun 22.05+ does not inherit the
    job's --cpus-per-task, and a task without it gets SLURM's default (often one CPU, so every
    tokenizer and dataloader thread of a rank shares it): the node's CPUs (SLURM_CPUS_ON_NODE, or
    outside a job the partition's, from sinfo) shared out over its tasks, else the job's
    SLURM_CPUS_PER_TASK; with neither it does not guess."""
    on_node = _int_env(environ, "SLURM_CPUS_ON_NODE") if in_job else partition_cpus
    if on_node:
        return max(1, on_node // procs), None
    per_task = _int_env(environ, "SLURM_CPUS_PER_TASK") if in_job else None
    if per_task:
        return per_task, None
    unknown = ("neither SLURM_CPUS_ON_NODE nor SLURM_CPUS_PER_TASK is set" if in_job else
               "the nodes' CPUs are not known (give --partition, whose CPUs sinfo reports)")
    return None, (f"srun gets no --cpus-per-task: {unknown}; each task gets SLURM's default CPUs (often 1): "
                  f"submit with --cpus-per-task, or run srun yourself")


def srun_command(executable: str, payload: list[str], nodes: int, procs: int, gpu: bool,
                 cpus_per_task: Optional[int] = None, partition: Optional[str] = None) -> list[str]:
    """srun starting every rank, ``procs`` tasks on each of ``nodes`` nodes; each becomes a rank from
    SLURM's variables (``sparse_pretrain.runtime.rendezvous.export_torch_env``)."""
    argv = ["srun", f"--nodes={nodes}", f"--ntasks-per-node={procs}", f"--ntasks={nodes * procs}",
            "--kill-on-bad-exit=1"]
    if cpus_per_task:
        argv.append(f"--cpus-per-task={cpus_per_task}")
    if partition:
        argv.append(f"--partition={partition}")
    if gpu:
        argv.append(f"--gres=gpu:{procs}")
    return argv + [executable, *payload]


def accelerate_env(stage: str, zero_stage: Optional[int], gpu: bool) -> dict[str, str]:
    """What Accelerate reads from the environment in every process of a finetune/qat stage."""
    if stage not in ("finetune", "qat"):
        return {}
    if zero_stage is not None:
        return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(zero_stage)}
    return {} if gpu else {"ACCELERATE_USE_CPU": "true"}    # else Accelerate on CPU sees one process each


def build_plan(request: LaunchRequest, environ: Optional[Mapping[str, str]] = None,
               cuda_devices: Optional[int] = None, executable: str = sys.executable) -> LaunchPlan:
    """The command that runs ``request`` here, checked; raises ValueError (ConfigError) before anything
    runs. ``environ``: default os.environ, read at call time. ``cuda_devices``: CUDA devices of this
    machine (None: ask torch when it matters)."""
    environ = os.environ if environ is None else environ
    r = request
    check_request(r)
    cuda_here = functools.cache(lambda: _cuda_devices() if cuda_devices is None else cuda_devices)
    stage, module = r.stage, STAGES[r.stage]
    overrides = list(r.overrides) + (["qat.enabled=true"] if stage == "qat" else [])
    if stage == "pretrain":
        overrides = with_zero_stage(overrides, r.zero_stage)
    config_path = os.path.abspath(r.config) if r.config else None
    recipe, config = _effective_config(stage, config_path, overrides)

    site = find_site(r, environ)
    procs, gpu = processes_per_node(r, site, environ, cuda_here)
    check_gpus(r, site, procs, gpu, cuda_here)
    nodes, world = site.nodes, site.nodes * procs
    zero_stage = check_pretrain_batch(recipe, world) if stage == "pretrain" else r.zero_stage
    launcher = choose_launcher(r, site, world, gpu)
    notes = []
    _, _, counted_by = asked_count(r, site)
    if counted_by in ("--nproc-per-node", "--num-processes") and module is not None:
        value = r.nproc_per_node if counted_by == "--nproc-per-node" else r.total_processes
        notes.append(f"{counted_by} {value}: {procs} process(es) per node on "
                     + (f"GPUs, as --gpus-per-node {procs}" if gpu else
                        f"CPUs (no GPU seen for them), as --processes-per-node {procs}"))

    plan = functools.partial(LaunchPlan, stage=stage, config=config, launcher=launcher, nodes=nodes,
                             processes_per_node=procs, gpu=gpu, recipe=recipe, zero_stage=zero_stage, notes=notes)
    if module is None:
        return plan(**_one_process_stage(stage, config_path, overrides, site.slurm, executable))
    payload = ["-m", module, "--config", config_path] + overrides
    env = accelerate_env(stage, r.zero_stage, gpu)
    rdzv = site_rendezvous(r, site, procs)
    device = f"{procs} GPU(s)" if gpu else f"{procs} CPU process(es)"
    files: dict[str, str] = {}
    if site.kind == "slurm-process":
        return plan(argv=[executable, *payload], env={**rdzv.torch_env(), **env}, rendezvous=rdzv,
                    description=f"{stage}: rank {rdzv.rank} of {rdzv.world_size} (srun started every process), "
                                f"rendezvous {rdzv.master_addr}:{rdzv.master_port}")
    if launcher == "srun":
        in_job = site.kind == "srun-allocation"
        cpus, note = srun_cpus_per_task(environ, procs, in_job, r.partition_cpus)
        argv = srun_command(executable, payload, nodes, procs, gpu, cpus_per_task=cpus,
                            partition=None if in_job else r.partition)
        return plan(argv=argv, env={**asked_rendezvous_env(r), **env}, notes=notes + ([note] if note else []),
                    description=(f"{stage}: srun starts {world} task(s), {procs} per node on {nodes} node(s); each "
                                 f"becomes a rank from SLURM's variables "
                                 f"(sparse_pretrain.runtime.rendezvous.export_torch_env)"))
    if launcher == "process":
        argv = [executable, *payload]
    elif launcher == "torchrun":
        argv = torchrun_command(executable, rdzv, payload)
    elif launcher == "deepspeed":
        argv, files = deepspeed_command(executable, rdzv, payload,
                                        hostfile=os.path.abspath(r.hostfile) if r.hostfile else None)
    else:
        if r.master_addr and rdzv.nnodes == 1:
            raise ValueError("--master-addr: accelerate launch on one machine meets on 127.0.0.1 and takes an "
                             "address only for several machines; drop it")
        argv = accelerate_command(executable, rdzv, payload, r.zero_stage)
    if site.kind == "hosts":
        hosts = ", ".join(rdzv.hosts)
        description = f"{stage}: {device} on each of {nodes} host(s) ({hosts}), started by deepspeed over ssh"
    else:
        where = (f"node {rdzv.node_rank} of {rdzv.nnodes} (SLURM job {rdzv.job_id})" if site.kind == "slurm-node"
                 else "this machine")
        description = (f"{stage}: {device} on {where}, world size {world}, via {launcher}, "
                       f"rendezvous {rdzv.master_addr}:{rdzv.master_port}")
    return plan(argv=argv, env=env, files=files, rendezvous=rdzv, description=description)


def _one_process_stage(stage: str, config_path: Optional[str], overrides: list[str],
                       slurm: Optional[Rendezvous], executable: str) -> dict:
    """prepare-data and report: one plain ``prune-ofa`` process, once per job (on node rank 0 / rank 0
    of a SLURM step, nothing elsewhere)."""
    first = slurm is None or slurm.mode == "allocation" or (slurm.node_rank == 0 and (slurm.rank or 0) == 0)
    if not first:
        return dict(argv=[], env={}, rendezvous=slurm, description=(
            f"{stage} runs once, on node rank 0 / rank 0; nothing to do on node rank {slurm.node_rank}"
            + (f", rank {slurm.rank}" if slurm.rank is not None else "")))
    tool = _tool(executable, "prune-ofa")
    argv = [tool, stage, "--config", config_path, *overrides] if stage == "prepare-data" else [tool, stage, *overrides]
    return dict(argv=argv, env={}, rendezvous=slurm, description=f"{stage}: one process on this machine")


#: launchers that turn a rank's exit code into their own (1) and print a report of their own after it;
#: ``run`` starts them as a child and keeps the first failing rank's message and code instead
RANK_WRAPPING_LAUNCHERS = ("torchrun", "deepspeed", "accelerate")
#: signals a child launcher gets from ``prune-ofa launch`` as it would if it had replaced it (exec)
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


def write_files(plan: LaunchPlan) -> list[str]:
    """Write the files the plan's command reads (a generated hostfile) where the command says; a dry
    run writes them too, so the printed command runs as it is. Returns their paths."""
    for path, text in plan.files.items():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return sorted(plan.files)


def run(plan: LaunchPlan, replace_process: bool = True) -> int:
    """Write the plan's files and run its command.

    One process or srun: in place of this process (the default; exit code and signals reach the job
    directly), or as a child whose exit code is returned. torchrun, deepspeed and accelerate: always
    as a child (``run_watching_ranks``), because they report a rank's exit code 2 as their own 1 after
    a 30-line ChildFailedError: the first rank that fails with a user error records its one-line
    message in a failure file, and this process prints it once and exits with its code."""
    write_files(plan)
    for line in plan.notes:
        print(f"prune-ofa launch: note: {line}", file=sys.stderr)
    if not plan.argv:
        print(f"prune-ofa launch: {plan.description}", file=sys.stderr)
        return 0
    print(f"prune-ofa launch: {plan.description}\n  {plan.command_line()}", file=sys.stderr, flush=True)
    env = {**os.environ, **plan.env}
    if plan.launcher in RANK_WRAPPING_LAUNCHERS:
        return run_watching_ranks(plan.argv, env, f"prune-ofa launch {plan.stage}")
    if replace_process:
        sys.stdout.flush()
        os.execvpe(plan.argv[0], plan.argv, env)
    code = subprocess.run(plan.argv, env=env).returncode
    return code if code >= 0 else 128 - code


def run_watching_ranks(argv: Sequence[str], env: Mapping[str, str], prog: str) -> int:
    """Run a launcher as a child that behaves, for signals and the exit code, as if it had replaced
    this process, except that a rank's user error comes back as its one line and its exit code.

    * The ranks see ``PRUNE_OFA_FAILURE_FILE`` (a file in a private temporary directory); the first
      one that fails with a user error writes its message and exit code there
      (``sparse_pretrain.runtime.errors.report_user_error``) and prints nothing.
    * The launcher's stderr (and the ranks', which inherit it) is passed through as it comes, until
      the failing rank's sentinel line (``FAILURE_SENTINEL``, written right after it recorded the
      failure): what follows is the consequence (other ranks torn down, the launcher's
      ChildFailedError report) and is dropped; what came before, in the pipe's order, is kept.
      ``PRUNE_OFA_DEBUG=1`` keeps everything. stdout is untouched.
    * Exit code: the recorded one when a rank recorded a user error, else the launcher's own
      (128 + N for a signal N, as a shell reports it).
    * Signals. Outside SLURM the child gets a process group of its own and this process forwards
      SIGINT, SIGTERM, SIGUSR1 and SIGHUP to it: whether they are sent to this PID (``kill``,
      ``timeout``) or to the terminal's foreground group (Ctrl-C), the launcher receives each exactly
      once, as it did when it replaced this process. Inside a SLURM job (a step, or the batch script)
      SLURM signals every process of the job itself (scancel, the time limit, srun's forwarding:
      proctrack signals the whole cgroup, process tree or process group), so the child stays in this
      process group and nothing is forwarded, which would deliver each signal twice (a second SIGTERM
      ends a rank at once, before its preemption checkpoint); this process only outlives the signal
      to collect the exit code. (Signal the job there, ``scancel --signal``, not this PID.)
    """
    import select
    import tempfile

    from sparse_pretrain.runtime.errors import FAILURE_FILE_ENV, FAILURE_SENTINEL, debug, print_user_error, read_failure
    in_slurm_job = bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))
    with tempfile.TemporaryDirectory(prefix="prune-ofa-launch-") as tmp:
        failure_file = Path(tmp) / "failure.json"
        child_env = {**env, FAILURE_FILE_ENV: str(failure_file)}
        if debug():
            child_env.pop(FAILURE_FILE_ENV)
        group = {} if in_slurm_job else ({"process_group": 0} if sys.version_info >= (3, 11)
                                          else {"preexec_fn": os.setpgrp})
        sys.stdout.flush()
        sys.stderr.flush()
        child = subprocess.Popen(list(argv), env=child_env, stderr=subprocess.PIPE, **group)

        def on_signal(signum, frame):
            if not in_slurm_job:
                try:
                    os.kill(child.pid, signum)
                except ProcessLookupError:
                    pass
        previous = {s: signal.signal(s, on_signal) for s in FORWARDED_SIGNALS}
        keep_all, out = debug(), getattr(sys.stderr, "buffer", None)
        try:
            stream, dropping, ended_line, pending = child.stderr.fileno(), False, True, b""

            def forward(chunk: bytes) -> None:
                if out is not None:
                    out.write(chunk)
                    out.flush()
                else:
                    sys.stderr.write(chunk.decode(errors="replace"))
                    sys.stderr.flush()
            while True:
                ready, _, _ = select.select([stream], [], [], 0.5)
                if not ready:
                    if child.poll() is not None:
                        break                          # exited; a rank it left behind may hold the pipe
                    continue
                chunk = os.read(stream, 1 << 16)
                if not chunk:
                    break
                if dropping:
                    continue
                tail, cut = pending + chunk, -1
                if not keep_all:                       # the sentinel may straddle two reads
                    cut = tail.find(FAILURE_SENTINEL)
                if cut >= 0:                           # a rank recorded its failure: what came before
                    dropping = True                    # is kept, the consequences are dropped
                    kept = tail[:cut]
                    if kept:
                        forward(kept)
                        ended_line = kept.endswith(b"\n")
                    if not ended_line:                 # a line cut by the drop: end it here
                        forward(b"\n")
                    continue
                # hold back the longest end of the stream that could start a sentinel; forward the rest
                hold = 0 if keep_all else next((n for n in range(min(len(tail), len(FAILURE_SENTINEL) - 1), 0, -1)
                                                if FAILURE_SENTINEL.startswith(tail[-n:])), 0)
                keep = len(tail) - hold
                if keep > 0:
                    forward(tail[:keep])
                    ended_line = tail[:keep].endswith(b"\n")
                pending = tail[keep:]
            if pending and not dropping:
                forward(pending)
            code = child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            child.stderr.close()
        failure = read_failure(failure_file)
    if failure is not None:
        code = int(failure.get("code", 2))
        print_user_error(f"{prog}: {failure['message']}", code)
        return code
    return code if code >= 0 else 128 - code
