"""The study's inputs: the model, the corpus and each task's fixed split, from the installed packages
(``from_packages``) or from a bundle that carries them where nothing is installed (``pack`` here,
``from_bundle`` on the GPU machine: no packages, no network, 64 MiB for everything that travels).

A bundle holds the packaged MiniLM-L6 in bf16 (45 MB instead of 90: its weights rounded to bf16, which
the study then trains in fp32 masters as on CPU), the corpus and the task splits as xz-compressed JSON
lines, and ``manifest.json`` with the sha256 of every file. Unpacking checks them, writes the model
back in fp32 (the trainers load a checkpoint in its own dtype) and the files as plain JSON lines.
"""
from __future__ import annotations

import json
import lzma
import os
import shutil
import statistics
from pathlib import Path

from bench.fidelity.study import ROOT, SPLIT_SEED, Inputs, Scale
from sparse_pretrain.data.prepare import file_digest

TEXT_COLUMN = {"rt-sentiment": "sentence", "trec": "question", "bbc-news": "text"}
MODEL_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_task_splits(task: str, out_dir: Path) -> dict:
    """The task's fixed split (the packaged loader, seed 42) as JSON lines of its own columns."""
    from finetune.tasks.classification import load_bbc_news, load_rt_sentiment, load_trec
    loader = {"rt-sentiment": load_rt_sentiment, "trec": load_trec, "bbc-news": load_bbc_news}[task]
    data = loader(seed=SPLIT_SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "validation"):
        path = out_dir / f"{task}-{split}.jsonl"
        if not path.is_file():
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for row in data[split]:
                    f.write(json.dumps({TEXT_COLUMN[task]: row[TEXT_COLUMN[task]], "label": row["label"]}) + "\n")
            tmp.replace(path)
        files[split] = str(path)
    return files


