"""The compression report (``prune-ofa report``): sparsity of the pruned layers, the paper's nominal
compression ratio, and the real one, measured in bytes on disk.

Why a sparse model's file does not shrink: ``model.safetensors`` stores every tensor dense, so the
zeros of a pruned weight take as many bytes as any other value; a 90%-sparse fp32 BERT's file is as
large as the dense one's. Sparsity saves bytes only in a format that leaves the zeros out. This
module writes such a format (the *compact export*) and measures it:

- every pruned weight is stored as its nonzero values at their stored precision (fp32, or int8 when
  the caller supplies quantized weights) plus the positions of those values, as a bitmask (one bit
  per element) or as delta-encoded indices (the gaps between successive nonzeros in the smallest
  unsigned integer type that holds them), whichever is smaller for that layer; or dense, when
  neither is smaller;
- every other tensor is stored dense, as it is (int8 ones with their scales and zero points).

The file is a safetensors file; the per-tensor encodings sit in its header's metadata.
:func:`load_compact` rebuilds the dense tensors: bit for bit, except that a pruned zero always
comes back as +0.0 (the pruner's ``w * mask`` leaves -0.0 where a negative weight was pruned; the
two are the same number and the sign of a pruned zero carries nothing).

The *nominal* ratio is the paper's: fp32 dense bits over the bits of the nonzero values at the
stored precision (90% sparse + int8 = 32 / (0.1 * 8) = 40x); it ignores the positions, scales and
zero points a real format needs. Its "encoder" is the pruned set: the weight matrices of every
Linear of the encoder and the pooler (:func:`sparse_pretrain.core.masks.find_prunable` with the recipe's
default patterns), not biases, LayerNorm, embeddings or task heads. The whole-model figure counts
every floating-point tensor of the checkpoint, the pruned ones by their nonzeros and the rest dense.
"""
from __future__ import annotations

import json
import math
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from sparse_pretrain.runtime.atomic import replacing, write_text
from sparse_pretrain.core.masks import (DEFAULT_INCLUDE, DEFAULT_MODULE_TYPES, find_prunable, pack_mask,
                                   unpack_mask)

COMPACT_FORMAT = "prune-ofa-compact/1"
ENCODER_DEFINITION = (
    "the weight matrices of the pruned Linear layers: every Linear of the encoder and the pooler "
    "(find_prunable's selection); biases, LayerNorm, embeddings and task heads are not counted")
WHOLE_MODEL_DEFINITION = (
    "every floating-point tensor of the checkpoint: the pruned weights by their nonzero values, all "
    "others (embeddings, biases, LayerNorm, heads) dense at their stored precision")


# --------------------------------------------------------------------------------------------
# int8 weights, as the caller hands them over

@dataclass(frozen=True)
class QuantizedWeight:
    """An int8 (or uint8) weight: ``real = (data - zero_point) * scale``. ``scale`` and
    ``zero_point`` are scalars (per tensor) or 1-D along dimension ``axis`` (per channel)."""

    data: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    axis: int = 0

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if t.numel() == 1:
            return t.reshape(())
        shape = [1] * self.data.dim()
        shape[self.axis] = -1
        return t.reshape(shape)

    def zero_value(self) -> torch.Tensor:
        """The stored integer that means 0.0, at every position (the fill of pruned positions)."""
        return self._broadcast(self.zero_point).to(self.data.dtype).expand(self.data.shape)

    def dequantize(self) -> torch.Tensor:
        return ((self.data.to(torch.float32) - self._broadcast(self.zero_point).to(torch.float32))
                * self._broadcast(self.scale).to(torch.float32))


QuantizedLike = Union[QuantizedWeight, tuple, torch.Tensor]


