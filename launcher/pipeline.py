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

:func:`load_pipeline` validates everything it can before a job is queued and raises
:class:`PipelineError` naming the dotted key (``stages.teacher.slurm.gpus_per_node: ...``). The spec
as written is a declarative schema (:class:`PipelineSpec`, :class:`StageSpec`, :class:`Resources`,
in the terms of :mod:`sparse_pretrain.runtime.schema`: unknown keys, types, ranges, rules between keys); a
stage's ``slurm`` keys are validated as :class:`Resources` once merged over the spec's defaults.
What needs the other stages or the file system comes next: unknown or missing upstream stages,
cycles, references, recipes that do not load, requests the partition or the launcher cannot satisfy.

Resource classes and cluster profiles. A stage may name a class instead of writing its resources
(``slurm: {class: pretrain, nodes: 4}``): the pipeline's ``classes:`` say what the work needs (GPUs per
node, the launcher), a cluster profile's (``--cluster FILE``, :mod:`launcher.cluster`) what the class is on
the site (partition, time limit, memory, ...). A stage's resources, later layers winning, ``env`` merged
name by name (:func:`stage_resources`): the profile's keys for every job (account, setup, env, HF_HOME,
the offline variables), the spec's ``slurm:``, the pipeline's class, the profile's class, the stage's own
keys; GPU stages add the profile's NCCL variables under their own ``env``. With a profile that has a
``scratch``, a relative ``output_root`` and the prepared data (``data.cache_dir``) go there. A spec
without classes, loaded without a profile, renders as it always did.

Task chains. ``tasks: [squad, mnli]`` and ``task_stages:`` (stages whose names, and every string in
them, hold ``{task}``) add one chain per task after ``stages:``; ``load_pipeline(tasks=[...])`` picks
some of them (``prune-ofa submit --tasks``), by default all::

    task_stages:
      "{task}-transfer":
        kind: finetune
        config: configs/finetune/{task}-transfer.yaml
        after: [student, "{task}-teacher"]
"""
from __future__ import annotations

import functools
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional, Sequence

import yaml
from pydantic import BeforeValidator, Field, Strict, StrictInt, field_validator, model_validator

from launcher.launch import LAUNCHERS
from sparse_pretrain.runtime.recipe_files import read_yaml_tree
from sparse_pretrain.runtime.schema import Flag, NonNegativeInt, Section, Text, rule, validated

if TYPE_CHECKING:
    from launcher.cluster import ClusterProfile

KINDS = ("prepare-data", "pretrain", "finetune", "qat", "report")
TRAINING_KINDS = ("pretrain", "finetune", "qat")          # long runs: checkpoint, requeue on preemption
REPORT_ARGS = ("model", "int8", "metrics", "baseline")    # prune-ofa report MODEL --int8 --metrics --baseline
RESERVED = ("slurm", "logs")                              # subdirectories of output_root the pipeline uses
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
REFERENCE = re.compile(r"@([A-Za-z0-9][A-Za-z0-9_.-]*)(/.*)?")
TASK = "{task}"                                           # in task_stages: the task's name
PIPELINES = Path(__file__).resolve().parent.parent / "configs" / "pipelines"   # shipped: --pipeline NAME
PREPARED_DATA_KINDS = ("prepare-data", "pretrain")        # stages that read or write data.cache_dir


class PipelineError(ValueError):
    """A pipeline spec is invalid; the message names the stage and key."""


def _slurm_word(value: Any) -> Any:
    """SLURM values YAML reads as numbers (``time: 90`` minutes, ``mem: 0``, a numeric account): as text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


SlurmText = Annotated[str, BeforeValidator(_slurm_word), Strict()]
AtLeastOne = Annotated[StrictInt, Field(ge=1)]


