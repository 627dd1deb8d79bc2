"""Pipeline specs (``configs/pipelines/*.yaml``): the stages of Prune OFA as SLURM jobs.

A spec names the stages (prepare-data, teacher preparation, student pruning, task teacher, transfer,
QAT, report), the recipe and overrides of each, what each waits for (``after``) and its resources
(``slurm:`` defaults, overridden per stage). Stages hand over directories: every stage writes under
``output_root/<stage>`` (the pipeline sets ``training.output_dir``), and a value ``@<stage>/<path>``
in a stage's overrides or report arguments is ``output_root/<stage>/<path>`` of an upstream stage::

    student:
      kind: pretrain
      config: configs/minilm-l6-85.yaml
      after: [teacher]
      overrides: {model.name_or_path: "@teacher/model", model.teacher_name_or_path: "@teacher/model"}

:func:`load_pipeline` validates everything it can before a job is queued (unknown keys, unknown or
missing upstream stages, cycles, recipes that do not load, resource requests the partition or the
launcher cannot satisfy) and raises :class:`PipelineError` naming the stage and key.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

KINDS = ("prepare-data", "pretrain", "finetune", "qat", "report")
TRAINING_KINDS = ("pretrain", "finetune", "qat")          # long runs: checkpoint, requeue on preemption
REPORT_ARGS = ("model", "int8", "metrics", "baseline")    # prune-ofa report MODEL --int8 --metrics --baseline
RESERVED = ("slurm", "logs")                              # subdirectories of output_root the pipeline uses
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
REFERENCE = re.compile(r"@([A-Za-z0-9][A-Za-z0-9_.-]*)(/.*)?")


class PipelineError(ValueError):
    """A pipeline spec is invalid; the message names the stage and key."""


@dataclass
class Resources:
    """The ``slurm:`` section: spec-wide defaults, each key overridable per stage."""
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None               # SLURM time limit, e.g. "2-00:00:00" (default: the partition's)
    nodes: int = 1
    gpus_per_node: int = 0                   # 0: a CPU job with processes_per_node processes per node
    processes_per_node: Optional[int] = None  # CPU nodes (default 1); with GPUs one process per GPU
    cpus_per_task: Optional[int] = None      # CPUs of the one task per node (default: one per process)
    mem: Optional[str] = None                # --mem per node, e.g. "64G"
    signal_seconds: int = 300                # USR1 this long before the time limit: checkpoint, requeue
    requeue: Optional[bool] = None           # default: true for pretrain/finetune/qat, false otherwise
    launcher: str = "auto"                   # prune-ofa launch --launcher
    setup: Optional[Any] = None              # line(s) before the run (default: activate this venv)
    env: dict = field(default_factory=dict)  # exported variables
    extra: list = field(default_factory=list)  # more #SBATCH options, e.g. ["--exclusive", "--constraint=a100"]
    partition_gpus: Optional[int] = None     # GPUs per node of the partition (default: asked from sinfo)

    @property
    def local_processes(self) -> int:
        return self.gpus_per_node or self.processes_per_node or 1

    @property
    def cpus(self) -> int:
        return self.cpus_per_task or self.local_processes

    def setup_lines(self) -> list[str]:
        if self.setup is None:
            if sys.prefix != sys.base_prefix:          # the virtualenv this command runs in
                return [f"source {Path(sys.prefix).resolve() / 'bin' / 'activate'}"]
            return []
        return [self.setup] if isinstance(self.setup, str) else list(self.setup)


@dataclass
class Stage:
    name: str
    kind: str
    config: Optional[Path]                   # the recipe (absolute); None for report
    overrides: dict                          # key -> value, references resolved, output_dir included
    after: list                              # upstream stage names
    resources: Resources
    output_dir: Path
    report: dict = field(default_factory=dict)   # report: model, int8, metrics, baseline (absolute)

    @property
    def requeue(self) -> bool:
        return self.kind in TRAINING_KINDS if self.resources.requeue is None else self.resources.requeue

    def override_args(self) -> list[str]:
        """The overrides as ``key=value`` arguments (values written so that YAML reads them back)."""
        return [f"{key}={cli_value(value)}" for key, value in self.overrides.items()]


@dataclass
class Pipeline:
    name: str
    spec: Path
    output_root: Path
    workdir: Path                            # where the jobs run: recipes' relative paths resolve here
    stages: dict                             # name -> Stage, in submission (topological) order

    @property
    def slurm_dir(self) -> Path:
        return self.output_root / "slurm"

    @property
    def log_dir(self) -> Path:
        return self.output_root / "logs"


def cli_value(value: Any) -> str:
    """A value as the right-hand side of a ``key=value`` override: plain strings as they are, other
    values in YAML flow style (``[a, b]``, ``0.0001``, ``true``)."""
    if isinstance(value, str) and value and "\n" not in value:
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    text = yaml.safe_dump(value, default_flow_style=True, width=2 ** 31)
    return text.removesuffix("\n...\n").strip()


# -- loading --------------------------------------------------------------------------------------

SPEC_KEYS = ("name", "output_root", "workdir", "slurm", "stages")
STAGE_KEYS = ("kind", "config", "overrides", "after", "slurm", "report")


def load_pipeline(path: str | Path, check_partition: bool = True) -> Pipeline:
    """Read and validate a pipeline spec. Relative paths (``output_root``, ``workdir``, recipes) are
    resolved against the current directory, so rendered scripts hold absolute paths only.
    ``check_partition``: ask ``sinfo`` how many GPUs the partition's nodes have where the spec does
    not say (``partition_gpus``); skipped when SLURM cannot be reached."""
    spec_path = Path(path).resolve()
    if not spec_path.is_file():
        raise PipelineError(f"pipeline: no such file {str(path)!r}")
    try:
        spec = yaml.safe_load(spec_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PipelineError(f"pipeline: {path} is not valid YAML ({err})") from None
    if not isinstance(spec, dict):
        raise PipelineError(f"pipeline: {path} must hold a mapping")
    _known(spec, SPEC_KEYS, "")
    for key in ("name", "output_root", "stages"):
        if not spec.get(key):
            raise PipelineError(f"{key}: must be set")
    name = str(spec["name"])
    if not STAGE_NAME.fullmatch(name):
        raise PipelineError(f"name: {name!r} must be letters, digits, '.', '_' or '-'")
    workdir = Path(spec.get("workdir") or ".").expanduser().resolve()
    output_root = (workdir / Path(spec["output_root"]).expanduser()).resolve()
    defaults = _resources(spec.get("slurm") or {}, "slurm", Resources())
    raw_stages = spec["stages"]
    if not isinstance(raw_stages, dict):
        raise PipelineError("stages: must be a mapping of stage name -> stage")

    stages = {}
    for stage_name, raw in raw_stages.items():
        stage_name = str(stage_name)
        if not STAGE_NAME.fullmatch(stage_name) or stage_name in RESERVED:
            raise PipelineError(f"stages.{stage_name}: a stage name must be letters, digits, '.', '_' or '-' "
                                f"and not {' or '.join(RESERVED)}")
        if not isinstance(raw, dict):
            raise PipelineError(f"stages.{stage_name}: must be a mapping (kind, config, overrides, after, slurm)")
        stages[stage_name] = _stage(stage_name, raw, defaults, workdir, output_root)
    order = topological_order({s.name: s.after for s in stages.values()})
    stages = {n: stages[n] for n in order}
    _resolve_references(stages, output_root)
    pipeline = Pipeline(name=name, spec=spec_path, output_root=output_root, workdir=workdir, stages=stages)
    for stage in stages.values():
        check_stage(stage, check_partition)
    return pipeline


def _known(mapping: dict, keys, where: str) -> None:
    for key in mapping:
        if key not in keys:
            raise PipelineError(f"{where}{key}: unknown key (known: {', '.join(keys)})")


def _resources(raw: dict, where: str, base: Resources) -> Resources:
    if not isinstance(raw, dict):
        raise PipelineError(f"{where}: must be a mapping")
    known = {f.name: f for f in dataclasses.fields(Resources)}
    _known(raw, list(known), f"{where}.")
    merged = dataclasses.replace(base, **raw)
    if "env" in raw:
        merged.env = {**base.env, **(raw["env"] or {})}
    for key in ("nodes", "gpus_per_node", "processes_per_node", "cpus_per_task", "signal_seconds",
                "partition_gpus"):
        value = getattr(merged, key)
        minimum = 1 if key in ("nodes", "processes_per_node", "cpus_per_task") else 0
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise PipelineError(f"{where}.{key}: must be an integer >= {minimum}, got {value!r}")
    if merged.gpus_per_node and merged.processes_per_node not in (None, merged.gpus_per_node):
        raise PipelineError(f"{where}.processes_per_node: one process per GPU; with gpus_per_node="
                            f"{merged.gpus_per_node} leave it unset")
    if not isinstance(merged.extra, list) or not all(isinstance(x, str) for x in merged.extra):
        raise PipelineError(f"{where}.extra: must be a list of sbatch options, e.g. ['--exclusive']")
    if not isinstance(merged.env, dict):
        raise PipelineError(f"{where}.env: must be a mapping NAME: value")
    for key in merged.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)):
            raise PipelineError(f"{where}.env: {key!r} is not a variable name")
    if merged.time is not None:
        seconds = time_limit_seconds(str(merged.time))
        if seconds is None:
            raise PipelineError(f"{where}.time: {merged.time!r} is not a SLURM time (minutes, HH:MM:SS, D-HH:MM:SS)")
        if merged.signal_seconds >= seconds:
            raise PipelineError(f"{where}.signal_seconds: the warning ({merged.signal_seconds} s) must come "
                                f"before the time limit ({merged.time})")
    if merged.signal_seconds > 65535:
        raise PipelineError(f"{where}.signal_seconds: SLURM allows at most 65535, got {merged.signal_seconds}")
    return merged


def time_limit_seconds(text: str) -> Optional[int]:
    """SLURM's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; None if not one of them."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        return None
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:
        return a * 3600 + b * 60 + c
    return a * 60 + (b or 0)


