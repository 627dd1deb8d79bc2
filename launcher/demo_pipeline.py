"""The demo's main part: the pipeline ``configs/pipelines/minilm-rt.yaml`` (the chain ``prune-ofa submit``
queues on a cluster) run here, on CPU, offline, stage after stage, each with the command its sbatch
script runs (``launcher.submit.launch_command``, so every stage starts with ``prune-ofa launch``):

    prepare-data -> teacher preparation -> student pruning (DeepSpeed ZeRO-2, torchrun)
    -> dense RT task teacher -> pattern-locked transfer with KD -> 8-bit QAT (Accelerate) -> report

The pipeline file is the one description of the chain (stages, recipes, what each reads from which);
the demo adds only its sizes, as overrides (``DemoSizes``: step counts small enough to end in minutes
on 2 cores), and runs the student stage and everything downstream of it once per target sparsity, in
``<stage>-<percent>`` directories. Each stage's output directory is under ``out``; a stage whose
output already exists is reused, so a rerun after a failure goes on from where it stopped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launcher.pipeline import Stage, load_pipeline

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "configs" / "pipelines" / "minilm-rt.yaml"
SWEPT = "student"      # the stage pruned to each target sparsity, run with its downstream stages once per target
#: a stage kind -> the file in its output directory that exists once it has finished
RESULT = {"prepare-data": ".prepared", "pretrain": "model", "finetune": "metrics.json", "qat": "metrics.json",
          "report": "report.json"}


@dataclass
class DemoSizes:
    """How much each stage trains (chosen for a bounded run on 2 CPU cores; see the report's notes)."""
    # Measured on 2 cores (2026-11-21): a student step (MiniLM + its teacher, full 30k-word MLM
    # heads on 16 x 64 tokens) ~4.5 s, an RT step ~1.8 s (2.2 s with KD), ~25 s to start a stage's 2
    # processes; these defaults end in ~15 min. `--sparsities 85 90` adds the 90% chain (~8 min).
    processes: int = 2
    teacher_steps: int = 30           # teacher preparation (global batch 16, sequence 64)
    student_steps: int = 40           # student pruning: GMP to the target by 2/3, masks frozen at 4/5
    finetune_steps: int = 100         # RT task teacher and each transfer (batch 16 per process)
    qat_steps: int = 20
    sparsities: tuple = (0.85,)
    seq_length: int = 64


def demo_settings(sizes: DemoSizes, sparsity: float) -> dict[str, tuple[str, dict]]:
    """The pipeline's stage name -> (the title the demo shows, the recipe overrides its sizes make)."""
    n, pct, seq = sizes.processes, round(100 * sparsity), sizes.seq_length
    t, s, f, q = sizes.teacher_steps, sizes.student_steps, sizes.finetune_steps, sizes.qat_steps
    pretrain = {"training.dataloader_workers": 0, "training.save_interval": 1000000, "data.max_seq_length": seq}
    finetune = {"task.max_seq_length": 64, "training.batch_size": 16, "training.eval_batch_size": 128}
    evaluations = {"training.eval_every": max(1, f // 4)}   # curves in training.png (less than an epoch is trained)
    return {
        "prepare": ("prepare the offline corpus (tokenize, NSP pairs, held-out split)", {"data.max_seq_length": seq}),
        "teacher": (f"teacher preparation: {t} steps, {n} processes, DeepSpeed ZeRO-2",
                    {"training.total_steps": t, "training.warmup_steps": max(1, t // 10),
                     "training.eval_interval": max(1, t // 3), "training.log_interval": max(1, t // 10), **pretrain}),
        "student": (f"student pruning to {pct}%: {s} steps, {n} processes, GMP + KD + LR rewinding",
                    {"pruning.final_sparsity": sparsity, "training.total_steps": s,
                     "training.warmup_steps": max(1, s // 10), "pruning.policy_end": s * 2 // 3,
                     "pruning.end": s * 4 // 5, "pruning.interval": max(1, s // 15),
                     "training.eval_interval": max(1, s // 4), "training.log_interval": max(1, s // 10), **pretrain}),
        "rt-teacher": (f"dense task teacher on RT sentiment: {f} steps, {n} processes (Accelerate DDP)",
                       {"training.max_steps": f, **finetune, **evaluations}),
        "rt-transfer": (f"transfer of the {pct}% student: pattern-lock + KD, {f} steps",
                        {"training.max_steps": f, **finetune, **evaluations}),
        "rt-qat": (f"8-bit QAT of the {pct}% transfer: {q} steps, int8 export evaluated on CPU",
                   {"training.max_steps": q, **finetune}),
        "rt-report": (f"compression report of the {pct}% model (sparse fp32 and int8)", {}),
    }


@dataclass
class DemoStage:
    name: str                         # its directory under out: the pipeline's stage name (-<percent>)
    title: str
    argv: list
    output: Path                      # the stage is done when this exists
    pipeline_stage: Stage             # the pipeline's stage: kind, recipe, overrides, output_dir, env
    sparsity: Optional[float] = None  # the target of the student chain it belongs to; None: shared
    seconds: float = 0.0
    reused: bool = False
    log: Path = field(default=None)


def _prune_ofa() -> str:
    return str(Path(sys.executable).parent / "prune-ofa")


def stages(out: Path, sizes: DemoSizes) -> list[DemoStage]:
    """The pipeline's stages with the demo's sizes, in the file's order, the student's chain once per
    target (``<stage>-<percent>``): what ``run_stages`` runs."""
    from launcher.submit import launch_command
    out = Path(out).resolve()
    where = {"output_root": str(out), "workdir": str(ROOT)}     # recipes from this package's configs/
    plain = load_pipeline(SPEC, check_partition=False, overrides=where)
    if SWEPT not in plain.stages:
        raise SystemExit(f"prune-ofa demo: {SPEC} has no stage {SWEPT!r} (the stage pruned to each target)")
    swept = {SWEPT}
    for stage in plain.stages.values():              # topological order: upstream stages come first
        if swept & set(stage.after):
            swept.add(stage.name)
    chains = []
    for sparsity in sizes.sparsities:
        pct, settings = round(100 * sparsity), demo_settings(sizes, sparsity)
        sized = {name: {"overrides": overrides} for name, (_, overrides) in settings.items()
                 if overrides and name in plain.stages}
        pipeline = load_pipeline(SPEC, check_partition=False, stage_dirs={name: f"{name}-{pct}" for name in swept},
                                 overrides={**where, "slurm": {"processes_per_node": sizes.processes},
                                            "stages": sized})
        chains.append((sparsity, pipeline, settings))
    todo, seen = [], set()
    for name in plain.stages:                        # stage by stage, a swept one once per target
        for sparsity, pipeline, settings in chains:
            stage = pipeline.stages[name]
            if stage.output_dir in seen:
                continue
            seen.add(stage.output_dir)
            argv = [arg for group in launch_command(stage) for arg in group]
            title = settings.get(name, (f"{name} ({stage.kind})", None))[0]
            todo.append(DemoStage(stage.output_dir.name, title, [_prune_ofa(), *argv[1:]],
                                  stage.output_dir / RESULT[stage.kind], stage,
                                  sparsity if name in swept else None))
    return todo


def output_dir(todo: list[DemoStage], stage: str, sparsity: Optional[float] = None) -> Path:
    """Where the pipeline's ``stage`` (of the chain pruned to ``sparsity``, for a swept one) wrote."""
    return next(s.pipeline_stage.output_dir for s in todo
                if s.pipeline_stage.name == stage and s.sparsity in (None, sparsity))


def run_stages(out: Path, todo: list[DemoStage]) -> list[DemoStage]:
    """Run every stage in order, with the variables the pipeline gives its jobs, its output in
    ``out/logs/<stage>.log``; the first failure stops the demo with the log's tail."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, stage in enumerate(todo, 1):
        stage.log = logs / f"{stage.name}.log"
        prefix = f"[{i}/{len(todo)} {time.perf_counter() - start:6.0f}s]"
        if stage.output.exists():
            stage.reused = True
            print(f"{prefix} {stage.title}: done before, reused ({stage.output})", flush=True)
            continue
        print(f"{prefix} {stage.title} ... (log: {stage.log})", flush=True)
        env = dict(os.environ, **{k: str(v) for k, v in stage.pipeline_stage.resources.env.items()})
        began = time.perf_counter()
        with open(stage.log, "wb") as log:
            log.write(("$ " + " ".join(stage.argv) + "\n\n").encode())
            log.flush()
            returncode = run_showing_progress(stage.argv, env, log, indent=" " * len(prefix))
        stage.seconds = time.perf_counter() - began
        if returncode != 0:
            tail = stage.log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"prune-ofa demo: stage {stage.name} failed (exit {returncode}); "
                             f"log {stage.log}:\n{tail}")
        if stage.pipeline_stage.kind == "prepare-data":       # it writes into the recipe's cache: mark it done
            stage.output.parent.mkdir(parents=True, exist_ok=True)
            stage.output.write_text("ok\n")
        print(f"{' ' * len(prefix)} done in {stage.seconds:.0f}s", flush=True)
    return todo


def run_showing_progress(argv: list, env: dict, log, indent: str, every: float = 0.5) -> int:
    """Run ``argv`` with its whole output in ``log``, and keep the latest progress bar it drew (rank
    0's tqdm line) on one line of this terminal, redrawn at most every ``every`` seconds (not a
    terminal: printed as a line every 30 s)."""
    import re
    # a tqdm line up to its closing bracket (a log line may follow it before the next \r)
    bar = re.compile(rb"[^\r\n]*?\d+%\|[^\r\n]*?\| *\d+/\d+ \[[^\]\r\n]*\]")
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shown, last_draw, pending = b"", 0.0, b""
    interactive = sys.stdout.isatty()
    while chunk := os.read(process.stdout.fileno(), 65536):
        log.write(chunk)
        pending = (pending + chunk)[-4096:]
        bars = bar.findall(pending)
        now = time.monotonic()
        if bars and bars[-1] != shown and now - last_draw >= (every if interactive else 30.0):
            shown, last_draw = bars[-1], now
            text = shown.decode(errors="replace").strip()
            if interactive:   # redraw in place
                width = max(20, os.get_terminal_size().columns - len(indent) - 1)
                print(f"\r{indent}{text[:width]}\x1b[K", end="", flush=True)
            else:             # a log file: a line every 30 s
                print(f"{indent}{text}", flush=True)
    log.flush()
    if shown and interactive:
        print("\r\x1b[K", end="", flush=True)
    return process.wait()


# -- reading the results back -------------------------------------------------------------------

def tensorboard_series(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    series = {}
    for events in sorted((run_dir / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            series.update({e.step: e.value for e in acc.Scalars(tag)})
    return series


def _last(series: dict):
    return series[max(series)] if series else None


def collect(todo: list[DemoStage], sizes: DemoSizes) -> dict:
    """Every number of the results table, read from what the stages wrote (TensorBoard events,
    sparsity.json, metrics.json, report.json)."""
    teacher = output_dir(todo, "teacher")
    rt_teacher = json.loads((output_dir(todo, "rt-teacher") / "metrics.json").read_text())
    results = {
        "teacher": {"mlm_accuracy_first": None, "mlm_accuracy": _last(tensorboard_series(teacher, "eval/mlm_accuracy")),
                    "perplexity": _last(tensorboard_series(teacher, "eval/perplexity"))},
        "rt_teacher": {"accuracy": rt_teacher["metrics"]["validation"]["accuracy"]},
        "students": [],
    }
    acc = tensorboard_series(teacher, "eval/mlm_accuracy")
    results["teacher"]["mlm_accuracy_first"] = acc[min(acc)] if acc else None
    for s in sizes.sparsities:
        student = output_dir(todo, "student", s)
        transfer = json.loads((output_dir(todo, "rt-transfer", s) / "metrics.json").read_text())
        qat = json.loads((output_dir(todo, "rt-qat", s) / "metrics.json").read_text())
        report = json.loads((output_dir(todo, "rt-report", s) / "report.json").read_text())
        results["students"].append({
            "target": s,
            "pretrain_sparsity": json.loads((student / "model" / "sparsity.json").read_text())["global"],
            "mlm_accuracy": _last(tensorboard_series(student, "eval/mlm_accuracy")),
            "perplexity": _last(tensorboard_series(student, "eval/perplexity")),
            "transfer_accuracy": transfer["metrics"]["validation"]["accuracy"],
            "transfer_sparsity": transfer["sparsity"], "transfer_sparsity_unchanged": transfer["sparsity_unchanged"],
            "qat_accuracy": qat["metrics"]["validation"]["accuracy"],
            "int8_accuracy": qat["int8_metrics"]["validation"]["accuracy"],
            "qat_sparsity_unchanged": qat["sparsity_unchanged"], "int8_pruned_nonzero": qat["int8_pruned_nonzero"],
            "encoder_sparsity": report["sparsity"]["encoder"],
            "nominal_encoder": report["nominal"]["encoder"]["ratio"],
            "real_encoder": report["real"]["encoder"]["ratio"],
            "real_whole_file": report["real"]["ratio_vs_dense_fp32"],
        })
    return results


def held_out_sizes(todo: list[DemoStage]) -> dict:
    """How many held-out examples the numbers stand on (the prepare stage's recipe, as it ran)."""
    from finetune.tasks.classification import load_rt_sentiment
    from sparse_pretrain.data.prepare import load_prepared
    from sparse_pretrain.recipe import load_recipe
    prepare = next(s.pipeline_stage for s in todo if s.pipeline_stage.kind == "prepare-data")
    recipe = load_recipe(prepare.config, prepare.override_args())
    _, held_out = load_prepared(recipe)
    t = recipe.training
    rows = min(len(held_out), t.eval_batches * t.micro_batch_size)
    return {"mlm_rows": rows, "mlm_held_out_rows": len(held_out),
            "rt_train": len(load_rt_sentiment()["train"]), "rt_validation": len(load_rt_sentiment()["validation"])}
