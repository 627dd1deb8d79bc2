"""Prepare the pre-training data once: load, tokenize, build rows, save to disk keyed by its settings.

``prepare_dataset(recipe)`` reads the documents (a hub dataset, or local json/jsonl/text/parquet/csv
files given by ``data.data_files``), splits off a held-out set of whole documents, splits
documents into sentences and tokenizes them with the model's fast tokenizer (batched ``map`` with
``num_proc``), builds BERT pre-training rows (:mod:`.rows`), and saves a ``DatasetDict`` with
``train`` and ``validation`` under ``<data.cache_dir>/<name>-<hash>``. The hash covers every
setting that changes the rows (:func:`data_settings`): the tokenizer's full definition, the sources'
contents, lengths, probabilities, NSP, seed, the held-out choice and this module's version, so a
changed setting never reuses stale rows. The directory appears atomically (built under a
temporary name, then renamed), with ``prepared.json`` holding the settings and counts. The
temporary directory is removed on an error, Ctrl-C or SIGTERM; one left by SIGKILL is named by
its process and removed by the next run once that process is gone. Bad sources (no such file, a
directory, an empty file, an unknown format) are refused before the tokenizer loads; a full disk
is reported with the space free and about how much is needed.

``load_prepared(recipe)`` memory-maps it back (``load_from_disk``) for the trainer.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from sparse_pretrain.data.rows import document_rng, mlm_rows, nsp_rows
from sparse_pretrain.data.sentences import split_sentences
from sparse_pretrain.runtime.atomic import (
    owned_temp_dir,
    owned_temp_dirs,
    remove_stale_temp_dirs,
    remove_tree,
    sigterm_raises,
)

PIPELINE_VERSION = 1          # bump when the rows built from the same settings change
INFO_FILE = "prepared.json"
NSP_MODEL_TYPES = ("bert",)   # model types whose pre-training head has next-sentence prediction
_FORMATS = {".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text", ".parquet": "parquet",
            ".csv": "csv"}


# -- what the rows depend on -------------------------------------------------------------------

def tokenizer_path(recipe) -> str:
    return recipe.data.tokenizer_name_or_path or recipe.model.name_or_path


def load_tokenizer(recipe):
    """The model's fast tokenizer (a slow one has no batched Rust path and can differ in details)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(recipe))
    if not tokenizer.is_fast:
        raise ValueError(f"{tokenizer_path(recipe)}: no fast tokenizer (tokenizer.json) found")
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise ValueError(f"{tokenizer_path(recipe)}: the tokenizer needs [CLS] and [SEP] tokens")
    return tokenizer


def resolve_nsp(recipe) -> bool:
    """``data.nsp``: true/false, or auto: whether the model's type pre-trains with NSP (BERT yes;
    DistilBERT, RoBERTa no)."""
    if recipe.data.nsp != "auto":
        return recipe.data.nsp == "true"
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(recipe.model.name_or_path).model_type in NSP_MODEL_TYPES


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's whole definition (vocab, normalizer, pre-tokenizer, specials)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(sorted(tokenizer.all_special_ids)).encode())
    return h.hexdigest()


def resolve_data_files(patterns: list[str]) -> list[Path]:
    """The files ``data.data_files`` names, checked before anything is read: each pattern matches a
    file, a directory is refused with the glob to give instead, and no file is empty."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise FileNotFoundError(f"data.data_files: {pattern!r} matches no file "
                                    "(`prune-ofa materialize-corpus` writes the demo corpus)")
        found = [Path(m) for m in matches if Path(m).is_file()]
        if not found:
            what = (f"{pattern!r} is a directory" if len(matches) == 1 else
                    f"{pattern!r} matches only directories ({_some(matches)})")
            raise ValueError(f"data.data_files: {what}; give files or globs, e.g. "
                             f"data.data_files=[{_glob_for(Path(matches[0]))}]")
        files += found
    for f in files:
        if _is_blank(f):
            what = "only whitespace" if f.stat().st_size else "0 bytes"
            raise ValueError(f"data.data_files: {f} is empty ({what}); give files with documents, or leave it out")
    return files


def _some(items, n: int = 3) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _glob_for(directory: Path, look_at: int = 1000) -> str:
    """The glob to suggest for a directory, from the data files among its first entries."""
    found = [f for f in itertools.islice(directory.rglob("*"), look_at) if f.suffix.lower() in _FORMATS]
    suffixes = [f.suffix.lower() for f in found]
    suffix = max(sorted(set(suffixes)), key=suffixes.count) if suffixes else ".jsonl"
    nested = any(f.parent != directory for f in found if f.suffix.lower() == suffix)
    return str(directory / ("**/*" if nested else "*")) + suffix


def _is_blank(path: Path, small: int = 1 << 16) -> bool:
    """Empty, or (a small file) only whitespace; a large file is not read here."""
    size = path.stat().st_size
    if size == 0:
        return True
    return size <= small and not path.read_bytes().strip()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_format(data, files: list[Path]) -> str:
    """``data.data_format``, or the one format the files' extensions name."""
    if data.data_format:
        return data.data_format
    by_format: dict[Optional[str], list[Path]] = {}
    for f in files:
        by_format.setdefault(_FORMATS.get(f.suffix.lower()), []).append(f)
    if None in by_format:
        raise ValueError(f"data.data_files: cannot tell the format of {by_format[None][0]} (known extensions: "
                         f"{' '.join(_FORMATS)}); rename it, or set data.data_format to json, text, parquet or csv")
    if len(by_format) > 1:
        mixed = "; ".join(f"{fmt}: {paths[0]}" + (f" and {len(paths) - 1} more" if len(paths) > 1 else "")
                          for fmt, paths in sorted(by_format.items()))
        raise ValueError(f"data.data_files: files of several formats ({mixed}); give files of one format")
    return next(iter(by_format))