def as_quantized(value: QuantizedLike) -> QuantizedWeight:
    """A :class:`QuantizedWeight` from itself, from ``(int8 tensor, scale(s), zero point(s)[, axis])``,
    or from a torch quantized tensor (``torch.quantize_per_tensor`` / ``quantize_per_channel``)."""
    if isinstance(value, torch.Tensor) and value.is_quantized:
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            value = (value.int_repr(), value.q_per_channel_scales(), value.q_per_channel_zero_points(),
                     value.q_per_channel_axis())
        else:
            value = (value.int_repr(), torch.tensor(value.q_scale()), torch.tensor(value.q_zero_point()))
    if not isinstance(value, QuantizedWeight):
        if not isinstance(value, (tuple, list)) or len(value) not in (3, 4):
            raise TypeError("a quantized weight is a QuantizedWeight or (int8 tensor, scale, zero_point[, axis])")
        data, scale, zero_point, *axis = value
        value = QuantizedWeight(data, torch.as_tensor(scale), torch.as_tensor(zero_point), *axis)
    q = value
    if q.data.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"quantized weights must be int8 or uint8, not {q.data.dtype}")
    axis = q.axis % max(q.data.dim(), 1)
    for what, t in (("scale", q.scale), ("zero_point", q.zero_point)):
        if t.numel() != 1 and (t.dim() != 1 or q.data.dim() == 0 or t.numel() != q.data.shape[axis]):
            raise ValueError(f"{what} of shape {tuple(t.shape)} is neither a scalar nor one per channel of "
                             f"dimension {axis} of a {tuple(q.data.shape)} weight")
    return QuantizedWeight(q.data.contiguous(), q.scale.detach().cpu().contiguous(),
                           q.zero_point.detach().cpu().contiguous(), axis)


def _stored_bits(t: Union[torch.Tensor, QuantizedWeight]) -> int:
    return 8 if isinstance(t, QuantizedWeight) else t.element_size() * 8


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# reading a model directory

def _weight_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    raise FileNotFoundError(f"{model_dir}: no model.safetensors (or model.safetensors.index.json); "
                            "the report reads safetensors checkpoints only")


