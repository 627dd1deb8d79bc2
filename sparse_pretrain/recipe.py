"""Recipes: YAML files validated on load, with ``key=value`` overrides from the command line.

A recipe has the sections ``model``, ``data``, ``training``, ``pruning`` and ``distillation`` (see
``configs/*.yaml``), each a declarative schema (:mod:`sparse_pretrain.runtime.schema`): every field's type,
range and default in its annotation, rules between fields in validators, unknown keys rejected.
Every bad value fails with a :class:`ConfigError` naming the dotted key, before any model is built.
The ``pruning`` section is the one fine-tune pruning shares (:mod:`sparse_pretrain.pruning_section`);
checks that need the model's shapes (a block shape that does not divide a weight, an include
pattern that matches nothing) run in its ``check_against_model``, on a meta-device skeleton.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Sequence

from pydantic import Field, StrictInt, field_validator, model_validator

from sparse_pretrain.core.distill import POSITIONS, DistillationWeights
from sparse_pretrain.core.gmp_schedule import GMPSchedule
from sparse_pretrain.core.lr_rewind import RewoundLinearLR
from sparse_pretrain.pretraining_loss import VOCAB_ROWS
from sparse_pretrain.pruning_section import PruningConfig
from sparse_pretrain.runtime.packaged_models import resolve_packaged_model
from sparse_pretrain.runtime.recipe_files import apply_overrides, read_yaml_tree
from sparse_pretrain.runtime.schema import (
    Flag,
    Fraction,
    NonNegativeInt,
    NonNegativeNumber,
    PositiveInt,
    PositiveNumber,
    Probability,
    Section,
    Text,
    rule,
    validated,
)

__all__ = ["Recipe", "ModelConfig", "DataConfig", "TrainingConfig", "PruningConfig",
           "DistillationConfig", "load_recipe", "recipe_from_dict"]

STAGES = ("teacher", "student")
#: the attention implementations transformers knows (``attn_implementation=`` of ``from_pretrained``)
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
DATA_FORMATS = ("json", "text", "parquet", "csv")


class ModelConfig(Section):
    name_or_path: Text = "bert-base-uncased"
    teacher_name_or_path: Optional[Text] = None  # student stage: the prepared teacher (default: name_or_path)
    attn_implementation: Literal[ATTENTION] = "sdpa"   # the fastest attention transformers has for the model
    teacher_zero3: Flag = False                  # partition the frozen teacher with ZeRO-3 (too big to replicate)


class DataConfig(Section):
    """The pre-training data (see ``sparse_pretrain.data``). Every field except ``num_proc`` and
    ``cache_dir`` is part of the prepared dataset's settings hash."""
    dataset_name: Optional[Text] = "wikipedia"
    dataset_config: Optional[Text] = "20220301.en"
    max_seq_length: PositiveInt = 512
    dataset_split: Text = "train"        # the hub split to read (local files are read whole)
    data_files: list[Text] = []          # local files/globs; when set, used instead of the hub
    data_format: Optional[Literal[DATA_FORMATS]] = None   # default: from the file extension
    text_column: Text = "text"           # one document per row of this column
    nsp: Literal["auto", "true", "false"] = "auto"   # auto: the model's type has NSP (e.g. bert)
    short_seq_prob: Probability = 0.1    # a row's target length is shorter with this probability
    seed: Optional[NonNegativeInt] = None    # row building and held-out choice (default: training.seed)
    validation_fraction: Fraction = 0.01     # held-out documents (at least 1 if > 0), split before rows
    validation_max_documents: NonNegativeInt = 1000
    max_documents: Optional[PositiveInt] = None   # use only the first N documents (quick runs)
    tokenizer_name_or_path: Optional[Text] = None     # default: model.name_or_path
    num_proc: Optional[PositiveInt] = None   # processes for tokenizing (default: CPUs, at most 8)
    cache_dir: Text = "data/prepared"    # prepared datasets go to <cache_dir>/<name>-<settings hash>

    @field_validator("nsp", mode="before")
    @classmethod
    def _nsp_as_word(cls, value):
        """YAML reads ``nsp: true`` as a bool: the word it was."""
        if value is None or isinstance(value, bool):
            return {None: "auto", True: "true", False: "false"}[value]
        return value.lower() if isinstance(value, str) else value

    @field_validator("data_files", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value


class TrainingConfig(Section):
    total_steps: PositiveInt = 100_000
    global_batch_size: PositiveInt = 256
    learning_rate: PositiveNumber = 5e-5
    # parameters the checkpoint lacks (heads initialised at load, e.g. the MLM head of a sentence-
    # embedding model such as the packaged MiniLM) train at this rate; None: learning_rate
    new_parameters_learning_rate: Optional[PositiveNumber] = None
    warmup_steps: NonNegativeInt = 1_000
    weight_decay: NonNegativeNumber = 0.01
    adam_betas: Annotated[list[Fraction], Field(min_length=2, max_length=2,
                                                description="two numbers in [0, 1) (beta1, beta2)")] = [0.9, 0.999]
    adam_epsilon: PositiveNumber = 1e-8
    lr_rewind: Flag = True
    seed: NonNegativeInt = 42
    micro_batch_size: PositiveInt = 32   # per device; global = micro x accumulation x world size
    max_grad_norm: NonNegativeNumber = 1.0   # 0: no clipping
    deepspeed_config: Text = "ds_configs/zero2.json"   # path, or relative to the project's ds_configs/
    zero_stage: Optional[Annotated[StrictInt, Field(ge=0, le=3)]] = None   # override the config file's stage
    zero3_persistence_threshold: Optional[NonNegativeInt] = None   # override stage3_param_persistence_threshold
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    # needed: the MLM heads project only the rows a loss reads (masked positions; with
    # distillation.positions=all every non-padding token), same losses; all: every position
    vocab_rows: Literal[VOCAB_ROWS] = "needed"
    compile: Flag = False   # torch.compile the encoders of student and teacher (ZeRO 0-2)
    output_dir: Text = "runs/pretrain"
    save_interval: PositiveInt = 1_000   # steps between checkpoints (and at the end)
    keep_checkpoints: PositiveInt = 2
    log_interval: PositiveInt = 50
    eval_interval: PositiveInt = 1_000
    eval_batches: PositiveInt = 50
    dataloader_workers: NonNegativeInt = 2
    peak_tflops: Optional[PositiveNumber] = None   # per device, for MFU; default from the GPU's name
    discard_different_run: Flag = False  # output_dir holds another run: delete it (runtime/run_identity.py)

    @model_validator(mode="after")
    def _batches_and_warmup(self):
        if self.global_batch_size % self.micro_batch_size:
            raise rule("micro_batch_size", f"must divide global_batch_size ({self.global_batch_size}), "
                                           f"got {self.micro_batch_size}")
        if self.warmup_steps >= self.total_steps:
            raise rule("warmup_steps", f"must be < total_steps ({self.total_steps}), got {self.warmup_steps}")
        return self


class DistillationConfig(Section):
    lambda_pt: NonNegativeNumber = 0.5
    lambda_kd: NonNegativeNumber = 0.5
    temperature: PositiveNumber = 2.0
    positions: Literal[POSITIONS] = "all"   # all non-padding tokens (reference code) | masked
    chunk_rows: NonNegativeInt = 4096   # the MLM KD term this many rows at a time (same loss); 0: all at once


class Recipe(Section):
    member_word = "section"
    stage: Literal[STAGES] = "student"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    distillation: DistillationConfig = Field(default_factory=DistillationConfig)

    @model_validator(mode="after")
    def _student_schedule_fits_the_run(self):
        t = self.training
        if self.stage == "student":
            problem = self.pruning.length_problem(t.total_steps, t.warmup_steps, t.lr_rewind,
                                                  length_key="training.total_steps", length="training.total_steps")
            if problem:
                raise rule(*problem)
        return self

    # -- what the sparsity core builds from a recipe: the pruning section's objects, over this run --------
    def gmp_schedule(self) -> GMPSchedule:
        return self.pruning.gmp_schedule()

    def lr_factor(self) -> RewoundLinearLR:
        t = self.training
        return self.pruning.lr_factor(t.total_steps, t.warmup_steps, t.lr_rewind and self.stage == "student")

    def pruning_method(self):
        return self.pruning.pruning_method()

    def distillation_weights(self) -> DistillationWeights:
        d = self.distillation
        return DistillationWeights(d.lambda_pt, d.lambda_kd, d.temperature, d.positions, d.chunk_rows)

    def to_dict(self) -> dict:
        """Every setting, as plain YAML/JSON values (``recipe_from_dict`` reads it back)."""
        return self.model_dump()


# -- loading -----------------------------------------------------------------------------------

def load_recipe(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe (or the defaults), apply ``key=value`` overrides, validate."""
    tree = read_yaml_tree(path)
    return recipe_from_dict(apply_overrides(tree, overrides))


def recipe_from_dict(tree: dict) -> Recipe:
    """A recipe from a config mapping (sections of keys), validated; ``packaged:`` models resolved."""
    recipe = validated(Recipe, tree)
    for key, obj, attr in (("model.name_or_path", recipe.model, "name_or_path"),
                           ("model.teacher_name_or_path", recipe.model, "teacher_name_or_path"),
                           ("data.tokenizer_name_or_path", recipe.data, "tokenizer_name_or_path")):
        setattr(obj, attr, resolve_packaged_model(getattr(obj, attr), key))
    return recipe
