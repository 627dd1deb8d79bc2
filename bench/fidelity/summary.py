"""The study's table and its plain statements, computed from the JSON in ``results/<scale>/`` (whatever
seeds exist so far): accuracy per task and variant with the spread over seeds, what each costs, whether
(a) >= (b) at equal per-task budget, the budget at which (b) catches up, the number of tasks from which
pruning once costs less in all, and whether LR rewinding and KD each help beyond the spread."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.fidelity.records import load_records
from bench.fidelity.study import TASK_VARIANTS, Scale, break_even_tasks, multiple

ABLATIONS = {"ofa-no-lrr": "LR rewinding in pruning", "ofa-no-kd-pruning": "KD in pruning",
             "ofa-no-kd-transfer": "KD in transfer"}


def spread(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values)}


def fmt(stat: dict, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
    if not stat.get("n"):
        return "n/a"
    sign = "+" if signed else ""
    mean = f"{stat['mean'] * scale:{sign}.{digits}f}"
    if stat["n"] == 1:
        return f"{mean} (1)"
    return f"{mean} ± {stat['std'] * scale:.{digits}f} (n={stat['n']})"


def summarize(results: Path, scale_name: str, s: Scale) -> str:
    records = load_records(results) if results.is_dir() else {}
    tasks = [t for t in s.tasks if any(r.get("task") == t for r in records.values())]
    task_runs = [r for r in records.values() if "variant" in r]
    acc = {(r["seed"], r["task"], r["variant"]): r["accuracy"] for r in task_runs}
    seeds = sorted({r["seed"] for r in task_runs})
    students = {k: r for k, r in records.items() if "/student-" in k}
    teacher = records.get("teacher")
    inputs_file = results / "inputs.json"
    info = json.loads(inputs_file.read_text()) if inputs_file.is_file() else {}

    def cell(task, variant):
        return spread([acc.get((seed, task, variant)) for seed in seeds])

    def paired(task, a, b):
        return spread([acc[(seed, task, a)] - acc[(seed, task, b)] for seed in seeds
                       if (seed, task, a) in acc and (seed, task, b) in acc])

    def paired_all(a, b):   # over seeds and tasks
        return spread([acc[(seed, t, a)] - acc[(seed, t, b)] for seed in seeds for t in tasks
                       if (seed, t, a) in acc and (seed, t, b) in acc])

    lines = [f"# Fidelity study, scale {scale_name}", "",
             f"{s.description}. Seeds so far: {', '.join(map(str, seeds)) or 'none'}. Accuracy on each task's "
             "held-out split, %, mean ± std over seeds (n); Δ: paired by seed against (c) dense, mean over tasks.",
             "", "| variant | " + " | ".join(tasks) + " | mean | Δ vs dense | encoder sparsity (exact per layer) | "
             "student tokens per task |", "|---" * (len(tasks) + 5) + "|"]
    mean_tokens = {t: statistics.fmean([r["tokens"] for r in task_runs if r["task"] == t and r["variant"] == "dense"])
                   for t in tasks}
    for variant, title in TASK_VARIANTS.items():
        runs = [r for r in task_runs if r["variant"] == variant]
        if not runs:
            continue
        per_seed_mean = spread([statistics.fmean(acc[(seed, t, variant)] for t in tasks)
                                for seed in seeds if all((seed, t, variant) in acc for t in tasks)])
        delta = paired_all(variant, "dense")
        sparsity = spread([r.get("encoder_sparsity") for r in runs])
        exact = all(r.get("exact_per_layer", True) for r in runs)
        sparsity_cell = "0 (dense)" if variant == "dense" else f"{sparsity['mean']:.4f} ({'yes' if exact else 'NO'})"
        tokens = statistics.fmean(multiple(variant) * mean_tokens[t] for t in tasks) if tasks else 0
        lines.append(f"| {title} | " + " | ".join(fmt(cell(t, variant)) for t in tasks)
                     + f" | {fmt(per_seed_mean)} | {'—' if variant == 'dense' else fmt(delta, signed=True)} | "
                       f"{sparsity_cell} | {tokens / 1e3:,.0f}k |")
    lines.append("")

    # cost: the pruning run once, B per task
    ofa = [r for k, r in students.items() if k.endswith("/student-ofa")]
    per_task = statistics.fmean(mean_tokens.values()) if mean_tokens else 0.0
    if teacher:
        lines.append(f"Teacher preparation (shared by (a) and (b), once per scale): {teacher['tokens'] / 1e6:.2f}M "
                     f"tokens, {teacher['seconds'] / 60:.1f} min; held-out masked-LM accuracy "
                     f"{100 * teacher['mlm_accuracy']:.1f}%.")
    if ofa:
        pruning_tokens = ofa[0]["tokens"]
        lines.append(f"(a)'s pruning run, paid once: {pruning_tokens / 1e6:.2f}M tokens "
                     f"({pruning_tokens / per_task:.1f}x the mean per-task budget B = {per_task / 1e3:.0f}k tokens), "
                     f"{statistics.fmean(r['seconds'] for r in ofa) / 60:.1f} min; student held-out masked-LM "
                     f"accuracy {fmt(spread([r['mlm_accuracy'] for r in ofa]))}%.")
        for name in ("no-lrr", "no-kd-pruning"):
            rs = [r for k, r in students.items() if k.endswith(f"/student-{name}")]
            if rs:
                mlm = fmt(spread([r["mlm_accuracy"] for r in rs]))
                lines.append(f"Student {name}: held-out masked-LM accuracy {mlm}%, "
                             f"{statistics.fmean(r['seconds'] for r in rs) / 60:.1f} min.")
    for seed in seeds:
        total = sum(r["seconds"] for k, r in records.items() if k.startswith(f"seed{seed}/"))
        with_teacher = f", {(total + teacher['seconds']) / 60:.0f} min with the teacher preparation" if teacher else ""
        lines.append(f"Seed {seed}: its stages took {total / 60:.0f} min one after another{with_teacher}.")
    seconds = {v: spread([r["seconds"] for r in task_runs if r["variant"] == v]) for v in TASK_VARIANTS}
    timing = ", ".join(f"{v} {seconds[v]['mean'] / 60:.1f}" for v in TASK_VARIANTS if seconds[v].get("n"))
    if timing:
        lines.append(f"Measured minutes per task run (mean over tasks and seeds, start-up included): {timing}.")
    lines.append("")

    statements = {}
    if all(any((seed, t, v) in acc for seed in seeds for t in tasks) for v in ("prune-ofa", "ft-pruning-1x")):
        d = paired_all("prune-ofa", "ft-pruning-1x")
        per_task_d = {t: paired(t, "prune-ofa", "ft-pruning-1x") for t in tasks}
        statements["a_minus_b_equal_budget"] = {"all": d, "per_task": per_task_d}
        lines.append(f"- **(a) vs (b) at equal per-task budget B**: (a) − (b) = {fmt(d, signed=True)} points "
                     f"[{100 * d['min']:+.1f}, {100 * d['max']:+.1f}] over seeds and tasks; per task: "
                     + ", ".join(f"{t} {fmt(v, signed=True)}" for t, v in per_task_d.items()) + ".")
        catch = {}
        for t in tasks:
            a_mean = cell(t, "prune-ofa").get("mean")
            ks = [k for k in s.multiples if cell(t, f"ft-pruning-{k}x").get("n")]
            reached = [k for k in ks if cell(t, f"ft-pruning-{k}x")["mean"] >= a_mean]
            catch[t] = min(reached) if reached else None
        statements["b_catches_up_at"] = catch
        parts = []
        for t, k in catch.items():
            if k is None:
                parts.append(f"{t}: not within {max(s.multiples)}B")
            elif k == 1:
                parts.append(f"{t}: already at B ((b) >= (a))")
            else:
                n = break_even_tasks(ofa[0]["tokens"], mean_tokens[t], k) if ofa else float("nan")
                parts.append(f"{t}: at {k}B, so pruning once costs less in all from {n:.1f} tasks like it on")
        lines.append("- **Where (b) catches up with (a)** (mean over seeds): " + "; ".join(parts) + ".")
        if ofa:
            lines.append("- **Tasks from which (a) costs less in all** than (b) at k x B (P / ((k − 1) B), mean B): "
                         + ", ".join(f"k={k}: {break_even_tasks(ofa[0]['tokens'], per_task, k):.1f}"
                                     for k in s.multiples if k > 1) + ".")
    for variant, what in ABLATIONS.items():
        d = paired_all("prune-ofa", variant)
        if not d.get("n"):
            continue
        seed_std = statistics.fmean(cell(t, "prune-ofa").get("std", 0.0) for t in tasks)
        statements[f"gain_of_{variant}"] = {"paired": d, "seed_std_of_a": seed_std}
        # beyond the spread: a gain larger than (a)'s seed-to-seed std, and positive on every (seed, task)
        beyond = d["mean"] > seed_std and d["min"] > 0
        paired_seeds = {seed for seed in seeds for t in tasks
                        if (seed, t, "prune-ofa") in acc and (seed, t, variant) in acc}
        verdict = ("one seed: no spread to judge against" if len(paired_seeds) < 2 else
                   "helps beyond the spread" if beyond else "not beyond the spread")
        statements[f"gain_of_{variant}"]["verdict"] = verdict
        lines.append(f"- **{what}**: (a) − (a without it) = {fmt(d, signed=True)} points "
                     f"[{100 * d['min']:+.1f}, {100 * d['max']:+.1f}] over seeds and tasks (mean seed std of (a): "
                     f"{100 * seed_std:.1f}): {verdict}.")
    lines.append("")
    lines.append("Settings that differ from the paper: " + "; ".join(s.settings) + ".")
    if info:
        lines.append("Held-out rows: " + ", ".join(f"{t} {n:,}" for t, n in info["validation_rows"].items())
                     + "; training rows: " + ", ".join(f"{t} {n:,}" for t, n in info["train_rows"].items())
                     + "; mean tokens per training row: "
                     + ", ".join(f"{t} {v:.1f}" for t, v in info["task_tokens"].items()) + ".")
    text = "\n".join(lines) + "\n"
    if results.is_dir():
        (results / "summary.md").write_text(text)
        (results / "summary.json").write_text(json.dumps(
            {"scale": scale_name, "seeds": seeds, "tasks": tasks, "statements": statements,
             "accuracy": {f"{t}/{v}": cell(t, v) for t in tasks for v in TASK_VARIANTS}}, indent=2, default=str) + "\n")
    return text
