"""Preflight of a pre-training run (and of ``prune-ofa prepare-data``): what it will read, checked
before any weights load.

``check_pretrain(recipe)`` looks at every path and hub name the run will read (model, teacher,
tokenizer, data files, the DeepSpeed config), at whether transformers has the model class the run
builds (masked-LM, or pre-training with an NSP head), at the pruning section against the model's
structure on a meta-device skeleton, and at the attention implementation (one the model class does
not support falls back to one it does, with one printed line). Each problem is a
:class:`~sparse_pretrain.runtime.errors.UserError` naming the key, the path and what to do; the shared
checks are :mod:`sparse_pretrain.runtime.model_checks`. Fine-tuning's preflight is ``finetune.preflight``.

``hub_items(recipe)`` lists what the recipe reads from the hub (``prune-ofa fetch`` stages exactly
that); offline, a message about a missing one gives the ``prune-ofa fetch`` line for all of them.
"""
from __future__ import annotations

from pathlib import Path

from sparse_pretrain.runtime.errors import UserError, note
from sparse_pretrain.runtime.model_checks import (
    HubItem,
    check_files,
    check_hub_dataset,
    check_tokenizer,
    choose_attention,
    fetch_command,
    hub_model,
    load_config,
    meta_skeleton,
    model_class_for,
    model_source,
    supported_attention,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def deepspeed_config_path(value: str) -> Path:
    """``training.deepspeed_config`` as the trainer resolves it: as given, else under the project."""
    path = Path(value)
    return path if path.is_file() or not (PROJECT_ROOT / path).is_file() else PROJECT_ROOT / path


def pretraining_class(key: str, config, nsp: bool):
    """The class the pre-training trainer builds for ``config``: AutoModelForPreTraining with an NSP
    head when ``nsp``, else AutoModelForMaskedLM; both need a masked-LM head."""
    why = ("pre-training here is masked-LM (+ NSP) distillation, and causal LMs are not supported yet: give an "
           "encoder model (BERT, DistilBERT, RoBERTa, ...)")
    cls = model_class_for(key, config, "MODEL_FOR_MASKED_LM_MAPPING", "masked-LM", why)
    if not nsp:
        return cls
    import inspect
    cls = model_class_for(key, config, "MODEL_FOR_PRETRAINING_MAPPING", "pre-training", "set data.nsp=false")
    if "next_sentence_label" not in inspect.signature(cls.forward).parameters:
        raise UserError(f"data.nsp: {key} is a {cls.__name__}, which has no next-sentence head; set data.nsp=false")
    return cls


def hub_items(recipe, dataset: bool = True) -> list[HubItem]:
    """What a pre-training recipe reads from the hub: the model, the student's teacher, the tokenizer
    when it is another one, and (``dataset``: what prepare-data reads) the hub dataset unless
    ``data.data_files`` are given. Local paths (an earlier stage's output, a packaged model) are not
    hub items."""
    m, d = recipe.model, recipe.data
    items = [hub_model("model.name_or_path", m.name_or_path)]
    if recipe.stage == "student" and m.teacher_name_or_path not in (None, m.name_or_path):
        items.append(hub_model("model.teacher_name_or_path", m.teacher_name_or_path))
    if d.tokenizer_name_or_path not in (None, m.name_or_path):
        items.append(hub_model("data.tokenizer_name_or_path", d.tokenizer_name_or_path, weights=False))
    if dataset and not d.data_files and d.dataset_name:
        items.append(HubItem("dataset", d.dataset_name, "data.dataset_name", d.dataset_config))
    return [item for item in items if item is not None]


def config_nsp(recipe, config) -> bool:
    """``data.nsp`` resolved against the model's config already read (resolve_nsp reads it itself)."""
    from sparse_pretrain.data.prepare import NSP_MODEL_TYPES
    d = recipe.data
    return d.nsp == "true" if d.nsp != "auto" else config.model_type in NSP_MODEL_TYPES


def pruned_selection(recipe) -> str:
    """The weights a student recipe prunes, found on a meta-device skeleton of its model (config.json
    only), as :func:`~sparse_pretrain.core.masks.describe_selection` words them. UserError where the model's
    config cannot be read, ConfigError where the selection is wrong (a pattern that matches nothing)."""
    from sparse_pretrain.core.masks import describe_selection
    config = load_config("model.name_or_path", model_source("model.name_or_path", recipe.model.name_or_path,
                                                            weights=False))
    skeleton = meta_skeleton(pretraining_class("model.name_or_path", config, config_nsp(recipe, config)), config)
    selected = recipe.pruning.check_against_model(skeleton)
    return describe_selection([name for name, _ in selected], [p.numel() for _, p in selected])


def _prepared_already(recipe) -> bool:
    """The rows prepare-data would build are there (it then reads no dataset)."""
    from sparse_pretrain.data.prepare import INFO_FILE, prepared_path
    return (prepared_path(recipe) / INFO_FILE).is_file()


def check_pretrain(recipe, prepare_only: bool = False) -> list[str]:
    """Everything a pre-training run (``prepare_only``: ``prune-ofa prepare-data``) reads. Sets
    ``recipe.model.attn_implementation`` to one the model supports; returns the overrides it applied."""
    m, d, t = recipe.model, recipe.data, recipe.training
    tokenizer_key = "data.tokenizer_name_or_path" if d.tokenizer_name_or_path else "model.name_or_path"
    fetch = fetch_command(hub_items(recipe, dataset=prepare_only))
    student = model_source("model.name_or_path", m.name_or_path, weights=not prepare_only, fetch=fetch)
    if d.tokenizer_name_or_path:
        tokenizer = model_source(tokenizer_key, d.tokenizer_name_or_path, weights=False, fetch=fetch)
    else:
        tokenizer = student
    if d.data_files:
        check_files("data.data_files", d.data_files)
    if not prepare_only:
        ds_config = deepspeed_config_path(t.deepspeed_config)
        if not ds_config.is_file():
            raise UserError(f"training.deepspeed_config: no such file {t.deepspeed_config!r} (the shipped ones are "
                            f"{', '.join(sorted(p.name for p in (PROJECT_ROOT / 'ds_configs').glob('*.json')))} "
                            f"in ds_configs/)")
    config = load_config("model.name_or_path", student)
    check_tokenizer(tokenizer_key, tokenizer, pretraining=True)
    nsp = config_nsp(recipe, config)
    classes = [pretraining_class("model.name_or_path", config, nsp)]
    if prepare_only:
        if not d.data_files and d.dataset_name:
            try:
                check_hub_dataset("data.dataset_name", d.dataset_name, d.dataset_config,
                                  "give local files with data.data_files", fetch=fetch)
            except UserError:
                if not _prepared_already(recipe):    # rows built earlier (prune-ofa fetch --prepare) need none
                    raise
        return []
    if recipe.stage == "student":
        if m.teacher_name_or_path and m.teacher_name_or_path != m.name_or_path:
            teacher = model_source("model.teacher_name_or_path", m.teacher_name_or_path, fetch=fetch)
            teacher_config = load_config("model.teacher_name_or_path", teacher)
            classes.append(pretraining_class("model.teacher_name_or_path", teacher_config, nsp))
            if getattr(teacher_config, "vocab_size", None) != getattr(config, "vocab_size", None):
                raise UserError(f"model.teacher_name_or_path: its vocabulary has {teacher_config.vocab_size} tokens, "
                                f"the student's {config.vocab_size}: distillation needs the same vocabulary")
        # include/exclude patterns and block shapes against the structure: ConfigError naming the key
        recipe.pruning.check_against_model(meta_skeleton(classes[0], config))
    if t.vocab_rows == "needed":   # the MLM head must be one the row selection can find
        from sparse_pretrain.pretraining_loss import head_entry
        try:
            head_entry(meta_skeleton(classes[0], config))
        except ValueError as error:
            raise UserError(f"training.vocab_rows: {error}") from None
    applied = []
    chosen = choose_attention(m.attn_implementation, classes)
    if chosen != m.attn_implementation:
        note(f"model.attn_implementation: {classes[0].__name__} does not support {m.attn_implementation!r} here "
             f"(supported: {', '.join(supported_attention(classes[0]))}); using {chosen!r}")
        m.attn_implementation = chosen
        applied.append(f"model.attn_implementation={chosen}")
    return applied


