"""The DeepSpeed JSON a pre-training recipe runs under: the recipe's file, with every "auto" filled
from the recipe and the world size, and the batch arithmetic checked."""
from __future__ import annotations

import json
from pathlib import Path

from sparse_pretrain.runtime.schema import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def deepspeed_config(recipe, world_size: int, use_bf16: bool) -> dict:
    """The recipe's DeepSpeed JSON with every "auto" filled and the batch arithmetic checked."""
    t = recipe.training
    path = Path(t.deepspeed_config)
    if not path.is_file() and (PROJECT_ROOT / path).is_file():
        path = PROJECT_ROOT / path
    if not path.is_file():
        raise ConfigError(f"training.deepspeed_config: no such file {t.deepspeed_config!r}")
    config = json.loads(path.read_text())
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(f"training.global_batch_size: {t.global_batch_size} is not divisible by "
                          f"micro_batch_size {t.micro_batch_size} x world size {world_size} = {per_step}")
    config.update(train_batch_size=t.global_batch_size, train_micro_batch_size_per_gpu=t.micro_batch_size,
                  gradient_accumulation_steps=t.global_batch_size // per_step, gradient_clipping=t.max_grad_norm)
    config["bf16"] = {"enabled": use_bf16}
    zero = config.setdefault("zero_optimization", {})
    if t.zero_stage is not None:
        zero["stage"] = t.zero_stage
    if t.zero3_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = t.zero3_persistence_threshold
    if t.compile and (zero.get("stage", 0) == 3 or recipe.model.teacher_zero3):
        raise ConfigError("training.compile: not with ZeRO-3 (its parameter hooks break torch.compile's graphs); "
                          "use ZeRO 0-2 or training.compile=false")
    if zero.get("stage", 0) != 3:
        for key in [k for k in zero if k.startswith("stage3_") or k == "offload_param"]:
            zero.pop(key)
    return config
