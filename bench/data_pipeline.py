"""The data pipeline: how fast ``prune-ofa prepare-data`` builds rows, and whether training waits on data.

1. Preparation. ``prune-ofa prepare-data`` (the real command, in a subprocess) on the offline corpus
   (``make corpus``: ``data/corpus/*.jsonl``) with the MiniLM-L6 tokenizer, ``--force`` into a
   temporary cache directory, at ``--seq`` tokens per row with NSP pairs (the recipe's
   ``data.nsp: auto`` for a BERT model), once per ``--num-proc`` value, interleaved, ``--repeats``
   times. Reported: documents, rows and tokens (of the rows, [CLS]/[SEP] included, both splits),
   the command's own timer (``prepared.json`` "seconds": load, tokenize, build rows, save), the wall
   time of the whole command (Python start and imports included), and tokens/s on both.

2. Waiting for data. The training loop's data path exactly as sparse_pretrain/trainer.py builds it
   (``PretrainingBatches`` with mask seeds, ``PretrainingRows``, ``MaskingCollator``, a
   ``DataLoader`` with ``num_workers`` = w, persistent workers and ``prefetch_factor`` 4 when
   w > 0) on the rows prepared above, feeding the teacher-preparation step of the packaged MiniLM-L6
   (``BertForPreTraining`` via the trainer's ``load_model``: MLM + NSP, forward, backward, AdamW)
   at micro-batch ``--micro``. One loader per w, all alive; the variants take turns, ``--steps``
   steps each per round, the first round dropped. Each step times ``next(loader)`` (the wait) and
   the step; reported: median wait, median step, and the fraction of the time spent waiting
   (sum of waits / sum of waits and steps, median over rounds). The student stage's step is longer
   (teacher forward and KD), so its fraction is smaller than this one.

CPU (default):  python bench/data_pipeline.py
GPU:            python bench/data_pipeline.py --device cuda --bf16 --micro 32 --seq 512
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _mlm_bench import add_device_arguments, device_setup

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/minilm-l6-teacher.yaml"


def overrides(args, cache_dir: str) -> list[str]:
    return [f"data.data_files=[{','.join(args.data_files)}]", f"data.max_seq_length={args.seq}",
            f"data.cache_dir={cache_dir}"]


def prepare(args, cache_dir: str, num_proc: int) -> dict:
    command = [str(Path(sys.executable).parent / "prune-ofa"), "prepare-data", "--config", CONFIG, "--force",
               "--num-proc", str(num_proc), *overrides(args, cache_dir)]
    start = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    path = out.stdout.strip().splitlines()[-1]           # the command prints the directory last
    info = json.loads((Path(path) / "prepared.json").read_text())
    return {"wall": wall, "seconds": info["seconds"], "tokens": sum(info["tokens"].values()),
            "rows": sum(info["rows"].values()), "documents": info["documents"]["raw"], "path": path}


def preparation_table(args, cache_dir: str) -> tuple[str, str]:
    runs = {n: [] for n in args.num_proc}
    for _ in range(args.repeats):
        for n in args.num_proc:
            runs[n].append(prepare(args, cache_dir, n))
    lines = [(f"# prepare-data, {' '.join(args.data_files)}, seq {args.seq}, NSP, MiniLM-L6 tokenizer, "
              f"median of {args.repeats} runs per setting, interleaved"),
             ("| num_proc | documents | rows | tokens | command timer (s) | tokens/s | wall incl. start-up (s) | "
              "tokens/s (wall) |"), "|---|---|---|---|---|---|---|---|"]
    for n, rs in runs.items():
        seconds, wall = statistics.median(r["seconds"] for r in rs), statistics.median(r["wall"] for r in rs)
        r = rs[0]
        lines.append(f"| {n} | {r['documents']:,} | {r['rows']:,} | {r['tokens']:,} | {seconds:.1f} | "
                     f"{r['tokens'] / seconds:,.0f} | {wall:.1f} | {r['tokens'] / wall:,.0f} |")
    return "\n".join(lines), runs[args.num_proc[0]][-1]["path"]


def waiting_table(args, prepared: str) -> str:
    from torch.utils.data import DataLoader

    from sparse_pretrain.data.batches import PretrainingBatches, PretrainingRows
    from sparse_pretrain.data.collator import MaskingCollator
    from sparse_pretrain.data.prepare import load_prepared, load_tokenizer
    from sparse_pretrain.recipe import load_recipe
    from sparse_pretrain.runtime.optimizer import optimizer_groups
    from sparse_pretrain.trainer import load_model, model_inputs

    recipe = load_recipe(str(ROOT / CONFIG), overrides(args, "unused"))
    train_rows, _ = load_prepared(recipe, prepared)
    tokenizer = load_tokenizer(recipe)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    model = load_model(recipe.model.name_or_path, nsp=True, attn="sdpa").to(device).train()
    optimizer = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=1e-5)

    loaders = {}
    for w in args.workers:
        batches = PretrainingBatches(len(train_rows), args.micro, args.micro, 1, 0, seed=0, with_mask_seeds=True)
        loader = DataLoader(PretrainingRows(train_rows), batch_sampler=batches, collate_fn=MaskingCollator(tokenizer),
                            num_workers=w, pin_memory=cuda, persistent_workers=w > 0,
                            prefetch_factor=4 if w > 0 else None)
        loaders[w] = iter(loader)

    waits = {w: [] for w in args.workers}
    steps = {w: [] for w in args.workers}
    fractions = {w: [] for w in args.workers}
    tokens = {w: 0 for w in args.workers}
    for round_ in range(args.rounds + 1):
        for w, it in loaders.items():
            wait_sum = step_sum = 0.0
            for _ in range(args.steps):
                start = time.perf_counter()
                batch = model_inputs(next(it), device)
                got = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync()
                done = time.perf_counter()
                if round_:
                    waits[w].append(got - start)
                    steps[w].append(done - got)
                    tokens[w] += int(batch["attention_mask"].sum())
                wait_sum += got - start
                step_sum += done - got
            if round_:
                fractions[w].append(wait_sum / (wait_sum + step_sum))
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    lines = [(f"# waiting for data: teacher-preparation step of MiniLM-L6 (BertForPreTraining), micro-batch "
              f"{args.micro}, rows of <= {args.seq} tokens, {'bf16 autocast' if args.bf16 else 'fp32'}, {name}; "
              f"{args.rounds} rounds x {args.steps} steps per setting, interleaved"),
             ("| dataloader_workers | next(loader) median (ms) | max (ms) | step median (ms) | "
              "time waiting for data | non-padding tokens/s |"), "|---|---|---|---|---|---|"]
    for w in args.workers:
        total = sum(waits[w]) + sum(steps[w])
        lines.append(f"| {w} | {statistics.median(waits[w]) * 1e3:.1f} | {max(waits[w]) * 1e3:.1f} | "
                     f"{statistics.median(steps[w]) * 1e3:.1f} | {statistics.median(fractions[w]):.2%} | "
                     f"{tokens[w] / total:,.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-files", nargs="+", default=["data/corpus/*.jsonl"])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="prepare-data runs per num_proc")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="dataloader_workers settings")
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="steps per setting and round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds counted (one more warms up)")
    add_device_arguments(parser, threads=0, bf16_help="autocast the step to bf16")
    args = parser.parse_args()
    device_setup(args)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as cache_dir:
        table, prepared = preparation_table(args, cache_dir)
        print(table, flush=True)
        print()
        print(waiting_table(args, prepared))


if __name__ == "__main__":
    main()