def load_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors checkpoint (one file or shards), on the CPU."""
    from safetensors.torch import load_file
    state = {}
    for f in _weight_files(Path(model_dir)):
        state.update(load_file(str(f)))
    return state


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
                        include: Sequence[str] = DEFAULT_INCLUDE, exclude: Sequence[str] = (),
                        shapes: Optional[Mapping[str, torch.Size]] = None) -> tuple[list[str], str]:
    """The checkpoint names of the pruned weights and how they were found.

    First choice: :func:`find_prunable` on the model built from ``config.json`` on the meta device
    (no weights allocated). Without a buildable config: the same ``include``/``exclude`` patterns on
    the checkpoint's 2-D ``*.weight`` tensors (a pattern names a module, the tensor is its weight).
    """
    model_dir = Path(model_dir)
    try:
        import transformers
        config = transformers.AutoConfig.from_pretrained(model_dir)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception as err:   # no config, unknown architecture: fall back on the patterns
        model, why = None, f"{type(err).__name__}: {err}"
    if model is not None:
        selected = [name for name, _ in find_prunable(model, module_types, include, exclude)]
        resolved = [_match_name(name, names) for name in selected]
        missing = [s for s, r in zip(selected, resolved) if r is None]
        if missing:
            raise ValueError(f"{model_dir}: pruned weights {missing[:5]} of {type(model).__name__} are not "
                             "in the checkpoint")
        return resolved, (f"find_prunable on {type(model).__name__} built from config.json on the meta device "
                          f"(module types {list(module_types)}, include {list(include)}, exclude {list(exclude)})")
    shapes = shapes or {}
    selected = [n for n in names if n.endswith(".weight") and len(shapes.get(n, (0, 0))) == 2
                and any(re.fullmatch(p, n[:-len(".weight")]) for p in include)
                and not any(re.fullmatch(p, n[:-len(".weight")]) for p in exclude)]
    if not selected:
        raise ValueError(f"{model_dir}: no model could be built from config.json ({why}) and the patterns "
                         f"{list(include)} match no 2-D weight of the checkpoint")
    return selected, (f"include {list(include)} / exclude {list(exclude)} on the checkpoint's 2-D weights "
                      f"(no model could be built from config.json: {why})")


# --------------------------------------------------------------------------------------------
# the compact sparse export

def _nonzero_mask(t: Union[torch.Tensor, QuantizedWeight]) -> torch.Tensor:
    """Flat bool: positions holding a nonzero value (-0.0 is zero; for int8, != the zero point)."""
    if isinstance(t, QuantizedWeight):
        return (t.data != t.zero_value()).reshape(-1)
    return (t != 0).reshape(-1)


def _flat_data(t: Union[torch.Tensor, QuantizedWeight]) -> torch.Tensor:
    return (t.data if isinstance(t, QuantizedWeight) else t).reshape(-1)


def _gap_dtype(max_gap: int) -> torch.dtype:
    for dtype, limit in ((torch.uint8, 2 ** 8 - 1), (torch.uint16, 2 ** 16 - 1), (torch.int32, 2 ** 31 - 1)):
        if max_gap <= limit:
            return dtype
    return torch.int64


def _encode(t: Union[torch.Tensor, QuantizedWeight]) -> tuple[str, dict[str, torch.Tensor]]:
    """The smallest of dense / bitmask / delta for one pruned weight: (encoding, tensors by suffix)."""
    flat = _flat_data(t)
    keep = _nonzero_mask(t)
    n, k, b = flat.numel(), int(keep.sum()), flat.element_size()
    index = keep.nonzero().reshape(-1)
    gaps = torch.diff(index, prepend=index.new_tensor([-1])) - 1      # >= 0; index = cumsum(gaps + 1) - 1
    gap_dtype = _gap_dtype(int(gaps.max()) if k else 0)
    sizes = {"dense": n * b,
             "bitmask": k * b + math.ceil(n / 8),
             "delta": k * b + k * torch.empty((), dtype=gap_dtype).element_size()}
    encoding = min(sizes, key=lambda e: (sizes[e], ("dense", "bitmask", "delta").index(e)))
    if encoding == "dense":
        return encoding, {"data": flat.reshape(t.data.shape if isinstance(t, QuantizedWeight) else t.shape).clone()}
    values = flat[keep].clone()
    if encoding == "bitmask":
        return encoding, {"values": values, "bitmask": pack_mask(keep)}
    return encoding, {"values": values, "gaps": gaps.to(gap_dtype)}


def write_compact(state: Mapping[str, torch.Tensor], pruned: Sequence[str], path: str | Path,
                  quantized: Optional[Mapping[str, QuantizedLike]] = None) -> dict[str, dict]:
    """Write the compact export of ``state`` (tensors named as in the checkpoint) to ``path``,
    atomically; ``quantized`` (checkpoint name -> int8 weight) replaces those tensors. The tensors in
    ``pruned`` are sparse-encoded, all others stored dense. Returns, per tensor, its entry in the
    file's metadata and the file keys holding it."""
    from safetensors.torch import save_file
    quantized = {name: as_quantized(q) for name, q in (quantized or {}).items()}
    names = list(dict.fromkeys([*state.keys(), *quantized.keys()]))
    unknown = [name for name in pruned if name not in names]
    if unknown:
        raise KeyError(f"pruned weights not in the state: {unknown[:5]}")
    pruned = set(pruned)
    tensors, entries = {}, {}
    for name in names:
        if "::" in name:
            raise ValueError(f"tensor name {name!r} contains '::', which the compact format reserves")
        t = quantized.get(name, state.get(name))
        q = isinstance(t, QuantizedWeight)
        entry = {"shape": list(t.data.shape if q else t.shape), "dtype": _dtype_name(t.data.dtype if q else t.dtype)}
        if name in pruned:
            encoding, parts = _encode(t)
        else:
            encoding, parts = "dense", {"data": (t.data if q else t).contiguous().clone()}
        if q:
            parts = {**parts, "scale": t.scale.clone(), "zero_point": t.zero_point.clone()}
        entry["encoding"] = encoding
        entry["keys"] = {suffix: _compact_key(name, suffix, q) for suffix in parts}
        for suffix, part in parts.items():
            tensors[entry["keys"][suffix]] = part.contiguous()
        if q:
            entry["quantized"] = {"axis": t.axis}
        entries[name] = entry
    # the header already holds every key's dtype and shape: the metadata lists only what a plain
    # tensor does not say (a name without '::' is a plain dense tensor and has no entry)
    layout = {name: [e["encoding"], e["shape"], e["dtype"], e.get("quantized", {}).get("axis")]
              for name, e in entries.items() if set(e["keys"].values()) != {name}}
    metadata = {"format": "pt", COMPACT_FORMAT: json.dumps(layout, separators=(",", ":"))}
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return entries


def _compact_key(name: str, suffix: str, quantized: bool) -> str:
    return name if suffix == "data" and not quantized else f"{name}::{suffix}"