class Resources(Section):
    """The ``slurm:`` section: spec-wide defaults, each key overridable per stage (a stage's keys are
    merged over the defaults, ``env`` name by name, and the result validated again)."""
    partition: Optional[SlurmText] = None
    account: Optional[SlurmText] = None
    time: Optional[SlurmText] = None         # SLURM time limit, e.g. "2-00:00:00" (default: the partition's)
    nodes: AtLeastOne = 1
    gpus_per_node: NonNegativeInt = 0        # 0: a CPU job with processes_per_node processes per node
    processes_per_node: Optional[AtLeastOne] = None   # CPU nodes (default 1); with GPUs one process per GPU
    cpus_per_task: Optional[AtLeastOne] = None   # CPUs of the one task per node (default: one per process)
    mem: Optional[SlurmText] = None          # --mem per node, e.g. "64G"
    # USR1 this long before the time limit: checkpoint, requeue (SLURM allows at most 65535)
    signal_seconds: Annotated[StrictInt, Field(ge=0, le=65535)] = 300
    requeue: Optional[Flag] = None           # default: true for pretrain/finetune/qat, false otherwise
    launcher: Literal[LAUNCHERS] = "auto"    # prune-ofa launch --launcher
    setup: Annotated[Optional[Text | list[Text]], Field(       # line(s) before the run (default: activate this venv)
        description="a shell line or a list of them")] = None
    env: Annotated[dict[Text, Text | int | float | bool], Field(description="a mapping NAME: value")] = {}
    extra: Annotated[list[Text], Field(      # more #SBATCH options
        description="a list of sbatch options, e.g. ['--exclusive']")] = []
    partition_gpus: Optional[NonNegativeInt] = None   # GPUs per node of the partition (default: asked from sinfo)

    @field_validator("env")
    @classmethod
    def _variable_names(cls, env: dict) -> dict:
        for key in env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"{key!r} is not a variable name")
        return env

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and time_limit_seconds(value) is None:
            raise ValueError(f"{value!r} is not a SLURM time (minutes, HH:MM:SS, D-HH:MM:SS)")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.gpus_per_node and self.processes_per_node not in (None, self.gpus_per_node):
            raise rule("processes_per_node", f"one process per GPU; with gpus_per_node={self.gpus_per_node} "
                                             f"leave it unset")
        if self.time is not None and self.signal_seconds >= time_limit_seconds(self.time):
            raise rule("signal_seconds", f"the warning ({self.signal_seconds} s) must come before the time limit "
                                         f"({self.time})")
        return self

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
    tasks: list = field(default_factory=list)        # the task chains chosen (task_stages expanded for each)
    all_tasks: list = field(default_factory=list)    # the spec's task chains (the default of --tasks)
    cluster: Optional["ClusterProfile"] = None       # the cluster profile it was loaded with
    notices: list = field(default_factory=list)      # what could not be checked, one line each

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

class ReportArgs(Section):
    """A report stage's ``prune-ofa report`` arguments (paths, or ``@stage/path`` references)."""
    model: Text                              # the model directory to report on
    int8: Optional[Text] = None
    metrics: Optional[Text] = None
    baseline: Optional[Text] = None

    @field_validator("model")
    @classmethod
    def _model_set(cls, value: str) -> str:
        if not value:
            raise ValueError("must be set (the model directory to report on)")
        return value


