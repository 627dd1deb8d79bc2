"""Is (a)'s weak transfer a learning-rate choice? The study runs every task stage at one learning rate
(the scale's task_lr, picked for dense fine-tuning); sparse models are often fine-tuned at a higher one
(the paper tunes each). This sweeps the transfer LR of (a) prune-ofa and of (b) ft-pruning-1x at the
per-task budget B, on the study's finished teacher and student of one seed.

    python bench/fidelity/lr_sweep.py --scale cpu-medium --seed 0 --tasks trec bbc-news --lrs 1e-4 3e-4 1e-3

The LR is selected on a dev split carved from each task's TRAINING split (a fixed 20%, seed 42); the
study's validation split, which its table reports, is never read here. The dense task teacher that both
distil from is retrained on the remaining 80% (at the study's task_lr) so that it has not seen the dev
rows either. Results go to ``results/<scale>/lr-sweep/`` (one JSON per stage, as the study's), the table
to ``lr-sweep/summary.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.fidelity.records import load_records
from bench.fidelity.run import finished, run_stages
from bench.fidelity.study import (
    CONFIGS,
    HERE,
    ROOT,
    SCALES,
    SPARSITY,
    SPLIT_SEED,
    TASK_VARIANTS,
    Inputs,
    Scale,
    Stage,
    finetune_common,
    schedule,
)

SWEPT = ("prune-ofa", "ft-pruning-1x")
DEV_FRACTION = 0.2


def write_dev_split(train_file: Path, out_dir: Path, task: str) -> dict:
    """``train_file``'s rows split into fit (80%) and dev (20%) by a fixed shuffle; written once, atomically."""
    files = {"train": out_dir / f"{task}-fit.jsonl", "validation": out_dir / f"{task}-dev.jsonl"}
    if not all(p.is_file() for p in files.values()):
        rows = train_file.read_text(encoding="utf-8").splitlines()
        order = list(range(len(rows)))
        random.Random(SPLIT_SEED).shuffle(order)
        n_dev = round(len(rows) * DEV_FRACTION)
        parts = {"validation": sorted(order[:n_dev]), "train": sorted(order[n_dev:])}
        out_dir.mkdir(parents=True, exist_ok=True)
        for split, path in files.items():
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(rows[i] + "\n" for i in parts[split]), encoding="utf-8")
            tmp.replace(path)
    return {split: str(path) for split, path in files.items()}


def lr_name(lr: float) -> str:
    return f"lr{lr:g}"


def sweep_stages(s: Scale, study_runs: Path, sweep_runs: Path, task_tokens: dict, seed: int, tasks: list,
                 lrs: list) -> list:
    """Per task: the dense task teacher on the fit rows, then each swept variant at each LR. Keys are
    ``seed<N>/<task>/dense`` and ``<lr>/seed<N>/<task>/<variant>`` (the study's record layout, one folder
    per LR); every stage reads the fit/dev files only."""
    teacher_model = study_runs / "teacher" / "model"
    student_model = study_runs / f"seed{seed}" / "student-ofa" / "model"
    stages = []
    for task in tasks:
        files = write_dev_split(study_runs / "tasks" / f"{task}-train.jsonl", sweep_runs / "tasks", task)
        inputs = Inputs("-", (), {task: files}, task_tokens, 0.0)    # finetune_common reads the files only
        tokens = s.task_steps * s.finetune_batch * task_tokens[task]
        dense_out = sweep_runs / f"seed{seed}" / task / "dense"
        dense = Stage(f"seed{seed}/{task}/dense", "finetune", CONFIGS / "finetune" / "rt-teacher.yaml",
                      finetune_common(s, inputs, dense_out, seed, task, s.task_steps)
                      + [f"model.name_or_path={teacher_model}"],
                      (), dense_out, dense_out / "metrics.json", seed, task, tokens)
        stages.append(dense)
        for lr in lrs:
            for variant in SWEPT:
                out = sweep_runs / lr_name(lr) / f"seed{seed}" / task / variant
                common = finetune_common(dataclasses.replace(s, task_lr=lr), inputs, out, seed, task, s.task_steps) + [
                    f"distillation.teacher={dense_out / 'model'}"]
                if variant == "prune-ofa":
                    config, extra = CONFIGS / "finetune" / "rt-transfer.yaml", [f"model.name_or_path={student_model}"]
                else:
                    sched = schedule(s.task_steps, s)
                    config = HERE / "finetune-pruning-85.yaml"
                    extra = [f"model.name_or_path={teacher_model}", f"pruning.final_sparsity={SPARSITY}",
                             *(f"pruning.{k}={sched[k]}" for k in ("start", "policy_end", "end", "interval"))]
                stages.append(Stage(f"{lr_name(lr)}/seed{seed}/{task}/{variant}", "finetune", config,
                                    common + extra, (dense.key,), out, out / "metrics.json", seed, task, tokens))
    return stages


