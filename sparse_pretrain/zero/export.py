"""Export a (sparse) model as a Hugging Face directory: config.json, model.safetensors, tokenizer,
and sparsity.json measured from the exported weights themselves (zeros are real zeros)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from sparse_pretrain.runtime.atomic import replacing_dir


def gather_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights (the optimizer's masters) and buffers, on rank 0 (others get {}).
    Collective: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param
    stage = engine.zero_optimization_stage()
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param) if stage > 0 and param.requires_grad else None
        if full is None:   # ZeRO-0 or a frozen parameter: the module holds it whole (or gathers it)
            if stage == 3:
                import deepspeed
                with deepspeed.zero.GatheredParameters([param]):
                    full = param.data.float().clone()
            else:
                full = param.data.float()
        if rank == 0:
            state[name] = full.detach().cpu().clone().view(getattr(param, "ds_shape", param.shape))
    if rank == 0:
        persistent = set(engine.module.state_dict().keys())   # not position_ids & co.
        for name, buffer in engine.module.named_buffers():
            if name in persistent:
                state[name] = buffer.detach().cpu().clone()
    return state


def layer_sparsity(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, float]:
    return {name: float((state[name] == 0).sum()) / state[name].numel() for name in names}


def export_model(model_class, config, state: dict[str, torch.Tensor], tokenizer, out_dir: Path,
                 pruned_names: list[str], target: Optional[float], extra: Optional[dict] = None) -> Path:
    """Write the directory atomically (a new one replaces an old only when complete)."""
    with replacing_dir(out_dir) as tmp:
        model = model_class(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied and not k.endswith("decoder.weight")]
        if missing or unexpected:
            raise RuntimeError(f"export: state dict does not match {model_class.__name__}: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        layers = layer_sparsity(state, pruned_names)
        total = sum(state[n].numel() for n in pruned_names)
        zeros = sum(int((state[n] == 0).sum()) for n in pruned_names)
        report = {"target": target, "global": zeros / total if total else 0.0, "pruned_parameters": total,
                  "layers": layers, **(extra or {})}
        (tmp / "sparsity.json").write_text(json.dumps(report, indent=2) + "\n")
    return out_dir