def data_settings(recipe, tokenizer=None) -> dict:
    """Everything that changes the prepared rows; its hash names the prepared directory."""
    d = recipe.data
    tokenizer = tokenizer or load_tokenizer(recipe)
    if d.data_files:
        files = resolve_data_files(d.data_files)
        source = {"format": data_format(d, files), "files": [file_digest(f) for f in files]}
    else:
        if not d.dataset_name:
            raise ValueError("data: set data.dataset_name (a hub dataset) or data.data_files (local files)")
        source = {"dataset": d.dataset_name, "config": d.dataset_config, "split": d.dataset_split}
    return {
        "pipeline_version": PIPELINE_VERSION,
        "source": source,
        "text_column": d.text_column,
        "max_documents": d.max_documents,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_length": d.max_seq_length,
        "short_seq_prob": d.short_seq_prob,
        "nsp": resolve_nsp(recipe),
        "seed": data_seed(recipe),
        "validation_fraction": d.validation_fraction,
        "validation_max_documents": d.validation_max_documents,
    }


def data_seed(recipe) -> int:
    return recipe.training.seed if recipe.data.seed is None else recipe.data.seed


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _slug(recipe) -> str:
    d = recipe.data
    name = (Path(d.data_files[0]).parent.name or "local") if d.data_files else d.dataset_name
    name = "".join(c if c.isalnum() or c in "-._" else "-" for c in str(name)).strip("-.") or "data"
    return f"{name}-{d.max_seq_length}"


def prepared_path(recipe, tokenizer=None) -> Path:
    """Where the rows for this recipe's data settings live (whether or not prepared yet)."""
    return Path(recipe.data.cache_dir) / f"{_slug(recipe)}-{settings_hash(data_settings(recipe, tokenizer))}"


# -- building ----------------------------------------------------------------------------------

def load_documents(recipe, cache_dir: Optional[Path] = None):
    """The raw documents as a ``datasets.Dataset`` with one text column."""
    import datasets
    d = recipe.data
    if d.data_files:
        files = resolve_data_files(d.data_files)
        fmt = data_format(d, files)
        kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}   # blank line = new document
        try:
            ds = datasets.load_dataset(fmt, data_files={"train": [str(f) for f in files]}, split="train",
                                       cache_dir=str(cache_dir) if cache_dir else None, **kwargs)
        except ValueError as err:          # files with no record in them ("... corresponds to no data")
            if "no data" not in str(err):
                raise
            ds = None
        if ds is None or len(ds) == 0:
            raise ValueError(f"data.data_files: no documents in {_some(files)} (read as {fmt}); "
                             "give files with documents")
    else:
        ds = datasets.load_dataset(d.dataset_name, d.dataset_config, split=d.dataset_split)
    if d.text_column not in ds.column_names:
        raise ValueError(f"data.text_column: no column {d.text_column!r} (columns: {ds.column_names})")
    if d.max_documents is not None:
        ds = ds.select(range(min(d.max_documents, len(ds))))
    return ds.select_columns([d.text_column])


def _tokenize_documents(batch: dict, tokenizer, text_column: str) -> dict:
    """Batched map: documents -> lists of tokenized sentences (empty documents dropped)."""
    per_doc = [split_sentences(text or "") for text in batch[text_column]]
    flat = [s for doc in per_doc for s in doc]
    ids = (tokenizer(flat, add_special_tokens=False, verbose=False, return_attention_mask=False,
                     return_token_type_ids=False)["input_ids"] if flat else [])
    out, k = [], 0
    for doc in per_doc:
        sentences = [s for s in ids[k:k + len(doc)] if s]
        k += len(doc)
        if sentences:
            out.append(sentences)
    return {"sentences": out}


