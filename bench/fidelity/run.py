"""The paper's findings at small scale: Prune Once for All against fine-tune pruning on the same compute
budget, with the ablations of its Table 4, on the packaged MiniLM-L6, the offline corpus and the
Rotten Tomatoes (RT) sentiment task. Every run is the project's real command (``prune-ofa pretrain``
or ``torchrun -m sparse_pretrain``, ``prune-ofa finetune`` or ``accelerate launch -m finetune``) with
``key=value`` overrides; nothing is reimplemented here.

Per seed:

    teacher      teacher preparation of the packaged MiniLM-L6 on the corpus (dense, MLM)
    rt-teacher   the dense RT task teacher (configs/finetune/rt-teacher.yaml)       -> (c) dense
    (a) prune-ofa           student pruning to 85% (GMP + KD + LR rewinding) -> pattern-locked transfer + KD
        ofa-no-lrr          the same, student pruning with training.lr_rewind=false
        ofa-no-kd-pruning   the same, student pruning with distillation.lambda_kd=0, lambda_pt=1
        ofa-no-kd-transfer  prune-ofa's student, transfer with distillation.lambda_kd=0, lambda_task=1
    (b) ft-pruning          the prepared dense model pruned to 85% during RT fine-tuning (GMP + KD + LR
                            rewinding; bench/fidelity/rt-finetune-pruning-85.yaml)

Same compute budget: equal training sequences through the student (optimizer steps x global batch),
teacher preparation excluded (both (a) and (b) start from the prepared dense model). (a) spends
``student_steps x pretrain_batch`` corpus rows on pruning and ``transfer_steps x finetune_batch`` RT
sentences on transfer; (b) fine-tunes for ``transfer_steps + ceil(student_steps x pretrain_batch /
finetune_batch)`` steps, its pruning schedule scaled to that length with the same fractions
(``--ft-budget transfer`` gives (b) only the transfer's steps). Corpus rows are longer than RT
sentences (about 64 vs 25 tokens at cpu-small), so in tokens (a) spends more on pruning.

Seeds change the initialisation of the missing heads, data order, masking and dropout of every
stage; the RT split (9,544 train / 1,061 held-out sentences) and the MLM held-out rows are fixed.

    python bench/fidelity/run.py --scale cpu-small --seeds 0 1 2        # results/<name>.json, summary
    python bench/fidelity/run.py --summary-only --scale cpu-small        # the table from what exists

A stage whose output exists is reused, so a rerun goes on where a previous one stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SPARSITY = 0.85
RT_SPLIT_SEED = 42            # the split configs/finetune/rt-*.yaml use (training.seed 42): the 1,061 of RESULTS.md


@dataclass(frozen=True)
class Scale:
    processes: int            # per stage: 1 = one process (no launcher), else torchrun / accelerate launch
    pretrain_seq: int
    pretrain_batch: int       # global batch of corpus rows
    pretrain_micro: int
    teacher_steps: int
    student_steps: int
    pretrain_lr: float
    # the student's schedule as fractions of its length (the paper: 1% warmup, policy end 50%, end 80%,
    # masks every 1%); the same fractions give (b)'s schedule over its fine-tuning steps
    warmup: float
    policy_end: float
    end: float
    interval: float
    finetune_seq: int
    finetune_batch: int       # global batch of RT sentences (per process: / processes)
    transfer_steps: int       # RT steps of the task teacher and of each transfer
    teacher_lr: float         # RT task teacher
    transfer_lr: float        # transfer and fine-tune pruning
    pretrain_data: tuple = ()     # overrides choosing the corpus (default: the recipes' offline corpus)
    offline: bool = True
    threads: int = 2


SCALES = {
    # 2 CPU cores: short pruning, a third of an RT epoch; meant for about an hour for 3 seeds on an idle
    # machine (see RESULTS.md for what it took here)
    "cpu-small": Scale(processes=1, pretrain_seq=64, pretrain_batch=16, pretrain_micro=16, teacher_steps=40,
                       student_steps=60, pretrain_lr=3e-4, warmup=1 / 15, policy_end=2 / 3, end=4 / 5,
                       interval=1 / 15, finetune_seq=64, finetune_batch=32, transfer_steps=120,
                       teacher_lr=5e-5, transfer_lr=1e-4),
    # the paper's pre-training settings (100k steps, batch 256, sequence 512, 1% warmup, pruning to 50%,
    # masks frozen at 80%, every 1%, lr 5e-5) on English Wikipedia from the hub, 3 RT epochs at
    # sequence 128; one GPU, bf16 (DeepSpeed decides). Days per seed; equal budget gives (b) 800k steps.
    "gpu": Scale(processes=1, pretrain_seq=512, pretrain_batch=256, pretrain_micro=32, teacher_steps=100_000,
                 student_steps=100_000, pretrain_lr=5e-5, warmup=0.01, policy_end=0.5, end=0.8, interval=0.01,
                 finetune_seq=128, finetune_batch=32, transfer_steps=897, teacher_lr=5e-5, transfer_lr=1e-4,
                 pretrain_data=("data.dataset_name=wikimedia/wikipedia", "data.dataset_config=20231101.en",
                                "data.data_files=[]"), offline=False, threads=8),
}

# variant -> (title, the stages it needs, in order)
VARIANTS = {
    "dense": ("(c) dense RT teacher", ["teacher", "rt-teacher"]),
    "prune-ofa": ("(a) Prune OFA 85%: GMP + KD + LRR, pattern-lock + KD", ["student-ofa", "transfer-ofa"]),
    "ft-pruning": ("(b) fine-tune pruning 85%: GMP + KD + LRR during RT", ["ft-pruning"]),
    "ofa-no-lrr": ("(a) without LR rewinding", ["student-no-lrr", "transfer-no-lrr"]),
    "ofa-no-kd-pruning": ("(a) without KD during pruning", ["student-no-kd-pruning", "transfer-no-kd-pruning"]),
    "ofa-no-kd-transfer": ("(a) without KD during transfer", ["student-ofa", "transfer-no-kd-transfer"]),
}
CORE = ("dense", "prune-ofa", "ft-pruning")
STUDENT_OVERRIDES = {"ofa": [], "no-lrr": ["training.lr_rewind=false"],
                     "no-kd-pruning": ["distillation.lambda_kd=0", "distillation.lambda_pt=1"]}
TRANSFER_FROM = {"ofa": ("student-ofa", []), "no-lrr": ("student-no-lrr", []),
                 "no-kd-pruning": ("student-no-kd-pruning", []),
                 "no-kd-transfer": ("student-ofa", ["distillation.lambda_kd=0", "distillation.lambda_task=1"])}


# -- the budget and the commands -------------------------------------------------------------------

def schedule(steps: int, s: Scale) -> dict:
    """The GMP schedule (and warmup) of a run of ``steps`` optimizer steps, at the scale's fractions."""
    interval = max(1, round(steps * s.interval))
    return {"warmup_steps": max(1, round(steps * s.warmup)), "start": 0,
            "policy_end": max(1, round(steps * s.policy_end)), "end": round(steps * s.end), "interval": interval}


