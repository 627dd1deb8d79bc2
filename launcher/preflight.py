"""The preflight of a stage, run before any process starts: each recipe's own checks of what it
will read (``sparse_pretrain.preflight`` for pre-training and prepare-data, ``finetune.preflight`` for
fine-tuning and QAT), chosen by the stage's name."""
from __future__ import annotations


def check_recipe(stage: str, recipe) -> list[str]:
    """The preflight of a stage (``pretrain``, ``prepare-data``, ``finetune``, ``qat``); returns the
    ``key=value`` overrides it applied to ``recipe`` (for the ranks a launch starts)."""
    if stage in ("pretrain", "prepare-data"):
        from sparse_pretrain.preflight import check_pretrain
        return check_pretrain(recipe, prepare_only=stage == "prepare-data")
    if stage in ("finetune", "qat"):
        from finetune.preflight import check_finetune
        return check_finetune(recipe)
    return []