def load_compact(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """The dense tensors of a compact export: (unquantized tensors, int8 weights), by checkpoint name."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if COMPACT_FORMAT not in meta:
            raise ValueError(f"{path} is not a compact export ({COMPACT_FORMAT})")
        layout = json.loads(meta[COMPACT_FORMAT])
        keys = list(f.keys())
        tensors = {key: f.get_tensor(key) for key in keys if "::" not in key}
        quantized = {}
        for name, (encoding, shape, dtype, axis) in layout.items():
            parts = {key.split("::", 1)[1]: f.get_tensor(key) for key in keys if key.startswith(f"{name}::")}
            shape, dtype = torch.Size(shape), getattr(torch, dtype)
            if encoding == "dense":
                data = parts["data"]
            else:
                if axis is not None:
                    fill = QuantizedWeight(torch.empty(shape, dtype=dtype), parts["scale"], parts["zero_point"],
                                           axis).zero_value().reshape(-1).clone()
                else:
                    fill = torch.zeros(shape.numel(), dtype=dtype)
                if encoding == "bitmask":
                    fill[unpack_mask(parts["bitmask"], shape.numel())] = parts["values"]
                else:
                    fill[torch.cumsum(parts["gaps"].to(torch.int64) + 1, 0) - 1] = parts["values"]
                data = fill.reshape(shape)
            if axis is not None:
                quantized[name] = QuantizedWeight(data, parts["scale"], parts["zero_point"], axis)
            else:
                tensors[name] = data
    return tensors, quantized


def tensor_bytes(path: str | Path) -> tuple[dict[str, int], int]:
    """Bytes each tensor occupies in a safetensors file, from its header's offsets, and the header's
    own bytes (length prefix + JSON): what the file holds, measured, not computed from shapes."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return {key: end - start for key, (start, end) in
            ((k, v["data_offsets"]) for k, v in header.items())}, 8 + length


# --------------------------------------------------------------------------------------------
# the report

def _ratio(num: float, den: float) -> Optional[float]:
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
                 module_types: Sequence[str] = DEFAULT_MODULE_TYPES, include: Sequence[str] = DEFAULT_INCLUDE,
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
    files = _weight_files(model_dir)
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
        nonzeros = int(_nonzero_mask(t).sum())
        bits = _stored_bits(t)
        entry = entries[name]
        layer = {"name": name, "shape": entry["shape"], "numel": numel,
                 "stored_as": entry["dtype"],
                 "zeros": numel - nonzeros, "nonzeros": nonzeros, "sparsity": (numel - nonzeros) / numel,
                 "encoding": entry["encoding"],
                 "compact_bytes": sum(compact_tensor_bytes[k] for k in entry["keys"].values()),
                 "dense_fp32_bytes": dense_tensor_bytes[name],
                 "nominal_ratio": _ratio(32 * numel, nonzeros * bits)}
        if name in quant:
            fp32_zeros = int((state[name] == 0).sum())
            layer["checkpoint_sparsity"] = fp32_zeros / numel     # of the file's own (fp32) tensor
        layers.append(layer)

    enc_numel = sum(l["numel"] for l in layers)
    enc_zeros = sum(l["zeros"] for l in layers)
    enc_bits = sum(l["nonzeros"] * _stored_bits(stored[l["name"]]) for l in layers)
    floating = [n for n, t in state.items() if t.is_floating_point()]
    model_numel = sum(state[n].numel() for n in floating)
    model_bits = enc_bits + sum(state[n].numel() * _stored_bits(stored[n]) for n in floating if n not in pruned_set)
    enc_dense = sum(l["dense_fp32_bytes"] for l in layers)
    enc_compact = sum(l["compact_bytes"] for l in layers)
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
                        "ratio": _ratio(32 * enc_numel, enc_bits)},
            "whole_model": {"definition": WHOLE_MODEL_DEFINITION, "parameters": model_numel,
                            "dense_fp32_bits": 32 * model_numel, "stored_bits": model_bits,
                            "ratio": _ratio(32 * model_numel, model_bits)},
        },
        "real": {
            "original": {"files": [str(f) for f in files], "bytes": original_bytes},
            "dense_fp32": {"bytes": dense_bytes, "source": dense_source},
            "compact": {"path": str(compact_path) if compact_path is not None else None,
                        "bytes": compact_bytes, "header_bytes": compact_header_bytes, "format": COMPACT_FORMAT},
            "ratio_vs_dense_fp32": _ratio(dense_bytes, compact_bytes),
            "ratio_vs_original": _ratio(original_bytes, compact_bytes),
            "encoder": {"dense_fp32_bytes": enc_dense, "compact_bytes": enc_compact,
                        "ratio": _ratio(enc_dense, enc_compact),
                        "note": "tensor bytes of the pruned weights inside each file (from the safetensors "
                                "headers), their positions, scales and zero points included"},
        },
        "metrics": compare_metrics(metrics, baseline),
        "notes": notes,
    }