class StageSpec(Section):
    """One entry of ``stages:`` as written. Its ``slurm`` keys are checked as :class:`Resources`
    once merged over the spec's defaults; paths and references once the stages are known."""
    kind: Literal[KINDS]
    config: Optional[Text] = None            # the recipe (not for report)
    overrides: dict[str, Any] = {}           # key: value, or ["key=value", ...] as on the command line
    after: list[Text] = []                   # upstream stage names (one name: a list of one)
    slurm: dict[str, Any] = {}
    report: Optional[ReportArgs] = None      # report only

    @field_validator("overrides", mode="before")
    @classmethod
    def _command_line_form(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, list):
            pairs = [str(o).split("=", 1) for o in value]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("expected key=value items or a mapping")
            return {k.strip(): yaml.safe_load(v) if v else "" for k, v in pairs}
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @field_validator("after", mode="before")
    @classmethod
    def _stage_names(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            value = [value]
        # a stage named 1 in YAML is the stage "1": names are compared as text
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value] \
            if isinstance(value, list) else value

    @field_validator("slurm", mode="before")
    @classmethod
    def _no_slurm_is_the_defaults(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _kind_decides_the_keys(self):
        if self.kind == "report":
            for key in ("config", "overrides"):
                if key in self.model_fields_set:
                    raise rule(key, f"a report stage takes report: {{{', '.join(REPORT_ARGS)}}}")
            if self.report is None:
                raise rule("report.model", "must be set (the model directory to report on)")
        else:
            if self.report is not None:
                raise rule("report", "only for kind: report")
            if not self.config:
                raise rule("config", "must be set (a recipe, e.g. configs/minilm-l6-85.yaml)")
        return self


class PipelineSpec(Section):
    """A pipeline spec file as written."""
    name: Annotated[str, BeforeValidator(_slurm_word), Strict()]
    output_root: Text                        # every stage writes output_root/<stage>
    workdir: Optional[Text] = None           # where the jobs run (default: the current directory)
    slurm: Resources = Field(default_factory=Resources)   # defaults for every stage
    stages: dict[str, StageSpec]
    classes: dict[Text, Resources] = {}      # resource class -> what the work needs (a stage's slurm.class)
    tasks: list[Text] = []                   # the task chains (default of --tasks)
    task_stages: dict[str, StageSpec] = {}   # the chain of one task: "{task}" in names and values

    @field_validator("name")
    @classmethod
    def _name_is_a_word(cls, name: str) -> str:
        if not STAGE_NAME.fullmatch(name):
            raise ValueError(f"{name!r} must be letters, digits, '.', '_' or '-'")
        return name

    @field_validator("output_root")
    @classmethod
    def _output_root_set(cls, value: str) -> str:
        if not value:
            raise ValueError("must be set")
        return value

    @field_validator("stages", mode="before")
    @classmethod
    def _names_as_text(cls, stages: Any) -> Any:
        if isinstance(stages, dict):
            for name in stages:
                name = str(name)
                if not STAGE_NAME.fullmatch(name) or name in RESERVED:
                    raise rule(name, f"a stage name must be letters, digits, '.', '_' or '-' and not "
                                     f"{' or '.join(RESERVED)}")
            if not stages:
                raise ValueError("must be set (a mapping of stage name -> stage)")
            return {str(k): v for k, v in stages.items()}
        return stages

    @field_validator("classes")
    @classmethod
    def _class_names(cls, classes: dict) -> dict:
        return check_class_names(classes)

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks: list) -> list:
        for task in tasks:
            if not STAGE_NAME.fullmatch(task):
                raise ValueError(f"{task!r}: a task name must be letters, digits, '.', '_' or '-'")
        if len(set(tasks)) < len(tasks):
            raise ValueError(f"{tasks}: a task is listed twice")
        return tasks

    @field_validator("task_stages", mode="before")
    @classmethod
    def _template_names(cls, stages: Any) -> Any:
        if isinstance(stages, dict):
            for name in map(str, stages):
                if TASK not in name or not STAGE_NAME.fullmatch(name.replace(TASK, "x")):
                    raise rule(name, f"a task stage's name holds {TASK} (e.g. \"{TASK}-transfer\"), the rest "
                                     f"letters, digits, '.', '_' or '-'")
        return stages

    @model_validator(mode="after")
    def _tasks_with_their_stages(self):
        if bool(self.tasks) != bool(self.task_stages):
            missing = "task_stages" if self.tasks else "tasks"
            raise rule(missing, "tasks and task_stages come together (the task names, and the chain run for each)")
        return self