def _build_rows(batch: dict, indices: list[int], docs, split: str, seed: int, nsp: bool,
                max_seq_length: int, short_seq_prob: float, cls_id: int, sep_id: int) -> dict:
    """Batched map with indices: documents of one split -> rows. Each document uses its own
    generator and draws random B segments from the whole split, so the rows do not depend on
    batching or ``num_proc``."""
    out: dict[str, list] = {"input_ids": [], "token_type_ids": []}
    if nsp:
        out["next_sentence_label"] = []
    n = len(docs)
    column = docs.data.column("sentences") if nsp else None
    for document, index in zip(batch["sentences"], indices):
        rng = document_rng(seed, split, index)
        if nsp:
            def random_document(r: random.Random, index=index):
                if n < 2:
                    return None
                j = r.randrange(n - 1)
                return _ArrowDocument(column[j + (j >= index)].values)
            rows = nsp_rows(document, rng, max_seq_length, short_seq_prob, random_document, cls_id, sep_id)
        else:
            rows = mlm_rows(document, rng, max_seq_length, short_seq_prob, cls_id, sep_id)
        for row in rows:
            for key in out:
                out[key].append(row[key])
    return out


class _ArrowDocument:
    """A document's sentences read lazily from Arrow (a random B segment needs only a few)."""

    def __init__(self, sentences):
        self.sentences = sentences

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, k: int) -> list[int]:
        return self.sentences[k].values.to_pylist()


def split_documents(n: int, fraction: float, max_documents: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) document indices: a seeded random choice of whole documents."""
    n_val = 0
    if fraction > 0 and n > 1:
        n_val = min(max_documents, max(1, round(fraction * n)), n - 1)
    validation = sorted(random.Random(f"prune-ofa/{seed}/validation").sample(range(n), n_val))
    chosen = set(validation)
    return [i for i in range(n) if i not in chosen], validation


def _num_proc(recipe, n_docs: int) -> Optional[int]:
    n = recipe.data.num_proc or min(os.cpu_count() or 1, 8)
    n = min(n, max(1, n_docs // 64))
    return n if n > 1 else None


class NoSpaceError(OSError):
    """The disk under ``data.cache_dir`` filled up while preparing; the message says where, how much
    is free and (for local files) about how much is needed."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


# Peak size of the temporary directory per byte of input: the raw text's Arrow copy, the tokenized
# documents, each split's documents, its rows, and the saved rows all exist before the cache is
# dropped. Measured 6.5x on JSON Lines (the tests' corpus, 128-token rows); parquet is compressed.
SPACE_PER_INPUT_BYTE = {"json": 7, "text": 7, "csv": 7, "parquet": 14}
_LEGACY_TEMP = re.compile(r"^\..+-[0-9a-f]{16}\.[a-z0-9_]{8}$")   # before temporary directories had owners


def space_needed(recipe) -> Optional[int]:
    """About how many bytes preparing takes at its peak; None for a hub dataset (size unknown)."""
    d = recipe.data
    if not d.data_files:
        return None
    files = resolve_data_files(d.data_files)
    return SPACE_PER_INPUT_BYTE[data_format(d, files)] * sum(f.stat().st_size for f in files)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _is_no_space(err: BaseException) -> bool:
    """ENOSPC, also as pyarrow reports it (an OSError whose errno is unset but whose text says so)."""
    while err is not None:
        if isinstance(err, OSError) and (err.errno == errno.ENOSPC or "No space left on device" in str(err)
                                         or "[errno 28]" in str(err).lower()):
            return True
        err = err.__cause__ or err.__context__
    return False