def summarize_sweep(results: Path, lrs: list) -> str:
    records = load_records(results)
    rows = {}
    for key, r in records.items():
        if "variant" in r and r["variant"] in SWEPT:
            rows.setdefault((r["task"], r["variant"]), {})[key.split("/")[0]] = r["accuracy"]
    lines = ["# Transfer LR sweep (dev split carved from each task's training rows; seed "
             + ", ".join(sorted({str(r["seed"]) for r in records.values()})) + ")", "",
             "Accuracy on the dev rows, %, after B steps; best per row in bold. The study's validation "
             "split is not used.", "",
             "| task | variant | " + " | ".join(lr_name(lr) for lr in lrs) + " |",
             "|---|---|" + "---|" * len(lrs)]
    for (task, variant), by_lr in sorted(rows.items()):
        best = max(by_lr.values())
        cells = [("**%.1f**" if by_lr[lr_name(lr)] == best else "%.1f") % (100 * by_lr[lr_name(lr)])
                 if lr_name(lr) in by_lr else "n/a" for lr in lrs]
        lines.append(f"| {task} | {TASK_VARIANTS[variant]} | " + " | ".join(cells) + " |")
    best_gap = []
    for task in sorted({t for t, _ in rows}):
        a, b = rows.get((task, "prune-ofa"), {}), rows.get((task, "ft-pruning-1x"), {})
        if a and b:
            best_gap.append(f"- {task}: best (a) {100 * max(a.values()):.1f} at {max(a, key=a.get)}, best (b) "
                            f"{100 * max(b.values()):.1f} at {max(b, key=b.get)}: (a) − (b) at their own best LR "
                            f"{100 * (max(a.values()) - max(b.values())):+.1f}")
    return "\n".join(lines + [""] + best_gap) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu-medium")
    parser.add_argument("--seed", type=int, default=0, help="the study seed whose student is transferred")
    parser.add_argument("--tasks", nargs="+", help="a subset of the scale's tasks (default: all)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--runs", type=Path, help="the study's runs (default runs/fidelity/<scale>)")
    parser.add_argument("--results", type=Path, help="default bench/fidelity/results/<scale>/lr-sweep")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    s = SCALES[args.scale]
    tasks = args.tasks or list(s.tasks)
    if set(tasks) - set(s.tasks):
        parser.error(f"--tasks: {', '.join(sorted(set(tasks) - set(s.tasks)))} not in scale {args.scale}")
    study_runs = args.runs or ROOT / "runs" / "fidelity" / args.scale
    results = args.results or HERE / "results" / args.scale / "lr-sweep"
    needed = [study_runs / "teacher" / "model" / "sparsity.json",
              study_runs / f"seed{args.seed}" / "student-ofa" / "model" / "sparsity.json",
              *(study_runs / "tasks" / f"{t}-train.jsonl" for t in tasks)]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise SystemExit("the sweep transfers a finished study's teacher and student; missing "
                         + ", ".join(missing) + f"\nrun bench/fidelity/run.py --scale {args.scale} "
                         f"--seeds {args.seed} first")
    task_tokens = json.loads((HERE / "results" / args.scale / "inputs.json").read_text())["task_tokens"]
    stages = sweep_stages(s, study_runs, study_runs / "lr-sweep", task_tokens, args.seed, tasks, args.lrs)
    if args.dry_run:
        for st in stages:
            print(f"{st.key}{' (done)' if finished(st) else ''}: " + " ".join(st.overrides))
        return 0
    results.mkdir(parents=True, exist_ok=True)
    run_stages(stages, s, args.scale, results, s.parallel)
    table = summarize_sweep(results, args.lrs)
    (results / "summary.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