def _stage(name: str, raw: dict, defaults: Resources, workdir: Path, output_root: Path) -> Stage:
    where = f"stages.{name}"
    _known(raw, STAGE_KEYS, f"{where}.")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise PipelineError(f"{where}.kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    after = raw.get("after") or []
    if isinstance(after, str):
        after = [after]
    if not isinstance(after, list):
        raise PipelineError(f"{where}.after: must be a list of stage names")
    resources = _resources(raw.get("slurm") or {}, f"{where}.slurm", defaults)
    output_dir = output_root / name
    config, overrides, report = None, {}, {}
    if kind == "report":
        for key in ("config", "overrides"):
            if key in raw:
                raise PipelineError(f"{where}.{key}: a report stage takes report: {{{', '.join(REPORT_ARGS)}}}")
        report = raw.get("report") or {}
        if not isinstance(report, dict):
            raise PipelineError(f"{where}.report: must be a mapping ({', '.join(REPORT_ARGS)})")
        _known(report, REPORT_ARGS, f"{where}.report.")
        if not report.get("model"):
            raise PipelineError(f"{where}.report.model: must be set (the model directory to report on)")
        report = {k: v for k, v in report.items() if v}
    else:
        if "report" in raw:
            raise PipelineError(f"{where}.report: only for kind: report")
        if not raw.get("config"):
            raise PipelineError(f"{where}.config: must be set (a recipe, e.g. configs/minilm-l6-85.yaml)")
        config = (workdir / Path(str(raw["config"])).expanduser()).resolve()
        if not config.is_file():
            raise PipelineError(f"{where}.config: no such recipe {str(raw['config'])!r} (looked in {workdir})")
        overrides = raw.get("overrides") or {}
        if isinstance(overrides, list):        # ["key=value", ...] as on the command line
            pairs = [str(o).split("=", 1) for o in overrides]
            if any(len(p) != 2 for p in pairs):
                raise PipelineError(f"{where}.overrides: expected key=value items or a mapping")
            overrides = {k.strip(): yaml.safe_load(v) if v else "" for k, v in pairs}
        if not isinstance(overrides, dict):
            raise PipelineError(f"{where}.overrides: must be a mapping key: value")
        overrides = {str(k): v for k, v in overrides.items()}
        if kind in TRAINING_KINDS:
            if "training.output_dir" in overrides:
                raise PipelineError(f"{where}.overrides.training.output_dir: set by the pipeline "
                                    f"({output_dir}); change output_root instead")
            overrides["training.output_dir"] = str(output_dir)
    return Stage(name=name, kind=kind, config=config, overrides=overrides, after=[str(a) for a in after],
                 resources=resources, output_dir=output_dir, report=report)


def topological_order(after: dict[str, list[str]]) -> list[str]:
    """Stages in an order where each comes after its upstream stages (spec order where free);
    raises for an unknown upstream stage and for a cycle, naming it."""
    for name, ups in after.items():
        for up in ups:
            if up not in after:
                raise PipelineError(f"stages.{name}.after: unknown stage {up!r} (stages: {', '.join(after)})")
            if up == name:
                raise PipelineError(f"stages.{name}.after: a stage cannot wait for itself")
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name):] + [name]
            raise PipelineError(f"stages: cycle {' -> '.join(cycle)} (each waits for the next via after)")
        state[name] = "visiting"
        for up in after[name]:
            visit(up, path + [name])
        state[name] = "done"
        order.append(name)

    for name in after:
        visit(name, [])
    return order


