"""Fine-tuning recipes (transfer with pattern-lock and KD, fine-tune pruning, and QAT): YAML +
``key=value`` overrides, validated before any model is built, each error naming its key."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from sparse_pretrain.config import ConfigError, PruningConfig, apply_overrides, read_yaml_tree, resolve_packaged_model


@dataclass
class TaskConfig:
    name: str = "rt-sentiment"
    data_files: dict = field(default_factory=dict)     # split -> local JSON/CSV file (same schema as the hub)
    text_columns: list = field(default_factory=list)   # custom tasks: one or two text columns
    label_column: Optional[str] = None
    num_labels: Optional[int] = None
    max_seq_length: int = 128
    doc_stride: int = 128              # SQuAD: overlap of consecutive windows of a long context
    n_best_size: int = 20              # SQuAD: start/end candidates per window
    max_answer_length: int = 30        # SQuAD: longest answer span, in tokens


@dataclass
class ModelConfig:
    name_or_path: str = "runs/minilm-l6-85/model"
    pattern_lock: bool = True          # keep the loaded model's zeros (a sparse model is required)
    min_sparsity: float = 0.05         # pattern-lock on a model sparser than nothing, else an error


@dataclass
class DistillationConfig:
    teacher: Optional[str] = None      # a dense model fine-tuned on the task; None: no KD
    lambda_kd: float = 1.0
    lambda_task: float = 0.0
    temperature: float = 2.0


@dataclass
class TrainingConfig:
    epochs: float = 3.0
    max_steps: Optional[int] = None
    batch_size: int = 32               # per process
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    output_dir: str = "runs/finetune"
    eval_batch_size: int = 64
    eval_every: Optional[int] = None   # steps (None: at the end of every epoch)
    save_every: Optional[int] = None   # steps between save_state checkpoints (None: end of each epoch)


@dataclass
class QATConfig:
    enabled: bool = False              # 8-bit quantization-aware training (prune-ofa qat sets it)
    per_channel: bool = False          # int8 weight scales per output row instead of per tensor
    reduce_range: bool = True          # 7-bit activations: exact on CPUs without VNNI (see quantization.py)


@dataclass
class FinetunePruningConfig(PruningConfig):
    """Fine-tune pruning (the paper's downstream baseline): a dense model pruned by gradual magnitude
    pruning while it is fine-tuned. The keys and their meaning are the pre-training recipe's
    ``pruning`` section (steps count fine-tuning optimizer steps); validated by the same code
    (:meth:`pretrain_recipe`), with the fine-tuning length as ``training.total_steps``."""
    lr_rewind: bool = False            # the pre-training recipe's rewound LR instead of linear decay

    def pretrain_recipe(self, total_steps: int, warmup_steps: int):
        """This section as a ``sparse_pretrain`` student recipe: its ``gmp_schedule()``,
        ``pruning_method()`` and ``lr_factor()`` are what fine-tuning uses. Raises ConfigError."""
        from sparse_pretrain.config import recipe_from_dict
        pruning = {k: v for k, v in dataclasses.asdict(self).items() if k != "lr_rewind"}
        try:
            return recipe_from_dict({"stage": "student", "pruning": pruning, "training": {
                "total_steps": total_steps, "warmup_steps": warmup_steps, "lr_rewind": self.lr_rewind}})
        except ConfigError as err:   # name the fine-tuning keys the derived pre-training keys came from
            message = str(err).replace("training.total_steps (", "the fine-tuning length in steps (")
            message = message.replace("training.total_steps:", "training.max_steps (or epochs), the fine-tuning "
                                      f"length of {total_steps} steps:")
            raise ConfigError(message) from None


@dataclass
class FinetuneRecipe:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    pruning: Optional[FinetunePruningConfig] = None   # absent: no pruning (dense or pattern-locked)


#: sections of a fine-tuning recipe; those in OPTIONAL_SECTIONS are None unless the recipe has them
SECTIONS = {"task": TaskConfig, "model": ModelConfig, "distillation": DistillationConfig,
            "training": TrainingConfig, "qat": QATConfig, "pruning": FinetunePruningConfig}
OPTIONAL_SECTIONS = ("pruning",)


def load_finetune_recipe(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FinetuneRecipe:
    tree = apply_overrides(read_yaml_tree(path), overrides)
    built = {}
    for name in tree:
        if name not in SECTIONS:
            raise ConfigError(f"{name}: unknown section (known: {', '.join(SECTIONS)})")
    for name, cls in SECTIONS.items():
        if name in OPTIONAL_SECTIONS and tree.get(name) is None:
            built[name] = None
            continue
        values = tree.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: must be a mapping, got {values!r}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{name}.{key}: unknown key (known: {', '.join(known)})")
            if isinstance(known[key].default, float) and isinstance(value, str):
                try:
                    values[key] = float(value)
                except ValueError:
                    pass
        built[name] = cls(**values)
    recipe = FinetuneRecipe(**built)
    _validate(recipe)
    recipe.model.name_or_path = resolve_packaged_model(recipe.model.name_or_path, "model.name_or_path")
    recipe.distillation.teacher = resolve_packaged_model(recipe.distillation.teacher, "distillation.teacher")
    return recipe


def _validate(r: FinetuneRecipe) -> None:
    t, d = r.training, r.distillation
    checks = [
        ("training.batch_size", isinstance(t.batch_size, int) and t.batch_size > 0, "a positive integer"),
        ("training.learning_rate", isinstance(t.learning_rate, (int, float)) and t.learning_rate > 0, "> 0"),
        ("training.epochs", isinstance(t.epochs, (int, float)) and t.epochs > 0, "> 0"),
        ("training.max_steps", t.max_steps is None or (isinstance(t.max_steps, int) and t.max_steps > 0),
         "a positive integer or null"),
        ("training.warmup_ratio", isinstance(t.warmup_ratio, (int, float)) and 0 <= t.warmup_ratio < 1, "in [0, 1)"),
        ("task.max_seq_length", isinstance(r.task.max_seq_length, int) and r.task.max_seq_length >= 8, ">= 8"),
        ("task.text_columns", len(r.task.text_columns) <= 2, "one or two columns"),
        ("task.doc_stride", r.task.name != "squad" or (isinstance(r.task.doc_stride, int)
                                               and 0 < r.task.doc_stride < r.task.max_seq_length),
         "a positive integer smaller than task.max_seq_length"),
        ("distillation.temperature", isinstance(d.temperature, (int, float)) and d.temperature > 0, "> 0"),
        ("distillation.lambda_kd", isinstance(d.lambda_kd, (int, float)) and d.lambda_kd >= 0, ">= 0"),
        ("distillation.lambda_task", isinstance(d.lambda_task, (int, float)) and d.lambda_task >= 0, ">= 0"),
        ("model.min_sparsity", isinstance(r.model.min_sparsity, (int, float)) and 0 <= r.model.min_sparsity < 1,
         "in [0, 1)"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key}: must be {expected}")
    if d.teacher is None and d.lambda_task == 0:
        raise ConfigError("distillation.lambda_task: is 0 and there is no distillation.teacher: nothing to learn "
                          "from (set lambda_task > 0 for a dense task teacher)")
    if r.pruning is not None:
        _validate_pruning(r)


def _validate_pruning(r: FinetuneRecipe) -> None:
    """Fine-tune pruning starts from a dense model; its schedule and method are checked by the
    pre-training recipe's validation. Checks that need the run's length (``pruning.end`` before
    the last step, room for LR rewinding) run again in the trainer once the length is known."""
    if r.model.pattern_lock:
        raise ConfigError("model.pattern_lock: must be false with a pruning section: fine-tune pruning makes "
                          "its own zeros in a dense model (pattern-lock keeps the zeros of a sparse pre-trained "
                          "one); set model.pattern_lock=false or remove the pruning section")
    if r.qat.enabled:
        raise ConfigError("qat.enabled: QAT with a pruning section is not supported; prune first, then run QAT "
                          "on the pruned model with pattern-lock")
    if not isinstance(r.pruning.lr_rewind, bool):
        raise ConfigError(f"pruning.lr_rewind: must be true or false, got {r.pruning.lr_rewind!r}")
    t = r.training
    # with a known length, every check now; otherwise those that do not depend on it
    r.pruning.pretrain_recipe(t.max_steps or 2**62, int(t.warmup_ratio * t.max_steps) if t.max_steps else 0)
