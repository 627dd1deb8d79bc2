"""What the report counts: which tensors are the pruned ones, their sparsity, the paper's nominal
compression ratio and the real one, measured in bytes on disk (:func:`build_report`).

The *nominal* ratio is the paper's: fp32 dense bits over the bits of the nonzero values at the
stored precision (90% sparse + int8 = 32 / (0.1 * 8) = 40x); it ignores the positions, scales and
zero points a real format needs. Its "encoder" is the pruned set: the weight matrices of every
Linear inside the model's repeated blocks and the pooler (:func:`sparse_pretrain.core.masks.find_prunable`
with the recipe's selection), not biases, LayerNorm, embeddings or task heads. The whole-model figure counts
every floating-point tensor of the checkpoint, the pruned ones by their nonzeros and the rest dense.
The *real* ratio compares the dense fp32 safetensors file with the compact export
(:mod:`finetune.report.storage`), both measured.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from finetune.report.storage import (
    COMPACT_FORMAT,
    QuantizedLike,
    as_quantized,
    load_state,
    nonzero_mask,
    stored_bits,
    tensor_bytes,
    weight_files,
    write_compact,
)
from sparse_pretrain.core.masks import DEFAULT_INCLUDE, DEFAULT_MODULE_TYPES, find_prunable

ENCODER_DEFINITION = (
    "the weight matrices of the pruned Linear layers: by default every Linear inside the model's repeated "
    "blocks and the pooler (find_prunable's selection); biases, LayerNorm, embeddings and heads are not counted")
WHOLE_MODEL_DEFINITION = (
    "every floating-point tensor of the checkpoint: the pruned weights by their nonzero values, all "
    "others (embeddings, biases, LayerNorm, heads) dense at their stored precision")


# --------------------------------------------------------------------------------------------
# the pruned weights of a checkpoint

def _match_name(name: str, names: Sequence[str]) -> Optional[str]:
    """``name`` among ``names``: exactly, with ``.weight`` added, or as the unique suffix match
    (a checkpoint saved from the base model has no ``bert.`` prefix, and the other way round)."""
    for candidate in (name, f"{name}.weight"):
        if candidate in names:
            return candidate
    hits = [n for n in names for c in (name, f"{name}.weight")
            if n.endswith("." + c) or c.endswith("." + n)]
    return hits[0] if len(set(hits)) == 1 else None


def pruned_weight_names(model_dir: str | Path, names: Sequence[str],
                        module_types: Sequence[str] = DEFAULT_MODULE_TYPES,
                        include: Optional[Sequence[str]] = DEFAULT_INCLUDE, exclude: Sequence[str] = (),
                        shapes: Optional[Mapping[str, torch.Size]] = None) -> tuple[list[str], str]:
    """The checkpoint names of the pruned weights and how they were found.

    First choice: :func:`find_prunable` on the model built from ``config.json`` on the meta device
    (no weights allocated). Without a buildable config: the same ``include``/``exclude`` patterns on
    the checkpoint's 2-D ``*.weight`` tensors (a pattern names a module, the tensor is its weight); the
    default (``include`` None) is the model's structure, which needs the model.
    """
    model_dir = Path(model_dir)
    try:
        import transformers
        config = transformers.AutoConfig.from_pretrained(model_dir)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception as err:   # noqa: BLE001  (no config, unknown architecture: fall back on the patterns)
        model, why = None, f"{type(err).__name__}: {err}"
    if model is not None:
        selected = [name for name, _ in find_prunable(model, module_types, include, exclude)]
        resolved = [_match_name(name, names) for name in selected]
        missing = [s for s, r in zip(selected, resolved) if r is None]
        if missing:
            raise ValueError(f"{model_dir}: pruned weights {missing[:5]} of {type(model).__name__} are not "
                             "in the checkpoint")
        chosen = "the repeated blocks and the pooler" if include is None else list(include)
        return resolved, (f"find_prunable on {type(model).__name__} built from config.json on the meta device "
                          f"(module types {list(module_types)}, include {chosen}, exclude {list(exclude)})")
    shapes = shapes or {}
    two_d = [n for n in names if n.endswith(".weight") and len(shapes.get(n, (0, 0))) == 2
             and not any(re.fullmatch(p, n[:-len(".weight")]) for p in exclude)]
    if include is None:      # the structure read from the names: the 2-D weights of numbered layers, the pooler
        stack_of = {n: found[1] for n in two_d if (found := re.match(r"(.+?)\.\d+\.", n))}
        stacks = set(stack_of.values())
        selected = [n for n in two_d if n in stack_of or re.fullmatch(r"(.*\.)?pooler\.dense\.weight", n)]
        if not stacks:
            raise ValueError(f"{model_dir}: no model could be built from config.json ({why}) and no 2-D weight "
                             "of the checkpoint is in a numbered layer: name the pruned modules with include patterns")
        return selected, (f"the 2-D weights of the numbered layers of {', '.join(sorted(stacks))} and the pooler, "
                          f"by name (no model could be built from config.json: {why})")
    selected = [n for n in two_d if any(re.fullmatch(p, n[:-len(".weight")]) for p in include)]
    if not selected:
        raise ValueError(f"{model_dir}: no model could be built from config.json ({why}) and the patterns "
                         f"{list(include)} match no 2-D weight of the checkpoint")
    return selected, (f"include {list(include)} / exclude {list(exclude)} on the checkpoint's 2-D weights "
                      f"(no model could be built from config.json: {why})")


# --------------------------------------------------------------------------------------------
# the report

def ratio_or_none(num: float, den: float) -> Optional[float]:
    return num / den if den else None        # None: nothing stored (JSON has no infinity)


def compare_metrics(metrics: Optional[Mapping[str, float]], baseline: Optional[Mapping[str, float]]) -> dict:
    """Per metric: the sparse model's value, the dense baseline's, delta (value - baseline) and the
    relative change; a metric only one side has is listed with None on the other."""
    metrics, baseline = dict(metrics or {}), dict(baseline or {})
    out = {}
    for name in dict.fromkeys([*metrics, *baseline]):
        value, base = metrics.get(name), baseline.get(name)
        delta = None if value is None or base is None else float(value) - float(base)
        out[name] = {"value": value, "baseline": base, "delta": delta,
                     "relative": None if delta is None or not base else delta / float(base)}
    return out


def build_report(model_dir: str | Path, *, quantized: Optional[Mapping[str, QuantizedLike]] = None,
                 metrics: Optional[Mapping[str, float]] = None, baseline: Optional[Mapping[str, float]] = None,
                 compact_path: Optional[str | Path] = None,
                 module_types: Sequence[str] = DEFAULT_MODULE_TYPES, include: Optional[Sequence[str]] = DEFAULT_INCLUDE,
                 exclude: Sequence[str] = ()) -> dict:
    """The compression report of a (sparse, optionally int8) Hugging Face model directory, JSON-able.

    ``quantized`` maps layer names (checkpoint names, with or without ``.weight``) to int8 weights
    (anything :func:`as_quantized` takes: :class:`QuantizedWeight`, ``(int8 tensor, scale(s), zero
    point(s)[, axis])`` or a torch quantized tensor); they replace the
    checkpoint's tensors of those names, as the quantized export will. ``metrics``/``baseline`` are
    task metrics of this model and of its dense baseline. The compact export is written to
    ``compact_path`` (kept) or to a temporary file (measured, then removed).
    """
    from safetensors.torch import save_file
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    state = load_state(model_dir)
    names = list(state)
    quant = {}
    for key, value in (quantized or {}).items():
        name = _match_name(key, names)
        if name is None:
            raise KeyError(f"quantized weight {key!r} matches no tensor of {model_dir}")
        q = as_quantized(value)
        if tuple(q.data.shape) != tuple(state[name].shape):
            raise ValueError(f"quantized weight {key!r} has shape {tuple(q.data.shape)}, the checkpoint's "
                             f"{name} {tuple(state[name].shape)}")
        quant[name] = q
    stored = {name: quant.get(name, t) for name, t in state.items()}
    pruned, selection = pruned_weight_names(model_dir, names, module_types, include, exclude,
                                            shapes={n: t.shape for n, t in state.items()})

    with tempfile.TemporaryDirectory(prefix="prune-ofa-report.") as tmp:
        tmp = Path(tmp)
        compact = Path(compact_path) if compact_path is not None else tmp / "model.compact.safetensors"
        entries = write_compact(state, pruned, compact, quant)
        compact_bytes, compact_header = compact.stat().st_size, tensor_bytes(compact)
        # the dense fp32 reference: the original file itself when it already is one
        originally_fp32 = all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())
        if originally_fp32 and len(files) == 1:
            dense_path, dense_source = files[0], "the original file, already dense fp32"
        else:
            dense_path, dense_source = tmp / "dense_fp32.safetensors", "written in fp32 for this report"
            save_file({n: (t.float() if t.is_floating_point() else t).contiguous() for n, t in state.items()},
                      str(dense_path), metadata={"format": "pt"})
        dense_bytes = dense_path.stat().st_size
        dense_tensor_bytes, _ = tensor_bytes(dense_path)
    original_bytes = sum(f.stat().st_size for f in files)
    compact_tensor_bytes, compact_header_bytes = compact_header

    # per pruned layer
    layers, pruned_set = [], set(pruned)
    for name in pruned:
        t = stored[name]
        numel = state[name].numel()
        nonzeros = int(nonzero_mask(t).sum())
        bits = stored_bits(t)
        entry = entries[name]
        layer = {"name": name, "shape": entry["shape"], "numel": numel,
                 "stored_as": entry["dtype"],
                 "zeros": numel - nonzeros, "nonzeros": nonzeros, "sparsity": (numel - nonzeros) / numel,
                 "encoding": entry["encoding"],
                 "compact_bytes": sum(compact_tensor_bytes[k] for k in entry["keys"].values()),
                 "dense_fp32_bytes": dense_tensor_bytes[name],
                 "nominal_ratio": ratio_or_none(32 * numel, nonzeros * bits)}
        if name in quant:
            fp32_zeros = int((state[name] == 0).sum())
            layer["checkpoint_sparsity"] = fp32_zeros / numel     # of the file's own (fp32) tensor
        layers.append(layer)

    enc_numel = sum(row["numel"] for row in layers)
    enc_zeros = sum(row["zeros"] for row in layers)
    enc_bits = sum(row["nonzeros"] * stored_bits(stored[row["name"]]) for row in layers)
    floating = [n for n, t in state.items() if t.is_floating_point()]
    model_numel = sum(state[n].numel() for n in floating)
    model_bits = enc_bits + sum(state[n].numel() * stored_bits(stored[n]) for n in floating if n not in pruned_set)
    enc_dense = sum(row["dense_fp32_bytes"] for row in layers)
    enc_compact = sum(row["compact_bytes"] for row in layers)
    pruned_bytes_in_original = sum(state[n].numel() * state[n].element_size() for n in pruned)

    declared = None
    sparsity_json = model_dir / "sparsity.json"
    if sparsity_json.is_file():
        saved = json.loads(sparsity_json.read_text())
        declared = {"target": saved.get("target"), "global": saved.get("global")}

    notes = [
        f"The original checkpoint ({', '.join(f.name for f in files)}) stores every tensor dense: the "
        f"{enc_zeros} zeros of the pruned weights take as many bytes as nonzero values "
        f"({pruned_bytes_in_original} bytes hold the pruned weights there, zeros included). Sparsity "
        "shrinks a file only in a sparse format such as the compact export.",
        "The nominal ratio counts only the bits of the nonzero values; the real one pays for their "
        "positions (bitmask or delta indices), scales, zero points and the file header, and is measured.",
    ]
    if quant:
        notes.append(f"{len(quant)} tensor(s) are counted as int8 (supplied by the caller, replacing the "
                     "checkpoint's tensors); their zeros are the positions holding the zero point.")
    missing_quant = [n for n in pruned if n not in quant]
    if quant and missing_quant:
        notes.append(f"{len(missing_quant)} pruned weight(s) had no int8 version and count at their "
                     f"checkpoint precision: {missing_quant[:3]}{' ...' if len(missing_quant) > 3 else ''}")

    return {
        "model_dir": str(model_dir),
        "selection": {"method": selection, "encoder_definition": ENCODER_DEFINITION,
                      "pruned_tensors": len(pruned)},
        "sparsity": {"encoder": enc_zeros / enc_numel if enc_numel else 0.0, "zeros": enc_zeros,
                     "parameters": enc_numel, "declared": declared},
        "layers": layers,
        "nominal": {
            "formula": "fp32 dense bits / bits of the nonzero values at the stored precision",
            "encoder": {"definition": ENCODER_DEFINITION, "parameters": enc_numel,
                        "dense_fp32_bits": 32 * enc_numel, "stored_bits": enc_bits,
                        "ratio": ratio_or_none(32 * enc_numel, enc_bits)},
            "whole_model": {"definition": WHOLE_MODEL_DEFINITION, "parameters": model_numel,
                            "dense_fp32_bits": 32 * model_numel, "stored_bits": model_bits,
                            "ratio": ratio_or_none(32 * model_numel, model_bits)},
        },
        "real": {
            "original": {"files": [str(f) for f in files], "bytes": original_bytes},
            "dense_fp32": {"bytes": dense_bytes, "source": dense_source},
            "compact": {"path": str(compact_path) if compact_path is not None else None,
                        "bytes": compact_bytes, "header_bytes": compact_header_bytes, "format": COMPACT_FORMAT},
            "ratio_vs_dense_fp32": ratio_or_none(dense_bytes, compact_bytes),
            "ratio_vs_original": ratio_or_none(original_bytes, compact_bytes),
            "encoder": {"dense_fp32_bytes": enc_dense, "compact_bytes": enc_compact,
                        "ratio": ratio_or_none(enc_dense, enc_compact),
                        "note": "tensor bytes of the pruned weights inside each file (from the safetensors "
                                "headers), their positions, scales and zero points included"},
        },
        "metrics": compare_metrics(metrics, baseline),
        "notes": notes,
    }
