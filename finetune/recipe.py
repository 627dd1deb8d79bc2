"""Fine-tuning recipes (transfer with pattern-lock and KD, fine-tune pruning, and QAT): YAML +
``key=value`` overrides, validated before any model is built, each error naming its dotted key.

Each section is a declarative schema (:mod:`sparse_pretrain.runtime.schema`): types, ranges and defaults in
the annotations, rules between fields in validators. The ``pruning`` section is the pre-training
recipe's (:mod:`sparse_pretrain.pruning_section`: same keys, same checks) plus ``lr_rewind``; what
depends on the run's length is checked by :meth:`FinetunePruningConfig.check_length`, naming the
fine-tuning keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Sequence

from pydantic import Field, StrictInt, model_validator

from finetune.tasks.classification import TASKS
from sparse_pretrain.pruning_section import PruningConfig
from sparse_pretrain.runtime.packaged_models import resolve_packaged_model
from sparse_pretrain.runtime.precision import PRECISIONS
from sparse_pretrain.runtime.recipe_files import apply_overrides, read_yaml_tree
from sparse_pretrain.runtime.schema import (
    ConfigError,
    Flag,
    Fraction,
    NonNegativeInt,
    NonNegativeNumber,
    PositiveInt,
    PositiveNumber,
    Section,
    Text,
    rule,
    validated,
)

#: task names with a built-in data source and schema; any other name is a custom classification task
KNOWN_TASKS = tuple(sorted((*TASKS, "squad")))


class TaskConfig(Section):
    name: Text = "rt-sentiment"
    data_files: dict[Text, Text] = {}  # split -> local JSON/CSV file (same schema as the hub)
    text_columns: Annotated[list[Text], Field(max_length=2, description="a list of one or two column names")] = []
    label_column: Optional[Text] = None
    num_labels: Optional[Annotated[StrictInt, Field(ge=2)]] = None
    # string labels' names in id order ([neg, pos]: neg is 0); None: integer labels as they are, string
    # ones sorted (finetune/tasks/classification.py); the names go into the exported model's id2label
    labels: Annotated[Optional[Annotated[list[Text], Field(min_length=2)]], Field(description=(
        "a list of two or more label names in id order, e.g. [neg, pos] (quote a name YAML reads as a "
        "number or a boolean: \"1\", \"yes\")"))] = None
    max_seq_length: Annotated[StrictInt, Field(ge=8)] = 128
    doc_stride: PositiveInt = 128      # SQuAD: overlap of consecutive windows of a long context
    n_best_size: PositiveInt = 20      # SQuAD: start/end candidates per window
    max_answer_length: PositiveInt = 30   # SQuAD: longest answer span, in tokens

    @model_validator(mode="after")
    def _task_is_known_or_described(self):
        if self.name == "squad" and self.doc_stride >= self.max_seq_length:
            raise rule("doc_stride", f"must be a positive integer smaller than task.max_seq_length "
                                     f"({self.max_seq_length}), got {self.doc_stride}")
        if self.labels is not None:
            if self.name == "squad":
                raise rule("labels", "task squad (extractive question answering) has no class labels; remove "
                                     "task.labels")
            twice = sorted({x for x in self.labels if self.labels.count(x) > 1})
            if twice:
                raise rule("labels", f"must name each label once, got {self.labels} ({', '.join(twice)} repeated)")
            if self.num_labels is not None and self.num_labels != len(self.labels):
                raise rule("num_labels", f"is {self.num_labels}, but task.labels names {len(self.labels)} labels "
                                         f"{self.labels}; drop task.num_labels (task.labels sets it)")
        if self.name in KNOWN_TASKS:
            return self
        unknown = f"task {self.name!r} is not a known task ({', '.join(KNOWN_TASKS)}): a custom task"
        if not self.data_files and not self.text_columns:
            raise rule("name", f"{unknown} reads local files and names its columns; set task.data_files: "
                               f"{{train: FILE, validation: FILE}} and task.text_columns: [COLUMN]")
        if not self.data_files:
            raise rule("data_files", f"{unknown} reads local files; set task.data_files: "
                                     f"{{train: FILE, validation: FILE}}")
        if not self.text_columns:
            raise rule("text_columns", f"{unknown} names its text columns: set task.text_columns: [COLUMN] or "
                                       f"[COLUMN, COLUMN] (and task.label_column, default label)")
        return self


class ModelConfig(Section):
    name_or_path: Text = "runs/minilm-l6-85/model"
    pattern_lock: Flag = True          # keep the loaded model's zeros (a sparse model is required)
    min_sparsity: Fraction = 0.05      # pattern-lock on a model sparser than nothing, else an error


class DistillationConfig(Section):
    teacher: Optional[Text] = None     # a dense model fine-tuned on the task; None: no KD
    lambda_kd: NonNegativeNumber = 1.0
    lambda_task: NonNegativeNumber = 0.0
    temperature: PositiveNumber = 2.0

    @model_validator(mode="after")
    def _something_to_learn_from(self):
        if self.teacher is None and self.lambda_task == 0:
            raise rule("lambda_task", "is 0 and there is no distillation.teacher: nothing to learn from "
                                      "(set lambda_task > 0 for a dense task teacher)")
        return self


class TrainingConfig(Section):
    epochs: PositiveNumber = 3.0
    max_steps: Optional[PositiveInt] = None
    batch_size: PositiveInt = 32       # per process
    learning_rate: PositiveNumber = 5e-5
    warmup_ratio: Fraction = 0.1
    weight_decay: NonNegativeNumber = 0.01
    max_grad_norm: NonNegativeNumber = 1.0   # 0: no clipping
    seed: NonNegativeInt = 42
    output_dir: Text = "runs/finetune"
    eval_batch_size: PositiveInt = 64
    eval_every: Optional[PositiveInt] = None   # steps between evaluations (None: at the end of every epoch)
    save_every: Optional[PositiveInt] = None   # steps between save_state checkpoints (None: end of each epoch)
    discard_different_run: Flag = False  # output_dir holds another run: delete it (runtime/run_identity.py)
    # auto: bf16 on a GPU that computes it natively, else fp32 (runtime/precision.py); QAT: fp32 only
    precision: Literal[PRECISIONS] = "auto"


class QATConfig(Section):
    enabled: Flag = False              # 8-bit quantization-aware training (prune-ofa qat sets it)
    per_channel: Flag = False          # int8 weight scales per output row instead of per tensor
    reduce_range: Flag = True          # 7-bit activations: exact on CPUs without VNNI (see quantization.py)


class FinetunePruningConfig(PruningConfig):
    """Fine-tune pruning (the paper's downstream baseline): a dense model pruned by gradual magnitude
    pruning while it is fine-tuned. The keys, their meaning and their checks are the pre-training
    recipe's ``pruning`` section (steps count fine-tuning optimizer steps); what depends on the
    fine-tuning length is checked by :meth:`check_length`."""
    lr_rewind: Flag = False            # the pre-training recipe's rewound LR instead of linear decay

    def check_length(self, total_steps: int, warmup_steps: int) -> None:
        """The schedule fits a fine-tuning of ``total_steps`` optimizer steps (``warmup_steps`` of
        them warm-up), or a ConfigError naming the fine-tuning keys."""
        problem = self.length_problem(
            total_steps, warmup_steps, self.lr_rewind, length="the fine-tuning length in steps",
            length_key=f"training.max_steps (or epochs), the fine-tuning length of {total_steps} steps")
        if problem:
            raise ConfigError("{}: {}".format(*problem))


class FinetuneRecipe(Section):
    member_word = "section"
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    distillation: DistillationConfig = Field(default_factory=dict, validate_default=True)   # checked as a section
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    qat: QATConfig = Field(default_factory=QATConfig)
    pruning: Optional[FinetunePruningConfig] = None   # absent or null: no pruning (dense or pattern-locked)

    @model_validator(mode="after")
    def _pruning_starts_dense_and_without_qat(self):
        if self.pruning is not None and self.model.pattern_lock:
            raise rule("model.pattern_lock", "must be false with a pruning section: fine-tune pruning makes its own "
                                             "zeros in a dense model (pattern-lock keeps the zeros of a sparse "
                                             "pre-trained one); set model.pattern_lock=false or remove the pruning "
                                             "section")
        if self.pruning is not None and self.qat.enabled:
            raise rule("qat.enabled", "QAT with a pruning section is not supported; prune first, then run QAT on "
                                      "the pruned model with pattern-lock")
        if self.qat.enabled and self.training.precision in ("bf16", "fp16"):
            raise rule("training.precision", f"QAT (qat.enabled) runs in fp32, got {self.training.precision}: its "
                                             f"fake-quantized GEMMs emulate int8 ones exactly only in IEEE fp32 "
                                             f"(16-bit operands leave the int8 grid, so the exported int8 model would "
                                             f"not be the one trained); set training.precision=fp32 or auto")
        return self

    def to_dict(self) -> dict:
        """Every setting, as plain YAML/JSON values (``pruning`` None when there is none)."""
        return self.model_dump()


def load_finetune_recipe(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FinetuneRecipe:
    recipe = validated(FinetuneRecipe, apply_overrides(read_yaml_tree(path), overrides))
    if recipe.pruning is not None:
        # with a known length, every check now; otherwise those that do not depend on it (the
        # trainer checks again once the length is known from epochs x data)
        t = recipe.training
        recipe.pruning.check_length(t.max_steps or 2**62, int(t.warmup_ratio * t.max_steps) if t.max_steps else 0)
    recipe.model.name_or_path = resolve_packaged_model(recipe.model.name_or_path, "model.name_or_path")
    recipe.distillation.teacher = resolve_packaged_model(recipe.distillation.teacher, "distillation.teacher")
    return recipe