def _resolve_references(stages: dict[str, Stage], output_root: Path) -> None:
    """``@stage/path`` -> ``output_root/stage/path``; the stage must be upstream (``after``)."""
    upstream: dict[str, set[str]] = {}
    for stage in stages.values():                         # topological order: upstream sets are ready
        upstream[stage.name] = set(stage.after).union(*(upstream[a] for a in stage.after))

    def resolve(stage: Stage, key: str, value: Any) -> Any:
        if not isinstance(value, str) or not value.startswith("@"):
            return value
        match = REFERENCE.fullmatch(value)
        if not match or match.group(1) not in stages:
            raise PipelineError(f"stages.{stage.name}.{key}: {value!r} names no stage "
                                f"(@<stage>/<path>; stages: {', '.join(stages)})")
        ref = match.group(1)
        if ref not in upstream[stage.name]:
            raise PipelineError(f"stages.{stage.name}.{key}: uses {ref}'s output but does not run after it; "
                                f"add {ref} to stages.{stage.name}.after")
        return str(output_root / ref / (match.group(2) or "/").lstrip("/")).rstrip("/")

    for stage in stages.values():
        stage.overrides = {k: resolve(stage, f"overrides.{k}", v) for k, v in stage.overrides.items()}
        stage.report = {k: resolve(stage, f"report.{k}", v) for k, v in stage.report.items()}


