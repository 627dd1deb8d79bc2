"""Preflight of a fine-tuning or QAT run: what it will read, checked before any weights load.

``check_finetune(recipe)`` looks at the task's data files (or hub dataset), the model and its
tokenizer, the teacher, whether transformers has the head the task needs (sequence classification or
question answering) for both, the pruning section against the model's structure on a meta-device
skeleton, and, for pattern-lock, at the sparsity of the model's Linear weights read lazily from its
safetensors files. Each problem is a :class:`~sparse_pretrain.runtime.errors.UserError` naming the key,
the path and what to do; the shared checks are :mod:`sparse_pretrain.runtime.model_checks`.

``hub_items(recipe)`` lists what the recipe reads from the hub (``prune-ofa fetch`` stages exactly
that); offline, a message about a missing one gives the ``prune-ofa fetch`` line for all of them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from sparse_pretrain.runtime.errors import UserError
from sparse_pretrain.runtime.model_checks import (
    SAFE_INDEX,
    SAFE_WEIGHTS,
    HubItem,
    check_hub_dataset,
    check_tokenizer,
    fetch_command,
    hub_model,
    load_config,
    meta_skeleton,
    missing_path_hint,
    model_class_for,
    model_source,
)

TASK_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")


# -- pattern-lock: the sparsity of a model's pruned weights, read lazily ---------------------------------

def pruned_weight_sparsity(model_dir: str | Path) -> Optional[float]:
    """Zeros / elements over the weights pattern-lock locks (the default selection: every Linear inside the
    model's repeated blocks, and the pooler, found on the model built from config.json on the meta
    device), read lazily from the safetensors files without loading the model. None without safetensors
    files or where the selection cannot be found here (the trainer checks)."""
    import torch
    from safetensors import safe_open

    from finetune.report.accounting import pruned_weight_names
    model_dir = Path(model_dir)
    if (model_dir / SAFE_INDEX).is_file():
        weight_map = json.loads((model_dir / SAFE_INDEX).read_text())["weight_map"]
    elif (model_dir / SAFE_WEIGHTS).is_file():
        with safe_open(str(model_dir / SAFE_WEIGHTS), framework="pt") as weights:
            weight_map = dict.fromkeys(weights.keys(), SAFE_WEIGHTS)
    else:
        return None
    try:
        names, _ = pruned_weight_names(model_dir, list(weight_map))
    except ValueError:
        return None
    zeros = total = 0
    for file in sorted({weight_map[n] for n in names}):
        with safe_open(str(model_dir / file), framework="pt") as weights:
            for name in (n for n in names if weight_map[n] == file):
                tensor = weights.get_tensor(name)
                total += tensor.numel()
                zeros += tensor.numel() - int(torch.count_nonzero(tensor))
    return zeros / total if total else None


# -- what the run reads from the hub ---------------------------------------------------------------------

def task_hub_dataset(task) -> Optional[tuple[str, Optional[str]]]:
    """(path, config) of the hub dataset the task reads, or None: local ``task.data_files``, the
    offline RT set, a custom task."""
    from finetune.heads import QuestionAnsweringHead
    from finetune.tasks.classification import TASKS
    if task.data_files:
        return None
    if task.name == "squad":
        return QuestionAnsweringHead.HUB_NAME, None
    spec = TASKS.get(task.name)
    return tuple(spec.hub) if spec is not None and spec.hub else None


def hub_items(recipe) -> list[HubItem]:
    """What a fine-tuning or QAT recipe reads from the hub: the model, the teacher and the task's
    dataset. Local paths (an earlier stage's output, a packaged model) are not hub items."""
    items = [hub_model("model.name_or_path", recipe.model.name_or_path),
             hub_model("distillation.teacher", recipe.distillation.teacher)]
    dataset = task_hub_dataset(recipe.task)
    if dataset:
        items.append(HubItem("dataset", dataset[0], "task.name", dataset[1]))
    return [item for item in items if item is not None]


# -- the run ----------------------------------------------------------------------------------------

def check_finetune(recipe) -> list[str]:
    """Everything a fine-tuning or QAT run reads: the task's data files, the model and its tokenizer,
    the teacher, the heads transformers has for them, pattern-lock's sparse model."""
    from finetune.tasks.classification import TASKS, task_spec
    task, m, d = recipe.task, recipe.model, recipe.distillation
    squad = task.name == "squad"
    if not squad:
        try:
            spec = task_spec(task.name, task.text_columns, task.label_column, task.num_labels)
        except ValueError as err:
            raise UserError(str(err)) from None
    files = task.data_files or {}
    if not isinstance(files, dict):
        raise UserError(f"task.data_files: must map splits to files ({{train: F, validation: F}}), got {files!r}")
    needed = ["train", "validation"] if squad else [spec.train_split, *spec.eval_splits]
    fetch = fetch_command(hub_items(recipe))
    if files:
        missing = [s for s in needed if s not in files]
        if missing:
            raise UserError(f"task.data_files: no file for split(s) {missing} (have {sorted(files)}); task "
                            f"{task.name} reads {needed}")
        for split, path in files.items():
            key = f"task.data_files.{split}"
            if not isinstance(path, str):
                raise UserError(f"{key}: must be a file path, got {path!r}")
            p = Path(os.path.expanduser(path))
            if not p.exists():
                raise UserError(f"{key}: no such file {path!r}{missing_path_hint(p)}")
            if not p.is_file():
                raise UserError(f"{key}: {path!r} is a directory; give the file")
            if p.suffix.lower() not in TASK_FILE_SUFFIXES:
                raise UserError(f"{key}: {path!r}: unknown format {p.suffix or '(no suffix)'!r}; give "
                                f"{', '.join(TASK_FILE_SUFFIXES)} files")
    elif task_hub_dataset(task):
        path, config = task_hub_dataset(task)
        check_hub_dataset("task.name", path, config, "give task.data_files: {train: F, validation: F}", fetch=fetch)
    elif task.name not in TASKS:
        raise UserError(f"task.data_files: task {task.name!r} is not built in, so its data must be given: "
                        f"task.data_files: {{train: F, validation: F}}")

    mapping, head = (("MODEL_FOR_QUESTION_ANSWERING_MAPPING", "question-answering") if squad
                     else ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING", "sequence-classification"))
    why = f"task {task.name} needs one"
    source = model_source("model.name_or_path", m.name_or_path, fetch=fetch)
    config = load_config("model.name_or_path", source)
    cls = model_class_for("model.name_or_path", config, mapping, head, why)
    check_tokenizer("model.name_or_path", source, pretraining=False)
    if d.teacher:
        teacher = model_source("distillation.teacher", d.teacher, fetch=fetch)
        teacher_config = load_config("distillation.teacher", teacher)
        model_class_for("distillation.teacher", teacher_config, mapping, head, why)
        if getattr(teacher_config, "vocab_size", None) != getattr(config, "vocab_size", None):
            raise UserError(f"distillation.teacher: its vocabulary has {teacher_config.vocab_size} tokens, the "
                            f"model's {config.vocab_size}: the teacher reads the model's token ids, so both need "
                            f"the same tokenizer")
        from finetune.heads import head_for
        try:
            head_for(task).check_teacher(teacher_config)
        except ValueError as err:
            raise UserError(str(err)) from None
    if m.pattern_lock:
        sparsity = pruned_weight_sparsity(source) if os.path.isdir(source) else None
        if sparsity is not None and sparsity < m.min_sparsity:
            raise UserError(f"model.pattern_lock: the model is {sparsity:.1%} sparse, below model.min_sparsity "
                            f"({m.min_sparsity:.0%}); pattern-lock needs a sparse pre-trained model (or set "
                            f"model.pattern_lock=false to fine-tune a dense one)")
    if recipe.pruning is not None:
        t = recipe.training
        recipe.pruning.check_length(t.max_steps or 2 ** 62, int(t.warmup_ratio * t.max_steps) if t.max_steps else 0)
        recipe.pruning.check_against_model(meta_skeleton(cls, config))   # ConfigError naming pruning.include[i], ...
    return []