def _x(ratio: Optional[float]) -> str:
    return "n/a (nothing stored)" if ratio is None else f"{ratio:.2f}x"


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def format_markdown(report: dict) -> str:
    nom, real, sp = report["nominal"], report["real"], report["sparsity"]
    enc, whole = nom["encoder"], nom["whole_model"]
    lines = [f"# Compression report: `{report['model_dir']}`", "",
             f"**Encoder** (what the ratios below call the encoder): {enc['definition']}. "
             f"{report['selection']['pruned_tensors']} tensors, {enc['parameters']} weights; selected by "
             f"{report['selection']['method']}.", "",
             "## Sparsity", "",
             f"Encoder sparsity: **{sp['encoder']:.2%}** ({sp['zeros']} of {sp['parameters']} weights are zero)."]
    if sp.get("declared"):
        lines.append(f"Declared in sparsity.json: target {sp['declared']['target']}, global "
                     f"{sp['declared']['global']}.")
    lines += ["", "| layer | shape | stored as | sparsity | nonzeros | encoding | bytes (compact) "
                  "| bytes (dense fp32) | nominal |",
              "|---|---|---|---:|---:|---|---:|---:|---:|"]
    for l in report["layers"]:
        lines.append(f"| {l['name']} | {'x'.join(map(str, l['shape']))} | {l['stored_as']} | {l['sparsity']:.2%} "
                     f"| {l['nonzeros']} | {l['encoding']} | {l['compact_bytes']} | {l['dense_fp32_bytes']} "
                     f"| {_x(l['nominal_ratio'])} |")
    lines += ["", "## Compression", "", "### Nominal (the paper's formula)", "",
              f"{nom['formula']}; positions, scales and zero points are not counted.", "",
              f"- Encoder: {enc['dense_fp32_bits']} / {enc['stored_bits']} bits = **{_x(enc['ratio'])}**",
              f"- Whole model ({whole['definition']}): {whole['dense_fp32_bits']} / {whole['stored_bits']} "
              f"bits = **{_x(whole['ratio'])}**", "",
              "### Real (bytes measured on disk)", "",
              "| file | bytes | dense fp32 / this |", "|---|---:|---:|",
              f"| dense fp32 safetensors ({real['dense_fp32']['source']}) | {real['dense_fp32']['bytes']} | 1.00x |",
              f"| original checkpoint | {real['original']['bytes']} "
              f"| {_x(_ratio(real['dense_fp32']['bytes'], real['original']['bytes']))} |",
              f"| compact sparse export{' (' + real['compact']['path'] + ')' if real['compact']['path'] else ''} "
              f"| {real['compact']['bytes']} | **{_x(real['ratio_vs_dense_fp32'])}** |", "",
              f"Compact export vs the original checkpoint: {_x(real['ratio_vs_original'])}. Encoder alone, "
              f"tensor bytes inside the files: {real['encoder']['dense_fp32_bytes']} dense fp32 -> "
              f"{real['encoder']['compact_bytes']} compact = **{_x(real['encoder']['ratio'])}** "
              "(positions, scales and zero points included).", "",
              "### Why the model file did not shrink", ""]
    lines += [f"- {note}" for note in report["notes"]]
    if report["metrics"]:
        lines += ["", "## Task metrics", "", "| metric | this model | dense baseline | delta | relative |",
                  "|---|---:|---:|---:|---:|"]
        for name, m in report["metrics"].items():
            rel = "-" if m["relative"] is None else f"{m['relative']:+.2%}"
            delta = "-" if m["delta"] is None else f"{m['delta']:+.4f}"
            lines.append(f"| {name} | {_num(m['value'])} | {_num(m['baseline'])} | {delta} | {rel} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.md`` in ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_text(json_path, json.dumps(report, indent=2) + "\n")
    write_text(md_path, format_markdown(report))
    return json_path, md_path