def prepare_dataset(recipe, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Build the rows for ``recipe.data`` unless already there; returns their directory.

    The sources are checked first (paths, formats, empty files), before the tokenizer loads. The
    rows are built in a temporary directory named by this process (:func:`owned_temp_dir`) and
    renamed into place when complete; an error, Ctrl-C or SIGTERM removes it, and one that SIGKILL
    left is removed by the next run once its process is gone."""
    d = recipe.data
    if d.max_seq_length < 8:
        raise ValueError(f"data.max_seq_length: at least 8 tokens needed, got {d.max_seq_length}")
    needed = space_needed(recipe)
    tokenizer = load_tokenizer(recipe)
    settings = data_settings(recipe, tokenizer)
    key = settings_hash(settings)
    final = Path(d.cache_dir) / f"{_slug(recipe)}-{key}"
    free = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _tidy_cache_dir(final, log)
        if (final / INFO_FILE).is_file() and not force:
            log(f"prepared data already at {final}")
            return final
        free = shutil.disk_usage(final.parent).free
        if needed is not None and free < needed:
            log(f"warning: {_size(free)} free under {final.parent}; preparing these data may need about "
                f"{_size(needed)}")
        with sigterm_raises():
            info = _build_into(final, recipe, tokenizer, settings, key, force, log)
    except OSError as err:
        if not _is_no_space(err) or isinstance(err, NoSpaceError):
            raise
        raise _no_space(err, final, free, needed, recipe) from err
    log(f"prepared {info['rows']} rows, {info['tokens']} tokens from {info['documents']} documents "
        f"in {info['seconds']} s -> {final}")
    return final


def _no_space(err: OSError, final: Path, free: Optional[int], needed: Optional[int], recipe) -> NoSpaceError:
    # The space free before building, not now: the datasets the traceback still holds keep their
    # deleted files' space until they are collected.
    if free is None:
        free = shutil.disk_usage(final.parent).free
    estimate = ""
    if needed is not None:
        factor = SPACE_PER_INPUT_BYTE[data_format(recipe.data, resolve_data_files(recipe.data.data_files))]
        estimate = f", about {_size(needed)} needed ({factor}x the input's {_size(needed / factor)})"
    writing = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return NoSpaceError(f"data.cache_dir: no space left on the device while writing {final}{writing}: "
                        f"{_size(free)} free before preparing{estimate}; free some space or set "
                        "data.cache_dir to a larger disk (nothing was kept)")


def _tidy_cache_dir(final: Path, log: Callable[[str], None]) -> None:
    """Remove what killed runs left in the cache directory; say so when another run builds the same
    settings right now (both build; the first to finish is kept, the other's identical rows dropped)."""
    for path in remove_stale_temp_dirs(final.parent):
        log(f"removed {path}: left by a prepare-data that was killed")
    for owned in owned_temp_dirs(final.parent):
        if owned.target == final.name:
            alive = owned.owner_alive()
            log(f"prepare-data (PID {owned.pid} on {owned.host}) is building these settings too, in {owned.path}"
                if alive else f"{owned.path}: built by PID {owned.pid} on {owned.host}, which cannot be asked "
                "from here; remove it if no prepare-data runs there")
    owned = {o.path.name for o in owned_temp_dirs(final.parent)}
    legacy = sorted(p.name for p in final.parent.iterdir()
                    if _LEGACY_TEMP.match(p.name) and p.name not in owned and p.is_dir())
    if legacy:
        log(f"{len(legacy)} temporary directories without an owner in {final.parent} (from an older prune-ofa): "
            f"{_some(legacy)}; remove them if no prepare-data is running")


def _build_into(final: Path, recipe, tokenizer, settings: dict, key: str, force: bool,
                log: Callable[[str], None]) -> dict:
    work = None
    try:
        work = owned_temp_dir(final)
        info = _build(work, recipe, tokenizer, settings, key, log)
        _publish(work, final, force, log)
    finally:
        if work is not None:
            remove_tree(work)
    return info


def _publish(work: Path, final: Path, force: bool, log: Callable[[str], None]) -> None:
    """Rename the complete ``work`` to ``final``. When another run of the same settings got there
    first, its directory is kept (the same rows: the settings hash names them) unless ``force``."""
    os.chmod(work, 0o755)                         # mkdtemp makes 0700 directories
    won = f"another prepare-data finished these settings first; keeping its rows at {final}"
    if (final / INFO_FILE).is_file() and not force:
        log(won)
        return
    if final.exists():                            # a forced rebuild: the old rows go aside, then away
        aside = owned_temp_dir(final)
        os.replace(final, aside)
        try:
            os.replace(work, final)
        finally:
            remove_tree(aside)
        return
    try:
        os.replace(work, final)
    except OSError as err:                        # renamed into place by another run just now
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and (final / INFO_FILE).is_file():
            log(won)
            return
        raise


def _build(work: Path, recipe, tokenizer, settings: dict, key: str, log: Callable[[str], None]) -> dict:
    """Load, tokenize and build the rows into ``work/dataset`` with ``work/prepared.json``; returns the info."""
    import datasets
    d = recipe.data
    started = time.time()
    with _quiet_datasets():
        docs = load_documents(recipe, cache_dir=work / "cache")
        n_raw = len(docs)
        num_proc = _num_proc(recipe, n_raw)
        if num_proc:        # forked workers: one tokenizer thread each (and no fork warning)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        log(f"tokenizing {n_raw} documents with {tokenizer_path(recipe)} ({num_proc or 1} processes)")
        features = datasets.Features({"sentences": datasets.Sequence(datasets.Sequence(datasets.Value("int32")))})
        tokenized = docs.map(
            _tokenize_documents, batched=True, batch_size=256, num_proc=num_proc,
            remove_columns=docs.column_names, features=features,
            fn_kwargs={"tokenizer": tokenizer, "text_column": d.text_column},
            cache_file_name=str(work / "cache" / "tokenized.arrow"), new_fingerprint=f"{key}-tok",
            desc="tokenize")
        if len(tokenized) == 0:
            raise ValueError(f"data.text_column: none of the {n_raw} documents of {_source_name(recipe)} has "
                             f"text in column {d.text_column!r}")
        seed = data_seed(recipe)
        train_idx, val_idx = split_documents(len(tokenized), d.validation_fraction,
                                             d.validation_max_documents, seed)
        nsp = settings["nsp"]
        row_features = {"input_ids": datasets.Sequence(datasets.Value("int32")),
                        "token_type_ids": datasets.Sequence(datasets.Value("int8"))}
        if nsp:
            row_features["next_sentence_label"] = datasets.Value("int8")
        splits = {}
        for split, idx in (("train", train_idx), ("validation", val_idx)):
            split_docs = tokenized.select(idx).flatten_indices(
                cache_file_name=str(work / "cache" / f"{split}-docs.arrow"), new_fingerprint=f"{key}-{split}-docs")
            splits[split] = split_docs.map(
                _build_rows, batched=True, batch_size=64, with_indices=True,
                num_proc=_num_proc(recipe, len(split_docs)),
                remove_columns=["sentences"], features=datasets.Features(row_features),
                fn_kwargs={"docs": split_docs, "split": split, "seed": seed, "nsp": nsp,
                           "max_seq_length": d.max_seq_length, "short_seq_prob": d.short_seq_prob,
                           "cls_id": tokenizer.cls_token_id, "sep_id": tokenizer.sep_token_id},
                cache_file_name=str(work / "cache" / f"{split}-rows.arrow"),
                new_fingerprint=f"{key}-{split}-rows", desc=f"rows ({split})")
        dataset = datasets.DatasetDict(splits)
        dataset.save_to_disk(str(work / "dataset"))
    info = {"settings": settings, "hash": key, "tokenizer_path": tokenizer_path(recipe),
            "documents": {"raw": n_raw, "train": len(train_idx), "validation": len(val_idx)},
            "rows": {s: len(ds) for s, ds in splits.items()},
            "tokens": {s: count_tokens(ds) for s, ds in splits.items()},
            "seconds": round(time.time() - started, 1)}
    if nsp:
        info["random_next_fraction"] = {
            s: round(sum(ds["next_sentence_label"]) / max(1, len(ds)), 4) for s, ds in splits.items()}
    del dataset, splits, tokenized, docs
    shutil.rmtree(work / "cache", ignore_errors=True)
    (work / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _source_name(recipe) -> str:
    d = recipe.data
    return f"data.data_files={list(d.data_files)}" if d.data_files else f"data.dataset_name={d.dataset_name!r}"


class _quiet_datasets:
    """Keep datasets' progress bars on only when the user asked for them (a TTY)."""

    def __enter__(self):
        import sys

        import datasets
        self._was = datasets.utils.logging.is_progress_bar_enabled()
        if not sys.stderr.isatty():
            datasets.utils.logging.disable_progress_bar()

    def __exit__(self, *exc):
        import datasets
        if self._was:
            datasets.utils.logging.enable_progress_bar()
        return False


def count_tokens(dataset) -> int:
    import pyarrow.compute as pc
    return int(pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py() or 0)


def prepared_info(recipe) -> dict:
    return json.loads((prepared_path(recipe) / INFO_FILE).read_text())


def load_prepared(recipe, path: str | Path | None = None):
    """(train, validation) ``datasets.Dataset`` objects, memory-mapped from the prepared directory.

    ``path`` (as :func:`prepared_path` or ``prepare-data`` printed it) skips recomputing the
    settings hash: for ranks that see the prepared directory but not the source files."""
    import datasets
    path = Path(path) if path is not None else prepared_path(recipe)
    if not (path / INFO_FILE).is_file():
        raise FileNotFoundError(f"no prepared data for these settings at {path}; run "
                                "`prune-ofa prepare-data --config RECIPE.yaml` first")
    dataset = datasets.load_from_disk(str(path / "dataset"))
    return dataset["train"], dataset["validation"]
