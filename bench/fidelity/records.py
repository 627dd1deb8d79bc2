"""What each finished stage of the study leaves in ``results/``: one JSON per teacher, per student and per
(seed, task, variant), written as soon as its stage ends, so nothing is lost between sessions or machines."""
from __future__ import annotations

import json
from pathlib import Path

from bench.fidelity.study import SPARSITY, TASK_VARIANTS, Stage, multiple


def tensorboard_last(run_dir: Path, tag: str):
    from launcher.demo_pipeline import tensorboard_series
    series = tensorboard_series(run_dir, tag)
    return series[max(series)] if series else None


def sparsity_check(model_dir: Path, target: float = SPARSITY) -> dict:
    """Zeros of the exported weights of every layer the default selection prunes, and whether each layer
    holds exactly the count the target asks for."""
    from safetensors.torch import load_file

    from finetune.report.accounting import pruned_weight_names
    from sparse_pretrain.core.threshold import pruned_count
    state = load_file(model_dir / "model.safetensors")
    names, _ = pruned_weight_names(model_dir, list(state))
    layers = {k: (int((state[k] == 0).sum()), state[k].numel()) for k in names}
    zeros, total = sum(z for z, _ in layers.values()), sum(n for _, n in layers.values())
    return {"encoder_sparsity": zeros / total, "pruned_layers": len(layers),
            "exact_per_layer": all(z == pruned_count(target, n) for z, n in layers.values())}


def record_path(results: Path, stage: Stage) -> Path:
    if stage.key == "teacher":
        return results / "teacher.json"
    return results / (stage.key + ".json")      # seed0/student-ofa.json, seed0/trec/prune-ofa.json


def stage_record(stage: Stage, scale_name: str, seconds: float) -> dict:
    record = {"key": stage.key, "scale": scale_name, "seed": stage.seed, "seconds": round(seconds, 1),
              "tokens": round(stage.tokens), "command": stage.command, "overrides": stage.overrides}
    if stage.command == "pretrain":
        record.update({"mlm_accuracy": tensorboard_last(stage.out, "eval/mlm_accuracy"),
                       "perplexity": tensorboard_last(stage.out, "eval/perplexity")})
        if stage.key != "teacher":
            record.update(sparsity_check(stage.out / "model"))
        return record
    variant = stage.key.rsplit("/", 1)[1]
    metrics = json.loads((stage.out / "metrics.json").read_text())
    record.update({"task": stage.task, "variant": variant, "title": TASK_VARIANTS[variant],
                   "accuracy": metrics["metrics"]["validation"]["accuracy"], "steps": metrics["steps"],
                   "budget_multiple": multiple(variant), "needs": list(stage.needs)})
    if variant == "dense":
        record["encoder_sparsity"] = 0.0
    else:
        record.update(sparsity_check(stage.out / "model"))
        record["sparsity_unchanged"] = metrics.get("sparsity_unchanged")
    if variant.startswith("ft-pruning-"):
        record["pruning_updates"] = metrics["pruning"]["updates"]
    return record


def load_records(results: Path) -> dict:
    """key -> record of every JSON under ``results`` (the scale's folder)."""
    records = {}
    for path in sorted(results.rglob("*.json")):
        if path.name.startswith(("summary", "inputs")):
            continue
        record = json.loads(path.read_text())
        records[record["key"]] = record
    return records
