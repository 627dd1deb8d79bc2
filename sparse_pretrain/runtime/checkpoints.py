"""Checkpoints of a training run, for both recipes: complete or absent, whatever kills the run or fills
the disk. Engine-free: the engine's own part of a save (DeepSpeed's ``save_checkpoint``, Accelerate's
``save_state``) is passed in as ``write``.

Layout of a checkpoint directory (pre-training: ``<output_dir>/checkpoints``, fine-tuning:
``<output_dir>/state``)::

    .partial-step_00000300/   being written: the engine's files, each rank's own files, step.json
    step_00000200/            complete: renamed from .partial-step_00000200 once every rank had written
    latest                    names the newest complete checkpoint (replaced atomically, after the rename)

A run killed while saving resumes from the checkpoint ``latest`` names; what the kill left (a
``.partial-`` directory, a complete checkpoint ``latest`` does not name yet) goes at the next start
(:func:`remove_unfinished`). A save that fails on any rank (a full disk) fails on every rank with one
clear :class:`OSError` (:func:`save_failure`) and leaves the previous checkpoint as it was. ``keep``:
how many complete checkpoints stay (the newest).
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from sparse_pretrain.runtime.atomic import torch_save, write_text
from sparse_pretrain.runtime.pause_points import pause
from sparse_pretrain.runtime.run_identity import record_run
from sparse_pretrain.runtime.schema import ConfigError

PARTIAL = ".partial-"   # the name a checkpoint is written under until every rank has written its part
LATEST = "latest"
RECORD = "step.json"    # {"step": N, ...the recipe's record}: written last, by the main process
_NAME = re.compile(r"step_(\d+)")


def name_for(step: int) -> str:
    return f"step_{step:08d}"


# -- the random number generators a bitwise resume needs (Accelerate's save_state keeps its own) ------

def rng_states() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- reading ----------------------------------------------------------------------------------------

def latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    target = root / pointer.read_text().strip()
    if not (target / RECORD).is_file() and (target / "COMPLETE").is_file():
        raise ConfigError(f"{root}: {target.name} was written by an earlier prune-ofa (6-digit step names and a "
                          f"COMPLETE marker), which this version does not resume; finish the run with that version, "
                          f"or remove {root} to start it again")
    return target if (target / RECORD).is_file() else None


def record(checkpoint: Path) -> dict:
    """What :func:`save` wrote into ``checkpoint``'s step.json: the step and the recipe's record."""
    return json.loads((checkpoint / RECORD).read_text())


def _complete(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint under ``root``, oldest first."""
    found = []
    for path in root.glob("step_*"):
        match = _NAME.fullmatch(path.name)
        if match and (path / RECORD).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _retire(root: Path, current: Path, keep: int) -> None:
    """Remove complete checkpoints but ``current`` and the ``keep - 1`` newest others."""
    others = [path for _, path in _complete(root) if path != current]
    for old in others[:max(0, len(others) - max(0, keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def remove_unfinished(root: Path, keep: int = 1) -> None:
    """What a run killed while saving left under ``root``: checkpoints still under their temporary
    name, complete ones ``latest`` does not name yet (killed before it moved), and old ones retention
    had not removed yet. Main process, at start, before any rank reads."""
    if not root.is_dir():
        return
    current = latest(root)
    for path in root.glob(f"{PARTIAL}*"):
        if path.is_dir():
            shutil.rmtree(path)
    newest = record(current)["step"] if current is not None else None
    for step, path in _complete(root):
        if newest is None or step > newest:
            shutil.rmtree(path)
    if current is not None:
        _retire(root, current, keep)


# -- writing ----------------------------------------------------------------------------------------

def save(root: Path, step: int, write: Callable[[Path], object], rank_files: dict[str, object], *, rank: int,
         any_rank: Callable[[int], int], record: Optional[dict] = None, keep: int = 1,
         run: Optional[tuple] = None) -> Path:
    """Save the checkpoint of ``step``; collective: every rank calls it. Returns its directory.

    ``write(directory)``: the engine writes its own state there (every rank: the engine decides who
    writes what). ``rank_files``: this rank's own files, ``{relative path: object}`` (torch.save).
    ``record``: more of the main process's step.json. ``any_rank``: the max of an int over the ranks
    (``preemption.max_all_reduce()``); it is the barrier here too. ``run``: ``(output_dir, identity)``,
    the run's record (``run_identity.record_run``), written before its first checkpoint.

    Everything goes under a temporary name that becomes ``step_N`` once every rank has written; then
    ``latest`` names it and all but the ``keep`` newest checkpoints go. A save that fails on any rank
    is removed and raised on every rank (:func:`save_failure`); the previous checkpoint stays."""
    name = name_for(step)
    partial, target = root / f"{PARTIAL}{name}", root / name
    failure = None
    try:
        if run is not None and rank == 0:
            record_run(*run)           # no checkpoint without the record of the run it belongs to
        write(partial)
        for relative, state in rank_files.items():
            torch_save(state, partial / relative)
        if rank == 0:
            write_text(partial / RECORD, json.dumps({"step": step, **(record or {})}) + "\n")
    except Exception as err:  # noqa: BLE001  a full disk (OSError; torch.save: RuntimeError), on any rank: all
        failure = err                  # must learn of it, or the others wait for this one forever
    if any_rank(int(failure is not None)):    # (also the barrier: every rank's part is written)
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        any_rank(0)
        error = save_failure(root, step, failure)
        if error is failure:
            raise failure
        raise error from failure
    pause("checkpoint", step, partial, rank)   # tests: killed with every part written, not yet named
    if rank == 0:
        if target.exists():            # a complete checkpoint a kill left unnamed by latest: this one replaces it
            shutil.rmtree(target)
        partial.rename(target)         # atomic: the checkpoint is there whole or not at all
        write_text(root / LATEST, name + "\n")
        _retire(root, target, keep)
    any_rank(0)                        # no rank goes on (or exits) before latest names the new checkpoint
    return target


def save_failure(root: Path, step: int, failure: Exception | None) -> Exception:
    """The error of a failed save: an OSError (a user error) saying what failed, what is left and
    the space a checkpoint takes, when the files could not be written here (``OSError``, or
    torch.save's RuntimeError for a short write) or on another rank (``failure`` None); any other
    exception is a bug, raised as it is."""
    writing = isinstance(failure, OSError) or (isinstance(failure, RuntimeError) and any(
        words in str(failure) for words in ("write failed", "unexpected pos")))   # torch.save on a full disk
    if failure is not None and not writing:
        return failure
    previous = latest(root)
    if failure is None:
        cause = "on another rank, whose message says why"
    elif isinstance(failure, OSError) and failure.strerror:
        cause = failure.strerror + (f": {failure.filename}" if failure.filename else "")
    else:
        cause = str(failure).strip().splitlines()[-1]
    space = ""
    if previous is not None:
        needed = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file())
        space = (f" (a state takes about {needed / 2**20:.0f} MiB; {shutil.disk_usage(root).free / 2**20:.0f} "
                 f"MiB are free)")
    left = (f"{previous} is intact and a rerun resumes from it" if previous is not None
            else "no earlier state exists: a rerun starts afresh")
    message = (f"training.output_dir: saving the training state at step {step} into {root} failed ({cause}); "
               f"the partial state was removed, {left}. Free space{space} and rerun")
    return OSError(failure.errno, message) if isinstance(failure, OSError) and failure.errno else OSError(message)