def ft_pruning_steps(s: Scale, budget: str) -> int:
    extra = math.ceil(s.student_steps * s.pretrain_batch / s.finetune_batch) if budget == "equal" else 0
    return s.transfer_steps + extra


def budget(s: Scale, variant: str, ft_budget: str) -> dict:
    """Training sequences through the student (teacher preparation, shared, excluded)."""
    if variant == "dense":
        return {"pretrain_sequences": 0, "finetune_sequences": s.transfer_steps * s.finetune_batch}
    if variant == "ft-pruning":
        return {"pretrain_sequences": 0, "finetune_sequences": ft_pruning_steps(s, ft_budget) * s.finetune_batch}
    return {"pretrain_sequences": s.student_steps * s.pretrain_batch,
            "finetune_sequences": s.transfer_steps * s.finetune_batch}


def pretrain_argv(s: Scale, config: Path, overrides: list) -> list:
    if s.processes == 1:
        return [str(BIN / "prune-ofa"), "pretrain", "--config", str(config), *overrides]
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(s.processes), "-m", "sparse_pretrain",
            "--config", str(config), *overrides]


def finetune_argv(s: Scale, config: Path, overrides: list) -> list:
    if s.processes == 1:
        return [str(BIN / "prune-ofa"), "finetune", "--config", str(config), *overrides]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(s.processes), "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "finetune", "--config", str(config),
            *overrides]