# -- checks before anything is queued ------------------------------------------------------------

def check_stage(stage: Stage, check_partition: bool = True) -> None:
    """Ask the launcher to plan the stage as its job will run it, on node 0 of its allocation: the
    recipe loads with the overrides, the GPUs per node fit the partition (``partition_gpus``, else
    ``sinfo``), the global batch splits over the world size, the launcher suits the stage. Nothing
    runs; a problem raises :class:`PipelineError` naming the stage."""
    from .launch import LaunchRequest, build_plan
    r = stage.resources
    if stage.kind in ("prepare-data", "report") and r.nodes > 1:
        raise PipelineError(f"stages.{stage.name}.slurm.nodes: {stage.kind} runs on one node, got {r.nodes}")
    if stage.kind == "report":
        return
    partition_gpus = r.partition_gpus
    if partition_gpus is None and r.gpus_per_node and r.partition and check_partition:
        partition_gpus = _sinfo_gpus(r.partition)      # None where sinfo cannot say
    request = LaunchRequest(stage=stage.kind, config=str(stage.config), overrides=stage.override_args(),
                            nodes=r.nodes, gpus_per_node=r.gpus_per_node or None,
                            processes_per_node=None if r.gpus_per_node else r.local_processes,
                            launcher=r.launcher, partition=r.partition, partition_gpus=partition_gpus,
                            dry_run=True)
    try:
        build_plan(request, environ=_job_environment(stage), cuda_devices=r.gpus_per_node)
    except ValueError as err:      # ConfigError included
        recipe = f" {stage.config.name}:" if stage.config else ""
        raise PipelineError(f"stage {stage.name} ({stage.kind}):{recipe} {err}") from None


@functools.lru_cache(maxsize=None)
def _sinfo_gpus(partition: str):
    from .launch import partition_gpus
    return partition_gpus(partition)


def _job_environment(stage: Stage) -> dict[str, str]:
    """SLURM's variables in the stage's step (one task per node, node 0), as ``prune-ofa launch`` will
    see them; the rendezvous address is a placeholder (nothing connects)."""
    n = stage.resources.nodes
    env = {"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0", "SLURM_NODEID": "0", "SLURM_STEP_NUM_NODES": str(n),
           "SLURM_STEP_NUM_TASKS": str(n), "SLURM_STEP_NODELIST": ",".join(f"node{i}" for i in range(n)),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "SLURMD_NODENAME": "node0"}
    if stage.resources.gpus_per_node:
        env["SLURM_GPUS_ON_NODE"] = str(stage.resources.gpus_per_node)
    return env
