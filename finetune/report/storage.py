"""How the report's tensors lie on disk: the model directory's safetensors checkpoint (read), the
*compact export* (written and read back), and the bytes each tensor occupies in a safetensors file.

Why a sparse model's file does not shrink: ``model.safetensors`` stores every tensor dense, so the
zeros of a pruned weight take as many bytes as any other value; a 90%-sparse fp32 BERT's file is as
large as the dense one's. Sparsity saves bytes only in a format that leaves the zeros out. The compact
export is such a format:

- every pruned weight is stored as its nonzero values at their stored precision (fp32, or int8 when
  the caller supplies quantized weights) plus the positions of those values, as a bitmask (one bit
  per element) or as delta-encoded indices (the gaps between successive nonzeros in the smallest
  unsigned integer type that holds them), whichever is smaller for that layer; or dense, when
  neither is smaller;
- every other tensor is stored dense, as it is (int8 ones with their scales and zero points).

The file is a safetensors file; the per-tensor encodings sit in its header's metadata.
:func:`load_compact` rebuilds the dense tensors: bit for bit, except that a pruned zero always
comes back as +0.0 (the pruner writes +0.0, but a checkpoint made by ``w * mask``, as the pruner
did before and other tools do, holds -0.0 where a negative weight was pruned; the two are the
same number and the sign of a pruned zero carries nothing).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from sparse_pretrain.core.masks import pack_mask, unpack_mask
from sparse_pretrain.runtime.atomic import replacing

COMPACT_FORMAT = "prune-ofa-compact/1"


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


def stored_bits(t: Union[torch.Tensor, QuantizedWeight]) -> int:
    """Bits per element at the stored precision: 8 for an int8 weight, else the tensor's dtype's."""
    return 8 if isinstance(t, QuantizedWeight) else t.element_size() * 8


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------------------------
# reading a model directory

def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: ``model.safetensors``, or the shards its index names."""
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
    for f in weight_files(Path(model_dir)):
        state.update(load_file(str(f)))
    return state


# --------------------------------------------------------------------------------------------
# the compact sparse export

def nonzero_mask(t: Union[torch.Tensor, QuantizedWeight]) -> torch.Tensor:
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
    keep = nonzero_mask(t)
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