def stage_plan(name: str, s: Scale, seed: int, seed_dir: Path, rt_files: dict, ft_budget: str) -> tuple:
    """(argv, output directory, file that marks it done) of one stage."""
    out = seed_dir / name
    pt_common = [f"training.output_dir={out}", f"training.seed={seed}", "data.seed=42",
                 f"data.max_seq_length={s.pretrain_seq}", f"training.global_batch_size={s.pretrain_batch}",
                 f"training.micro_batch_size={s.pretrain_micro}", f"training.learning_rate={s.pretrain_lr}",
                 "training.save_interval=100000000", "training.dataloader_workers=0", "training.eval_batches=100000",
                 *s.pretrain_data]
    ft_common = [f"training.output_dir={out}", f"training.seed={seed}", f"task.max_seq_length={s.finetune_seq}",
                 f"training.batch_size={s.finetune_batch // s.processes}", "training.eval_batch_size=128",
                 f"task.data_files={{train: {rt_files['train']}, validation: {rt_files['validation']}}}"]
    teacher_model, rt_teacher_model = seed_dir / "teacher" / "model", seed_dir / "rt-teacher" / "model"
    if name == "teacher":
        steps = s.teacher_steps
        argv = pretrain_argv(s, CONFIGS / "minilm-l6-teacher.yaml", pt_common + [
            f"training.total_steps={steps}", f"training.warmup_steps={schedule(steps, s)['warmup_steps']}",
            f"training.eval_interval={steps}", f"training.log_interval={max(1, steps // 10)}"])
        return argv, out, out / "model" / "sparsity.json"
    if name == "rt-teacher":
        argv = finetune_argv(s, CONFIGS / "finetune" / "rt-teacher.yaml", ft_common + [
            f"training.max_steps={s.transfer_steps}", f"training.learning_rate={s.teacher_lr}"])
        return argv, out, out / "metrics.json"
    if name.startswith("student-"):
        steps, sched = s.student_steps, schedule(s.student_steps, s)
        argv = pretrain_argv(s, CONFIGS / "minilm-l6-85.yaml", pt_common + [
            f"model.name_or_path={teacher_model}", f"model.teacher_name_or_path={teacher_model}",
            f"pruning.final_sparsity={SPARSITY}", f"training.total_steps={steps}",
            f"training.warmup_steps={sched['warmup_steps']}", *(f"pruning.{k}={sched[k]}" for k in
                                                                ("start", "policy_end", "end", "interval")),
            f"training.eval_interval={steps}", f"training.log_interval={max(1, steps // 10)}",
            *STUDENT_OVERRIDES[name[len("student-"):]]])
        return argv, out, out / "model" / "sparsity.json"
    if name.startswith("transfer-"):
        student, extra = TRANSFER_FROM[name[len("transfer-"):]]
        argv = finetune_argv(s, CONFIGS / "finetune" / "rt-transfer.yaml", ft_common + [
            f"model.name_or_path={seed_dir / student / 'model'}", f"distillation.teacher={rt_teacher_model}",
            f"training.max_steps={s.transfer_steps}", f"training.learning_rate={s.transfer_lr}", *extra])
        return argv, out, out / "metrics.json"
    if name == "ft-pruning":
        steps = ft_pruning_steps(s, ft_budget)
        sched = schedule(steps, s)
        argv = finetune_argv(s, HERE / "rt-finetune-pruning-85.yaml", ft_common + [
            f"model.name_or_path={teacher_model}", f"distillation.teacher={rt_teacher_model}",
            f"training.max_steps={steps}", f"training.learning_rate={s.transfer_lr}",
            f"pruning.final_sparsity={SPARSITY}", *(f"pruning.{k}={sched[k]}" for k in
                                                    ("start", "policy_end", "end", "interval"))])
        return argv, out, out / "metrics.json"
    raise ValueError(f"unknown stage {name}")


