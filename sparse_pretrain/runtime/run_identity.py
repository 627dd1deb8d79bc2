"""What defines a training run, recorded beside its checkpoints, so that a rerun into the same
output directory resumes only the same run.

Every stage (pre-training, fine-tuning, QAT) resumes automatically from the newest checkpoint in
its output directory. That is only right when the checkpoint belongs to the run being started: a
recipe with another task, stage, schedule, model or data must not pick up someone else's state
and then overwrite their exported model. So each run writes ``<output_dir>/run.json`` with its
first checkpoint: the recipe keys that change results, and a digest of each input (model, teacher,
data). Before any weights load, a run that finds a checkpoint or an exported model in its output
directory compares the two records and refuses to start when they differ, naming the keys that
differ and the two ways out: another output directory, or the recipe's
``training.discard_different_run=true``, which deletes the old run's outputs first (a run whose
record matches is never discarded, so the key is safe to leave set for requeued jobs).

Keys that only say where or how often to write, how to place the work (ZeRO stage, micro-batch,
world size: a run may resume on another layout) or how to log are not part of the identity.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Mapping, Optional

from sparse_pretrain.runtime.atomic import write_text
from sparse_pretrain.runtime.schema import ConfigError

RUN_FILE = "run.json"
DISCARD_KEY = "training.discard_different_run"
#: what a stage writes into its output directory; the discard removes exactly these
RUN_OUTPUTS = ("checkpoints", "state", "model", "model-int8", "metrics.json", "tensorboard", "PREEMPTED", RUN_FILE)
_SAMPLE = 1 << 20      # bytes read from each end of a large file for its digest
_WHOLE = 64 << 20      # files up to this size are hashed whole


def file_digest(path: Path) -> str:
    """SHA-256 of a file's size and contents; of a large file, its size and first and last MiB
    (enough to tell weights apart: a safetensors header lists every tensor's offsets, and the
    last MiB is data), so an 8B-parameter checkpoint is identified in milliseconds."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= _WHOLE:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        else:
            h.update(f.read(_SAMPLE))
            f.seek(size - _SAMPLE)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def model_identity(name_or_path: Optional[str]) -> Optional[str]:
    """A local model directory: a digest of its config and weight files; a hub name: the name."""
    if name_or_path is None:
        return None
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return f"hub:{name_or_path}"
    files = [p for p in sorted(path.iterdir()) if p.is_file() and (
        p.name == "config.json" or p.suffix in (".safetensors", ".bin", ".pt", ".pth"))]
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.name}:{file_digest(p)}\n".encode())
    return f"sha256:{h.hexdigest()}"


def files_identity(paths: Iterable[str | Path]) -> str:
    """A digest of data files' names and contents (in the order given)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update(f"{p.name}:{file_digest(p) if p.is_file() else 'missing'}\n".encode())
    return f"sha256:{h.hexdigest()}"


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """``{"training": {"seed": 1}}`` -> ``{"training.seed": 1}`` (lists and scalars are leaves)."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def run_identity(recipe_tree: Mapping, ignored: Iterable[str], inputs: Mapping[str, Optional[str]]) -> dict:
    """The record: every recipe key except ``ignored`` (dotted keys, or section prefixes ending
    in "."), and ``inputs`` (e.g. ``{"model": model_identity(...), "data": ...}``) under ``inputs.``."""
    ignored = tuple(ignored) + (DISCARD_KEY,)
    keys = {k: v for k, v in flatten(recipe_tree).items()
            if not any(k == i or (i.endswith(".") and k.startswith(i)) for i in ignored)}
    # JSON round trip: tuples become lists, as they will be when the record is read back
    return json.loads(json.dumps({**keys, **{f"inputs.{k}": v for k, v in inputs.items()}}, default=str))


def has_run(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds a run's checkpoint, exported model or record."""
    return any((output_dir / name).exists() for name in ("checkpoints", "state", "model", "model-int8", RUN_FILE))


def differences(recorded: Mapping, current: Mapping) -> list[str]:
    return [f"{k}: {_short(recorded.get(k, '(absent)'))} -> {_short(current.get(k, '(absent)'))}"
            for k in sorted(set(recorded) | set(current)) if recorded.get(k, "(absent)") != current.get(k, "(absent)")]


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


def check_run(output_dir: Path, identity: Mapping, discard: bool, output_key: str = "training.output_dir") -> bool:
    """Raise :class:`ConfigError` if ``output_dir`` holds a different run (unless ``discard``).
    Returns True when the old run must be discarded (the caller does it on one process, with
    :func:`discard_run`, and makes the others wait). Reads only; every process may call it."""
    if not has_run(output_dir):
        return False
    record = output_dir / RUN_FILE
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded == identity:
            return False
        changed = differences(recorded, identity) if isinstance(recorded, dict) else [f"{record} is unreadable"]
    else:
        changed = [f"it has outputs but no {RUN_FILE} record (written with a run's first checkpoint)"]
    if discard:
        return True
    shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
    raise ConfigError(f"{output_key}: {output_dir} holds a different run ({shown}). Nothing was changed. "
                      f"Use a new {output_key}, or set {DISCARD_KEY}=true to delete that run's checkpoints and "
                      f"model and start afresh")


def discard_run(output_dir: Path) -> list[str]:
    """Delete what a run wrote into ``output_dir`` (:data:`RUN_OUTPUTS`; nothing else). The record
    goes first, so an interrupted discard still reads as a different run next time."""
    removed = []
    for name in (RUN_FILE,) + tuple(n for n in RUN_OUTPUTS if n != RUN_FILE):
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def record_run(output_dir: Path, identity: Mapping) -> None:
    """Write the record (atomically) unless it is there; call on one process, before the first
    checkpoint is written, so that no checkpoint exists without the record of its run."""
    record = output_dir / RUN_FILE
    if not record.is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text(record, json.dumps(identity, indent=1, sort_keys=True) + "\n")
