"""Prepare the pre-training data once: load, tokenize, build rows, save to disk keyed by its settings.

``prepare_dataset(recipe)`` reads the documents (a hub dataset, or local json/jsonl/text/parquet/csv
files given by ``data.data_files``), splits off a held-out set of whole documents, splits
documents into sentences and tokenizes them with the model's fast tokenizer (batched ``map`` with
``num_proc``), builds BERT pre-training rows (:mod:`.rows`), and saves a ``DatasetDict`` with
``train`` and ``validation`` under ``<data.cache_dir>/<name>-<hash>``. The hash covers every
setting that changes the rows (:func:`data_settings`): the tokenizer's full definition, the sources'
contents, lengths, probabilities, NSP, seed, the held-out choice and this module's version, so a
changed setting never reuses stale rows. The directory appears atomically (built under a
temporary name, then renamed), with ``prepared.json`` holding the settings and counts.

``load_prepared(recipe)`` memory-maps it back (``load_from_disk``) for the trainer.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from .rows import document_rng, mlm_rows, nsp_rows
from .sentences import split_sentences

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
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise FileNotFoundError(f"data.data_files: {pattern!r} matches no file "
                                    "(`prune-ofa materialize-corpus` writes the demo corpus)")
        files += [Path(m) for m in matches if Path(m).is_file()]
    return files


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_format(data, files: list[Path]) -> str:
    if data.data_format:
        return data.data_format
    formats = {_FORMATS.get("".join(f.suffixes[-1:]).lower()) for f in files}
    if len(formats) != 1 or None in formats:
        raise ValueError(f"data.data_format: cannot tell one format from {[f.name for f in files]}; "
                         "set data.data_format to json, text, parquet or csv")
    return formats.pop()


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
        ds = datasets.load_dataset(fmt, data_files={"train": [str(f) for f in files]}, split="train",
                                   cache_dir=str(cache_dir) if cache_dir else None, **kwargs)
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


def prepare_dataset(recipe, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Build the rows for ``recipe.data`` unless already there; returns their directory."""
    import datasets
    d = recipe.data
    if d.max_seq_length < 8:
        raise ValueError(f"data.max_seq_length: at least 8 tokens needed, got {d.max_seq_length}")
    tokenizer = load_tokenizer(recipe)
    settings = data_settings(recipe, tokenizer)
    key = settings_hash(settings)
    final = Path(d.cache_dir) / f"{_slug(recipe)}-{key}"
    if (final / INFO_FILE).is_file() and not force:
        log(f"prepared data already at {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    started = time.time()
    try:
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
        if final.exists():                       # forced rebuild, or another process won the race
            shutil.rmtree(final)
        os.replace(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    log(f"prepared {info['rows']} rows, {info['tokens']} tokens from {info['documents']} documents "
        f"in {info['seconds']} s -> {final}")
    return final


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