def run_stage(name: str, argv: list, out: Path, done_marker: Path, s: Scale, log_dir: Path) -> dict:
    """Run one stage (or reuse it); afterwards drop its checkpoints (the exported model stays)."""
    import shutil
    record_file = out / "stage.json"
    if done_marker.is_file() and record_file.is_file():
        return json.loads(record_file.read_text())
    log = log_dir / f"{name}.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(s.threads), TOKENIZERS_PARALLELISM="false",
               **({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} if s.offline else {}))
    if s.processes > 1 and not _cuda():
        env["ACCELERATE_USE_CPU"] = "true"
    began = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(argv) + "\n\n")
        f.flush()
        done = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - began
    if done.returncode != 0 or not done_marker.is_file():
        raise RuntimeError(f"stage {name} failed (exit {done.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    for heavy in ("checkpoints", "state"):
        shutil.rmtree(out / heavy, ignore_errors=True)
    record = {"stage": name, "seconds": round(seconds, 1), "command": argv, "log": str(log)}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# -- reading results back ----------------------------------------------------------------------------

def tensorboard_last(run_dir: Path, tag: str):
    from launcher.demo_pipeline import tensorboard_series
    series = tensorboard_series(run_dir, tag)
    return series[max(series)] if series else None


def zeros_per_layer(model_dir: Path) -> dict:
    """Per pruned layer (the default selection), (zeros, elements) of the exported weights."""
    import re

    from safetensors.torch import load_file

    from sparse_pretrain.core.masks import DEFAULT_INCLUDE
    state = load_file(model_dir / "model.safetensors")
    return {k: (int((v == 0).sum()), v.numel()) for k, v in state.items()
            if k.endswith(".weight") and v.ndim == 2 and re.fullmatch(DEFAULT_INCLUDE[0], k[:-len(".weight")])}


def sparsity_check(model_dir: Path, target: float) -> dict:
    from sparse_pretrain.core.threshold import pruned_count
    layers = zeros_per_layer(model_dir)
    zeros, total = sum(z for z, _ in layers.values()), sum(n for _, n in layers.values())
    return {"encoder_sparsity": zeros / total, "pruned_layers": len(layers),
            "exact_per_layer": all(z == pruned_count(target, n) for z, n in layers.values())}


def student_record(run_dir: Path) -> dict:
    return {"mlm_accuracy": tensorboard_last(run_dir, "eval/mlm_accuracy"),
            "perplexity": tensorboard_last(run_dir, "eval/perplexity"),
            "sparsity": json.loads((run_dir / "model" / "sparsity.json").read_text()).get("global")}


def variant_record(variant: str, seed: int, scale_name: str, s: Scale, seed_dir: Path, stages: dict,
                   ft_budget: str) -> dict:
    title, needed = VARIANTS[variant]
    last = seed_dir / needed[-1]
    metrics = json.loads((last / "metrics.json").read_text())
    record = {"variant": variant, "title": title, "seed": seed, "scale": scale_name,
              "rt_accuracy": metrics["metrics"]["validation"]["accuracy"], "budget": budget(s, variant, ft_budget),
              "stages": {n: stages[n] for n in needed}}
    if variant == "dense":
        record["teacher"] = student_record(seed_dir / "teacher")
        record["encoder_sparsity"] = 0.0
    else:
        record.update(sparsity_check(last / "model", SPARSITY))
    if needed[0].startswith("student-"):
        record["student"] = student_record(seed_dir / needed[0])
        record["transfer_sparsity_unchanged"] = metrics.get("sparsity_unchanged")
    if variant == "ft-pruning":
        record["pruning_updates"] = metrics["pruning"]["updates"]
    return record


def held_out_sizes(s: Scale, rt_files: dict) -> dict:
    from sparse_pretrain.data.prepare import prepared_path
    from sparse_pretrain.recipe import load_recipe
    recipe = load_recipe(CONFIGS / "minilm-l6-teacher.yaml", [f"data.max_seq_length={s.pretrain_seq}", "data.seed=42",
                                                              *s.pretrain_data])
    info = json.loads((prepared_path(recipe) / "prepared.json").read_text())
    return {"mlm_held_out_rows": info["rows"]["validation"], "mlm_held_out_tokens": info["tokens"]["validation"],
            "mlm_held_out_documents": info["documents"]["validation"],
            "rt_train": sum(1 for _ in open(rt_files["train"])),
            "rt_validation": sum(1 for _ in open(rt_files["validation"]))}


# -- the summary -------------------------------------------------------------------------------------

def spread(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def fmt(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    if not stat.get("n"):
        return "n/a"
    if stat["n"] == 1:
        return f"{stat['mean'] * scale:.{digits}f} (1 seed)"
    return (f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f} "
            f"[{stat['min'] * scale:.{digits}f}, {stat['max'] * scale:.{digits}f}]")


def summarize(results_dir: Path, scale_name: str, sizes: dict | None) -> str:
    records = [json.loads(p.read_text()) for p in sorted(results_dir.glob(f"{scale_name}-seed*-*.json"))]
    by_variant = {v: [r for r in records if r["variant"] == v] for v in VARIANTS}
    dense_by_seed = {r["seed"]: r["rt_accuracy"] for r in by_variant["dense"]}
    rows = ["| variant | RT accuracy, % (mean ± std [min, max]) | Δ vs dense, points (paired by seed) | "
            "encoder sparsity (exact per layer) | student held-out MLM acc., % | "
            "sequences: pruning + fine-tuning | seeds |",
            "|---|---|---|---|---|---|---|"]
    stats = {}
    for variant, (title, _) in VARIANTS.items():
        rs = by_variant[variant]
        if not rs:
            rows.append(f"| {title} | not run | | | | | 0 |")
            continue
        acc = spread([r["rt_accuracy"] for r in rs])
        delta = spread([r["rt_accuracy"] - dense_by_seed[r["seed"]] for r in rs if r["seed"] in dense_by_seed])
        mlm = spread([r.get("student", {}).get("mlm_accuracy") for r in rs])
        sparsity = spread([r.get("encoder_sparsity") for r in rs])
        exact = all(r.get("exact_per_layer", True) for r in rs)
        b = rs[0]["budget"]
        sparsity_cell = "0 (dense)" if variant == "dense" else f"{sparsity['mean']:.4f} ({'yes' if exact else 'NO'})"
        stats[variant] = {"rt_accuracy": acc, "delta_vs_dense": delta, "student_mlm_accuracy": mlm,
                          "encoder_sparsity": sparsity, "seeds": sorted(r["seed"] for r in rs), "budget": b}
        rows.append(f"| {title} | {fmt(acc)} | {'—' if variant == 'dense' else fmt(delta)} | "
                    f"{sparsity_cell} | {fmt(mlm)} | "
                    f"{b['pretrain_sequences']:,} + {b['finetune_sequences']:,} | "
                    f"{', '.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))} |")
    teacher_mlm = spread([r["teacher"]["mlm_accuracy"] for r in by_variant["dense"]])
    lines = [f"# Fidelity study, scale {scale_name}", "", *rows, ""]
    lines.append(f"Dense teacher preparation (shared by (a) and (b)): held-out MLM accuracy, %: {fmt(teacher_mlm)}.")
    if sizes:
        lines.append(f"Held out: RT validation {sizes['rt_validation']:,} sentences (train {sizes['rt_train']:,}); "
                     f"MLM {sizes['mlm_held_out_rows']} rows ({sizes['mlm_held_out_tokens']:,} tokens, "
                     f"{sizes['mlm_held_out_documents']} documents), 15% masked with fixed seeds.")
    lines.append(f"Time of the stages behind this table: {_distinct_seconds(records) / 60:.1f} min in all "
                 f"(each shared stage counted once).")
    (results_dir / f"summary-{scale_name}.json").write_text(json.dumps({"scale": scale_name, "variants": stats,
                                                                         "held_out": sizes}, indent=2) + "\n")
    text = "\n".join(lines) + "\n"
    (results_dir / f"summary-{scale_name}.md").write_text(text)
    return text


def _distinct_seconds(records: list) -> float:
    seen = {}
    for r in records:
        for name, st in r["stages"].items():
            seen[(r["seed"], name)] = st["seconds"]
    return sum(seen.values())


# -- main ----------------------------------------------------------------------------------------------

def write_rt_split(data_dir: Path) -> dict:
    """The fixed RT split as JSON lines (the task's own columns), read with task.data_files."""
    from finetune.tasks.classification import load_rt_sentiment
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {split: data_dir / f"rt-{split}.jsonl" for split in ("train", "validation")}
    if not all(f.is_file() for f in files.values()):
        rt = load_rt_sentiment(seed=RT_SPLIT_SEED)
        for split, path in files.items():
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                for row in rt[split]:
                    f.write(json.dumps({"sentence": row["sentence"], "label": row["label"]}) + "\n")
            tmp.replace(path)
    return {k: str(v) for k, v in files.items()}


def jobs(seeds: list, variants: list) -> list:
    """(seed, variant) in run order: every variant of the first seed (so each has at least one seed),
    then the core comparison (a)-(c) on the other seeds, then their ablations."""
    first = [(seeds[0], v) for v in variants]
    core = [(s, v) for s in seeds[1:] for v in variants if v in CORE]
    rest = [(s, v) for s in seeds[1:] for v in variants if v not in CORE]
    return first + core + rest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu-small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--ft-budget", choices=("equal", "transfer"), default="equal",
                        help="(b)'s steps: the transfer's plus the pruning budget (equal) or the transfer's only")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "fidelity", help="where the stages write")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the table from results/")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    s = SCALES[args.scale]
    args.results.mkdir(parents=True, exist_ok=True)
    rt_files = write_rt_split(args.runs / "data")
    if args.summary_only:
        print(summarize(args.results, args.scale, held_out_sizes(s, rt_files)))
        return 0
    if s.offline and not (ROOT / "data" / "corpus" / "wiki.jsonl").is_file():
        raise SystemExit("no offline corpus in data/corpus: run `make corpus` first")
    print(f"fidelity study, scale {args.scale}: {json.dumps(asdict(s))}", flush=True)
    print(f"(b) fine-tune pruning: {ft_pruning_steps(s, args.ft_budget)} steps, schedule "
          f"{schedule(ft_pruning_steps(s, args.ft_budget), s)}; students: {schedule(s.student_steps, s)}", flush=True)
    if not args.dry_run:   # tokenize the corpus once (the rows are keyed by their settings)
        prepare = [str(BIN / "prune-ofa"), "prepare-data", "--config", str(CONFIGS / "minilm-l6-teacher.yaml"),
                   f"data.max_seq_length={s.pretrain_seq}", "data.seed=42", *s.pretrain_data]
        subprocess.run(prepare, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    began, printed = time.perf_counter(), set()
    for seed, variant in jobs(args.seeds, args.variants):
        seed_dir = args.runs / args.scale / f"seed{seed}"
        (seed_dir / "logs").mkdir(parents=True, exist_ok=True)
        result_file = args.results / f"{args.scale}-seed{seed}-{variant}.json"
        if result_file.is_file() and not args.dry_run:
            continue
        stages = {}
        for name in ["teacher", "rt-teacher", *VARIANTS[variant][1]]:
            if name in stages:
                continue
            argv_, out, marker = stage_plan(name, s, seed, seed_dir, rt_files, args.ft_budget)
            if args.dry_run:
                if (seed, name) not in printed:
                    print(f"[seed {seed}] {name}: {' '.join(argv_)}")
                printed.add((seed, name))
                stages[name] = None
                continue
            reused = marker.is_file() and (out / "stage.json").is_file()
            print(f"[{(time.perf_counter() - began) / 60:6.1f} min] seed {seed} {variant}: {name}"
                  f"{' (done before)' if reused else ' ...'}", flush=True)
            stages[name] = run_stage(name, argv_, out, marker, s, seed_dir / "logs")
            if not reused:
                print(f"{'':12} {name} took {stages[name]['seconds'] / 60:.1f} min", flush=True)
        if args.dry_run:
            continue
        record = variant_record(variant, seed, args.scale, s, seed_dir, stages, args.ft_budget)
        result_file.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{'':12} seed {seed} {variant}: RT accuracy {record['rt_accuracy']:.4f}, "
              f"sparsity {record.get('encoder_sparsity', 0):.4f}", flush=True)
        summarize(args.results, args.scale, None)
    if not args.dry_run:
        print(summarize(args.results, args.scale, held_out_sizes(s, rt_files)))
        print(f"total {(time.perf_counter() - began) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
