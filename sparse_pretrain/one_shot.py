"""One-shot magnitude pruning of a sentence-embedding model, the experiment ``prune-ofa demo`` shows:
each method at a range of targets, through the real ``GradualPruner`` (one mask step straight to the
target), reporting the exact sparsity reached and how far the sentence embeddings moved from the dense
model's. It shows why the paper prunes gradually while distilling: one-shot pruning at 85-90% wrecks
the model.
"""
from __future__ import annotations

import copy
from pathlib import Path

SENTENCES = [
    "The committee approved the budget after a long debate.",
    "After hours of discussion, the panel accepted the spending plan.",
    "A small boat drifted slowly across the quiet harbour at dawn.",
    "The fishing vessel moved gently over the calm water in the early morning.",
    "She spent the whole afternoon reading novels in the garden.",
    "Heavy rain caused flooding in several villages along the river.",
    "The new vaccine reduced hospital admissions by half.",
    "Researchers trained a neural network to translate between languages.",
    "Mr. Darcy's pride was matched only by Elizabeth's prejudice.",
    "The stock market fell sharply on fears of rising interest rates.",
    "He forgot his umbrella and got soaked on the way home.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The orchestra played the symphony with remarkable precision.",
    "Volcanic eruptions can cool the planet for several years.",
    "The library extended its opening hours during the exam period.",
    "A sparse network keeps only a small fraction of its weights.",
]

CASES = [  # (label, method, options, targets)
    ("unstructured", "unstructured", {}, [0.1, 0.3, 0.5, 0.7, 0.85, 0.9]),
    ("block 1x4", "block", {"block_shape": [1, 4]}, [0.5, 0.8]),
    ("N:M 2:4", "nm", {"n": 2, "m": 4}, [0.5]),
]


def _embed(model, batch):
    """Mean-pooled, normalized sentence embeddings."""
    import torch
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def one_shot_rows(model_dir: Path, progress: bool = True) -> list[dict]:
    """One row per (method, target) of ``CASES``: the sparsity reached, whether every layer holds the
    exact pruned count, the zeros in the weights, and the mean cosine of the embeddings of
    ``SENTENCES`` to the dense model's."""
    from tqdm import tqdm
    from transformers import AutoModel, AutoTokenizer

    from sparse_pretrain.core.gmp_schedule import GMPSchedule
    from sparse_pretrain.core.masks import find_prunable, whole_parameters
    from sparse_pretrain.core.methods import build_method
    from sparse_pretrain.core.pruner import GradualPruner
    from sparse_pretrain.core.threshold import pruned_count

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = _embed(dense, batch)
    rows = []
    jobs = [(label, method, options, t) for label, method, options, targets in CASES for t in targets]
    for label, method_name, options, target in tqdm(jobs, desc="one-shot pruning", disable=not progress):
        model = copy.deepcopy(dense)
        method = build_method(method_name, **options)
        params = whole_parameters(find_prunable(model))
        pruner = GradualPruner(params, method, GMPSchedule(final_sparsity=target, start=0, policy_end=1,
                                                           end=1, interval=1))
        pruner.step()                   # step 0: target 0
        pruner.step()                   # step 1 = policy_end: the final target
        per_unit = {p.name: p.shape.numel() // method.units_per_weight(p.shape) for p in params}
        exact = all(int((~pruner.masks[p.name]).sum()) ==
                    pruned_count(target, method.units_per_weight(p.shape)) * per_unit[p.name] for p in params)
        zeros = sum(int((p.views()[0] == 0).sum()) for p in params)
        report = pruner.sparsity()
        cosine = float((_embed(model, batch) * reference).sum(-1).mean())
        rows.append({"method": label, "target": target, "sparsity": report["global"],
                     "weight_zeros": zeros, "exact_per_layer": exact, "layers": len(params),
                     "embedding_cosine": cosine})
    return rows