def mean_tokens(model_dir: str, train_file: str, column: str, max_length: int) -> float:
    """Mean tokenized length (special tokens included, truncated at ``max_length``) of the training rows:
    with dynamic padding, the non-padding tokens a row puts through the model."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)[column] for line in Path(train_file).read_text(encoding="utf-8").splitlines()]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    return statistics.fmean(lengths)


def corpus_tokens_per_row(s: Scale, corpus: tuple, model: str) -> float:
    """Tokenize the corpus at the scale's row length (once: prepared rows are keyed by their settings)
    and read the mean non-padding tokens of a training row back."""
    import subprocess
    import sys

    from sparse_pretrain.data.prepare import prepared_path
    from sparse_pretrain.recipe import load_recipe
    overrides = [f"model.name_or_path={model}", f"data.max_seq_length={s.pretrain_seq}", "data.seed=42",
                 f"data.data_files=[{', '.join(corpus)}]"]
    config = ROOT / "configs" / "minilm-l6-teacher.yaml"
    subprocess.run([sys.executable, "-m", "launcher", "prepare-data", "--config", str(config), *overrides],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    info = json.loads((prepared_path(load_recipe(config, overrides)) / "prepared.json").read_text())
    return info["tokens"]["train"] / info["rows"]["train"]


def _inputs(s: Scale, model: str, model_dir: str, corpus: tuple, task_files: dict) -> Inputs:
    tokens = {task: mean_tokens(model_dir, files["train"], TEXT_COLUMN[task], s.finetune_seq)
              for task, files in task_files.items()}
    return Inputs(model, corpus, task_files, tokens, corpus_tokens_per_row(s, corpus, model))


def from_packages(s: Scale, work_dir: Path, corpus: tuple) -> Inputs:
    from sparse_pretrain.runtime.packaged_models import packaged_model_dir
    missing = [c for c in corpus if not Path(c).is_file()]
    if missing:
        raise SystemExit(f"no corpus file {', '.join(missing)}: run `make corpus` first, or give --corpus")
    task_files = {task: write_task_splits(task, work_dir / "tasks") for task in s.tasks}
    return _inputs(s, "packaged:minilm-l6", str(packaged_model_dir("minilm-l6")), corpus, task_files)


def copy_model(source: Path, target: Path, dtype) -> None:
    """The model's weights (floating ones in ``dtype``), config and tokenizer files into ``target``."""
    from safetensors.torch import load_file, save_file
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(source / "model.safetensors").items()}
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    for name in MODEL_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def pack(bundle: Path, tasks: tuple, corpus: tuple) -> dict:
    """Write the bundle (atomically: a half-written one never takes the name)."""
    import torch

    from sparse_pretrain.runtime.packaged_models import packaged_model_dir
    model_dir = packaged_model_dir("minilm-l6")
    tmp = bundle.with_name(bundle.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    copy_model(model_dir, tmp / "model", torch.bfloat16)
    missing = [c for c in corpus if not Path(c).is_file()]
    if missing:
        raise SystemExit(f"no corpus file {', '.join(missing)}: run `make corpus` first, or give --corpus")
    sources = {f"corpus/{Path(c).name}": Path(c) for c in corpus}
    splits = tmp.with_name(tmp.name + "-splits")
    for task in tasks:
        for split, path in write_task_splits(task, splits).items():
            sources[f"tasks/{task}-{split}.jsonl"] = Path(path)
    for name, source in sources.items():
        target = tmp / (name + ".xz")
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as f, lzma.open(target, "wb", preset=9) as out:
            shutil.copyfileobj(f, out)
    shutil.rmtree(splits)
    manifest = {"tasks": list(tasks), "corpus": [f"corpus/{Path(c).name}" for c in corpus],
                "model_dtype": "bfloat16", "split_seed": SPLIT_SEED,
                "files": {str(p.relative_to(tmp)): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if bundle.exists():
        shutil.rmtree(bundle)
    os.replace(tmp, bundle)
    return manifest


def bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def from_bundle(s: Scale, bundle: Path, work_dir: Path) -> Inputs:
    """Check the bundle against its manifest, unpack it into ``work_dir/inputs`` (the model in fp32)."""
    import torch
    manifest_file = bundle / "manifest.json"
    if not manifest_file.is_file():
        raise SystemExit(f"--bundle {bundle}: no manifest.json; write one with `python bench/fidelity/run.py "
                         f"--pack {bundle}`")
    manifest = json.loads(manifest_file.read_text())
    bad = [name for name, digest in manifest["files"].items()
           if not (bundle / name).is_file() or file_digest(bundle / name) != digest]
    if bad:
        raise SystemExit(f"--bundle {bundle}: missing or changed since packing: {', '.join(bad)}")
    absent = [t for t in s.tasks if f"tasks/{t}-train.jsonl.xz" not in manifest["files"]]
    if absent:
        raise SystemExit(f"--bundle {bundle}: has no split of {', '.join(absent)} (packed: {manifest['tasks']})")
    inputs = work_dir / "inputs"
    model_dir = inputs / "model"
    if not (model_dir / "model.safetensors").is_file():
        tmp = inputs / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        copy_model(bundle / "model", tmp, torch.float32)
        os.replace(tmp, model_dir)
    unpacked = {}
    for name in manifest["files"]:
        if name.endswith(".xz"):
            target = inputs / name[:-len(".xz")]
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                with lzma.open(bundle / name, "rb") as f, open(target.with_suffix(".tmp"), "wb") as out:
                    shutil.copyfileobj(f, out)
                target.with_suffix(".tmp").replace(target)
            unpacked[name[:-len(".xz")]] = str(target)
    corpus = tuple(unpacked[c] for c in manifest["corpus"])
    task_files = {t: {split: unpacked[f"tasks/{t}-{split}.jsonl"] for split in ("train", "validation")}
                  for t in s.tasks}
    return _inputs(s, str(model_dir), str(model_dir), corpus, task_files)