def file_or_shipped(name_or_path: str | Path, folder: Path, shipped_name: str, error: type[Exception],
                    what: str, listing: str) -> Path:
    """``name_or_path`` if it is a file, else ``folder/<shipped_name>.yaml`` for a bare name; otherwise
    ``error`` naming ``what`` and listing the shipped files (pipelines and cluster profiles)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = folder / f"{shipped_name}.yaml"
    if "/" not in str(name_or_path) and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
    raise error(f"{what}: no such file {str(name_or_path)!r} ({listing}: {names})")


def resolve_pipeline_path(name_or_path: str | Path) -> Path:
    """A pipeline spec file, or the name of a shipped one (``bert-base-90`` ->
    configs/pipelines/bert-base-90.yaml)."""
    return file_or_shipped(name_or_path, PIPELINES, str(name_or_path).removesuffix(".yaml"), PipelineError,
                           "pipeline", "shipped pipelines")


def check_class_names(classes: dict) -> dict:
    """Resource class names (a pipeline's ``classes``, a cluster profile's) are words."""
    for name in classes:
        if not STAGE_NAME.fullmatch(name):
            raise ValueError(f"{name!r}: a class name must be letters, digits, '.', '_' or '-'")
    return classes


def load_pipeline(path: str | Path, check_partition: bool = True, overrides: Optional[dict] = None,
                  stage_dirs: Optional[dict[str, str]] = None, *, tasks: Optional[Sequence[str]] = None,
                  cluster: Optional[str | Path] = None) -> Pipeline:
    """Read and validate a pipeline spec (a file or a shipped pipeline's name). Relative paths
    (``output_root``, ``workdir``, recipes) are resolved against the current directory, so rendered
    scripts hold absolute paths only. ``check_partition``: ask ``sinfo`` how many GPUs the partition's
    nodes have where the spec does not say (``partition_gpus``); where it cannot, ``Pipeline.notices``
    says so, one line per partition.

    ``tasks``: the task chains to expand (``task_stages`` once per task; None: the spec's ``tasks``).
    ``cluster``: a cluster profile (a file or a shipped profile's name; :mod:`launcher.cluster`) giving
    the site's resource classes, account, setup, environment and scratch; None: the spec alone.

    ``overrides``: a mapping merged over the spec (after the task chains are expanded), mappings key by
    key, and validated with it (how ``prune-ofa demo`` sets its sizes: ``{"stages": {"teacher":
    {"overrides": {"training.total_steps": 30}}}}``). ``stage_dirs``: stage -> the directory under
    ``output_root`` it writes instead of its name (the demo runs the student's chain once per target:
    ``{"student": "student-85", ...}``)."""
    profile = None
    if cluster is not None:
        from launcher.cluster import load_cluster as read_profile
        profile = read_profile(cluster)
    file = resolve_pipeline_path(path)
    spec_path = file.resolve()
    raw = read_yaml_tree(file, PipelineError, "pipeline", "a mapping")
    spec = validated(PipelineSpec, raw, PipelineError)
    all_tasks = list(spec.tasks)
    chosen = all_tasks if tasks is None else list(tasks)
    tree = with_task_stages(spec, chosen)
    spec = validated(PipelineSpec, merged(tree, overrides or {}), PipelineError)
    unknown = sorted(set(stage_dirs or {}) - set(spec.stages))
    if unknown:
        raise PipelineError(f"stage_dirs: unknown stage(s) {unknown} (stages: {', '.join(spec.stages)})")
    workdir = Path(spec.workdir or ".").expanduser().resolve()
    base = profile.scratch if profile is not None and profile.scratch is not None else workdir
    output_root = (base / Path(spec.output_root).expanduser()).resolve()
    stages = {name: _stage(name, stage, spec, workdir, output_root / (stage_dirs or {}).get(name, name), profile)
              for name, stage in spec.stages.items()}
    order = topological_order({s.name: s.after for s in stages.values()})
    stages = {n: stages[n] for n in order}
    _resolve_references(stages)
    pipeline = Pipeline(name=spec.name, spec=spec_path, output_root=output_root, workdir=workdir, stages=stages,
                        tasks=chosen, all_tasks=all_tasks, cluster=profile)
    unchecked: dict[str, list[str]] = {}
    for stage in stages.values():
        partition = check_stage(stage, check_partition)
        if partition is not None:
            unchecked.setdefault(partition, []).append(stage.name)
    pipeline.notices = partition_notices(unchecked)
    return pipeline


def load_cluster(path: str | Path) -> "ClusterProfile":
    """A cluster profile, validated (:func:`launcher.cluster.load_cluster`)."""
    from launcher.cluster import load_cluster as read_profile
    return read_profile(path)


def with_task_stages(spec: PipelineSpec, tasks: Sequence[str]) -> dict:
    """The spec as a mapping whose ``stages`` hold, after its own, ``task_stages`` once per task
    (``{task}`` replaced in names and in every string); ``tasks`` must be among the spec's."""
    unknown = [t for t in tasks if t not in spec.tasks]
    if unknown:
        raise PipelineError(f"tasks: unknown task(s) {', '.join(map(repr, unknown))} (pipeline {spec.name} has: "
                            f"{', '.join(spec.tasks) or 'no task chains'})")
    if len(set(tasks)) < len(tasks):
        raise PipelineError(f"tasks: a task is given twice ({', '.join(tasks)})")
    tree = spec.model_dump(exclude_unset=True)
    templates = tree.pop("task_stages", {})
    tree.pop("tasks", None)
    stages = dict(tree["stages"])
    for task in tasks:
        for key, template in templates.items():
            name = key.replace(TASK, task)
            if name in stages:
                raise PipelineError(f"task_stages.{key}: for task {task} is stage {name!r}, which stages has already")
            stages[name] = _for_task(template, task)
    tree["stages"] = stages
    return tree


def _for_task(value: Any, task: str) -> Any:
    """``{task}`` replaced by the task's name in every string (keys included) of a template."""
    if isinstance(value, str):
        return value.replace(TASK, task)
    if isinstance(value, dict):
        return {_for_task(k, task): _for_task(v, task) for k, v in value.items()}
    if isinstance(value, list):
        return [_for_task(v, task) for v in value]
    return value


def merged(base: dict, changes: dict) -> dict:
    """``changes`` over ``base``: mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def stage_resources(name: str, own: dict, defaults: Resources, classes: Optional[dict[str, Resources]] = None,
                    cluster: Optional["ClusterProfile"] = None) -> Resources:
    """A stage's resources, validated as a whole, so a rule between keys sees the values the job will
    get. Layers, later winning (``env`` merged name by name): the cluster profile's keys for every job,
    the spec's ``slurm:`` defaults, the stage's class as the pipeline has it (``classes``), the same
    class as the profile has it, the stage's own keys; a GPU stage adds the profile's NCCL variables
    where its ``env`` does not set them."""
    own = dict(own)
    layers = [cluster.site_defaults()] if cluster is not None else []
    layers.append(defaults.model_dump(exclude_unset=True))
    if "class" in own:
        layers += _class_layers(name, own.pop("class"), classes or {}, cluster)
    layers.append(own)
    merged: dict = {}
    for layer in layers:
        before = merged.get("env")
        merged.update(layer)
        if isinstance(before, dict) and isinstance(layer.get("env"), dict):
            merged["env"] = {**before, **layer["env"]}
    resources = validated(Resources, merged, PipelineError, where=("stages", name, "slurm"))
    if cluster is not None and resources.gpus_per_node:
        resources = resources.model_copy(update={"env": {**cluster.nccl_variables(), **resources.env}})
    return resources


def _class_layers(stage: str, name: Any, classes: dict[str, Resources],
                  cluster: Optional["ClusterProfile"]) -> list[dict]:
    """The keys of resource class ``name``: the pipeline's, then the cluster profile's."""
    where = f"stages.{stage}.slurm.class"
    if not isinstance(name, str):
        raise PipelineError(f"{where}: must be a class name (a string), got {name!r}")
    site = cluster.classes if cluster is not None else {}
    if name not in classes and name not in site:
        known = sorted(set(classes) | set(site))
        where_defined = (f"the pipeline's classes and cluster profile {cluster.path}" if cluster is not None else
                         "the pipeline's classes; a cluster profile (--cluster FILE or $PRUNE_OFA_CLUSTER) adds "
                         "the site's")
        raise PipelineError(f"{where}: unknown class {name!r} (known: {', '.join(known) or 'none'}, from "
                            f"{where_defined})")
    return [c.model_dump(exclude_unset=True) for c in (classes.get(name), site.get(name)) if c is not None]


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


def _stage(name: str, spec: StageSpec, pipeline: PipelineSpec, workdir: Path, output_dir: Path,
           cluster: Optional["ClusterProfile"]) -> Stage:
    where = f"stages.{name}"
    resources = stage_resources(name, spec.slurm, pipeline.slurm, pipeline.classes, cluster)
    config, overrides, report = None, {}, {}
    if spec.kind == "report":
        report = {k: v for k, v in spec.report.model_dump().items() if v}
    else:
        config = (workdir / Path(spec.config).expanduser()).resolve()
        if not config.is_file():
            raise PipelineError(f"{where}.config: no such recipe {spec.config!r} (looked in {workdir})")
        overrides = dict(spec.overrides)
        if spec.kind in TRAINING_KINDS:
            if "training.output_dir" in overrides:
                raise PipelineError(f"{where}.overrides.training.output_dir: set by the pipeline "
                                    f"({output_dir}); change output_root instead")
            overrides["training.output_dir"] = str(output_dir)
        scratch = cluster.scratch if cluster is not None else None
        if spec.kind in PREPARED_DATA_KINDS and scratch is not None and "data.cache_dir" not in overrides:
            cache_dir = _prepared_data_dir(config)
            if not cache_dir.is_absolute():       # the recipe's own absolute directory is kept
                overrides["data.cache_dir"] = str(scratch / cache_dir)
    return Stage(name=name, kind=spec.kind, config=config, overrides=overrides, after=list(spec.after),
                 resources=resources, output_dir=output_dir, report=report)


def _prepared_data_dir(config: Path) -> Path:
    """A pre-training recipe's ``data.cache_dir`` as written (the schema's default where it has none);
    a recipe that cannot be read is left to the checks that follow (``check_stage``)."""
    from sparse_pretrain.recipe import DataConfig
    try:
        data = read_yaml_tree(config, PipelineError).get("data") or {}
    except PipelineError:
        data = {}
    value = data.get("cache_dir") if isinstance(data, dict) else None
    return Path(value if isinstance(value, str) and value else DataConfig.model_fields["cache_dir"].default)


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


def _resolve_references(stages: dict[str, Stage]) -> None:
    """``@stage/path`` -> that stage's output directory (``output_root/stage``) ``/path``; the stage
    must be upstream (``after``)."""
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
        return str(stages[ref].output_dir / (match.group(2) or "/").lstrip("/")).rstrip("/")

    for stage in stages.values():
        stage.overrides = {k: resolve(stage, f"overrides.{k}", v) for k, v in stage.overrides.items()}
        stage.report = {k: resolve(stage, f"report.{k}", v) for k, v in stage.report.items()}


# -- checks before anything is queued ------------------------------------------------------------

def check_stage(stage: Stage, check_partition: bool = True) -> Optional[str]:
    """Ask the launcher to plan the stage as its job will run it, on node 0 of its allocation: the
    recipe loads with the overrides, the GPUs per node fit the partition (``partition_gpus``, else
    ``sinfo``), the global batch splits over the world size, the launcher suits the stage. Nothing
    runs; a problem raises :class:`PipelineError` naming the stage. Returns the partition (``""``:
    the cluster's default) whose GPUs per node could not be checked, None where they were or
    need not be."""
    from launcher.launch import LaunchRequest, build_plan
    r = stage.resources
    if stage.kind in ("prepare-data", "report") and r.nodes > 1:
        raise PipelineError(f"stages.{stage.name}.slurm.nodes: {stage.kind} runs on one node, got {r.nodes}")
    if stage.kind == "report":
        return None
    partition_gpus, unchecked = r.partition_gpus, None
    if partition_gpus is None and r.gpus_per_node and check_partition:
        if r.partition:
            partition_gpus = _sinfo_gpus(r.partition)      # None where sinfo cannot say
        if partition_gpus is None:
            unchecked = r.partition or ""
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
    return unchecked


def partition_notices(unchecked: dict[str, list[str]]) -> list[str]:
    """One line per partition whose GPUs per node could not be checked: why, and the fix."""
    notices = []
    for partition, stages in unchecked.items():
        if not partition:
            name, why = "(the cluster's default)", "no partition named"
        else:
            name = partition
            why = "sinfo is not on PATH" if shutil.which("sinfo") is None else f"sinfo -p {partition} gave no GPU count"
        notices.append(f"partition {name}: GPUs per node not checked ({why}) for stage(s) {', '.join(stages)}; "
                       f"set partition_gpus (the partition's GPUs per node) in the resource class or slurm "
                       f"section to check it")
    return notices


@functools.lru_cache(maxsize=None)
def _sinfo_gpus(partition: str):
    from launcher.launch import partition_gpus
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
