"""The demo's main part: the whole Prune Once for All chain on the packaged MiniLM-L6, offline, on CPU,
every stage started with ``prune-ofa launch`` (the command users run on clusters):

    prepare-data -> teacher preparation -> student pruning to 85% and 90% (DeepSpeed ZeRO-2, torchrun)
    -> dense RT task teacher -> pattern-locked transfer with KD -> 8-bit QAT (Accelerate) -> report

Step counts are small so that it ends in minutes on 2 cores; `DemoSizes` holds them in one place.
Each stage's output directory is under ``out``; a stage whose output already exists is reused, so a
rerun after a failure goes on from where it stopped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


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


@dataclass
class Stage:
    name: str
    title: str
    argv: list
    output: Path                      # the stage is done when this exists
    seconds: float = 0.0
    reused: bool = False
    log: Path = field(default=None)


def _prune_ofa() -> str:
    return str(Path(sys.executable).parent / "prune-ofa")


def stages(out: Path, sizes: DemoSizes) -> list[Stage]:
    n = sizes.processes
    launch = lambda stage, config, *extra: [_prune_ofa(), "launch", stage, "--config", str(config),  # noqa: E731
                                            "--processes-per-node", str(n), *extra]
    s_total, t_total = sizes.student_steps, sizes.teacher_steps
    common_pt = ["training.dataloader_workers=0", "training.save_interval=1000000", f"data.max_seq_length={sizes.seq_length}"]
    teacher = out / "minilm-l6-teacher"
    result = [
        Stage("prepare-data", "prepare the offline corpus (tokenize, NSP pairs, held-out split)",
              [_prune_ofa(), "prepare-data", "--config", str(CONFIGS / "minilm-l6-teacher.yaml"),
               f"data.max_seq_length={sizes.seq_length}"], out / ".prepared"),
        Stage("teacher", f"teacher preparation: {t_total} steps, {n} processes, DeepSpeed ZeRO-2",
              launch("pretrain", CONFIGS / "minilm-l6-teacher.yaml", f"training.output_dir={teacher}",
                     f"training.total_steps={t_total}", f"training.warmup_steps={max(1, t_total // 10)}",
                     f"training.eval_interval={max(1, t_total // 3)}", f"training.log_interval={max(1, t_total // 10)}",
                     *common_pt), teacher / "model"),
    ]
    for s in sizes.sparsities:
        pct = round(100 * s)
        student = out / f"minilm-l6-{pct}"
        result.append(Stage(
            f"student-{pct}", f"student pruning to {pct}%: {s_total} steps, {n} processes, GMP + KD + LR rewinding",
            launch("pretrain", CONFIGS / "minilm-l6-85.yaml", f"training.output_dir={student}",
                   f"model.name_or_path={teacher / 'model'}", f"model.teacher_name_or_path={teacher / 'model'}",
                   f"pruning.final_sparsity={s}", f"training.total_steps={s_total}",
                   f"training.warmup_steps={max(1, s_total // 10)}", f"pruning.policy_end={s_total * 2 // 3}",
                   f"pruning.end={s_total * 4 // 5}", f"pruning.interval={max(1, s_total // 15)}",
                   f"training.eval_interval={max(1, s_total // 4)}", f"training.log_interval={max(1, s_total // 10)}",
                   *common_pt), student / "model"))
    ft = ["task.max_seq_length=64", "training.batch_size=16", "training.eval_batch_size=128"]
    rt_teacher = out / "rt-teacher"
    result.append(Stage("rt-teacher", f"dense task teacher on RT sentiment: {sizes.finetune_steps} steps, "
                                      f"{n} processes (Accelerate DDP)",
                        launch("finetune", CONFIGS / "finetune" / "rt-teacher.yaml", f"training.output_dir={rt_teacher}",
                               f"training.max_steps={sizes.finetune_steps}", *ft), rt_teacher / "metrics.json"))
    for s in sizes.sparsities:
        pct = round(100 * s)
        transfer, qat = out / f"rt-sparse-{pct}", out / f"rt-sparse-{pct}-qat"
        result.append(Stage(
            f"transfer-{pct}", f"transfer of the {pct}% student: pattern-lock + KD, {sizes.finetune_steps} steps",
            launch("finetune", CONFIGS / "finetune" / "rt-sparse-85.yaml", f"training.output_dir={transfer}",
                   f"model.name_or_path={out / f'minilm-l6-{pct}' / 'model'}",
                   f"distillation.teacher={rt_teacher / 'model'}", f"training.max_steps={sizes.finetune_steps}", *ft),
            transfer / "metrics.json"))
        result.append(Stage(
            f"qat-{pct}", f"8-bit QAT of the {pct}% transfer: {sizes.qat_steps} steps, int8 export evaluated on CPU",
            launch("qat", CONFIGS / "finetune" / "rt-sparse-85-qat.yaml", f"training.output_dir={qat}",
                   f"model.name_or_path={transfer / 'model'}", f"distillation.teacher={rt_teacher / 'model'}",
                   f"training.max_steps={sizes.qat_steps}", *ft), qat / "metrics.json"))
        result.append(Stage(
            f"report-{pct}", f"compression report of the {pct}% model (sparse fp32 and int8)",
            [_prune_ofa(), "report", str(transfer / "model"), "--int8", str(qat / "model-int8"),
             "--metrics", str(qat / "metrics.json"), "--baseline", str(rt_teacher / "metrics.json"),
             "--out", str(out / f"report-{pct}")], out / f"report-{pct}" / "report.json"))
    return result


def run_stages(out: Path, sizes: DemoSizes) -> list[Stage]:
    """Run every stage in order, its output in ``out/logs/<stage>.log``; the first failure stops
    the demo with the log's tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    todo = stages(out, sizes)
    start = time.perf_counter()
    for i, stage in enumerate(todo, 1):
        stage.log = logs / f"{stage.name}.log"
        prefix = f"[{i}/{len(todo)} {time.perf_counter() - start:6.0f}s]"
        if stage.output.exists():
            stage.reused = True
            print(f"{prefix} {stage.title}: done before, reused ({stage.output})", flush=True)
            continue
        print(f"{prefix} {stage.title} ... (log: {stage.log})", flush=True)
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
        if stage.name == "prepare-data":
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


def collect(out: Path, sizes: DemoSizes) -> dict:
    """Every number of the results table, read from what the stages wrote (TensorBoard events,
    sparsity.json, metrics.json, report.json)."""
    teacher = out / "minilm-l6-teacher"
    rt_teacher = json.loads((out / "rt-teacher" / "metrics.json").read_text())
    results = {
        "teacher": {"mlm_accuracy_first": None, "mlm_accuracy": _last(tensorboard_series(teacher, "eval/mlm_accuracy")),
                    "perplexity": _last(tensorboard_series(teacher, "eval/perplexity"))},
        "rt_teacher": {"accuracy": rt_teacher["metrics"]["validation"]["accuracy"]},
        "students": [],
    }
    acc = tensorboard_series(teacher, "eval/mlm_accuracy")
    results["teacher"]["mlm_accuracy_first"] = acc[min(acc)] if acc else None
    for s in sizes.sparsities:
        pct = round(100 * s)
        student = out / f"minilm-l6-{pct}"
        transfer = json.loads((out / f"rt-sparse-{pct}" / "metrics.json").read_text())
        qat = json.loads((out / f"rt-sparse-{pct}-qat" / "metrics.json").read_text())
        report = json.loads((out / f"report-{pct}" / "report.json").read_text())
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


def held_out_sizes(out: Path, sizes: DemoSizes) -> dict:
    """How many held-out examples the numbers stand on."""
    from sparse_pretrain.recipe import load_recipe
    from sparse_pretrain.data.prepare import load_prepared
    recipe = load_recipe(CONFIGS / "minilm-l6-teacher.yaml", [f"data.max_seq_length={sizes.seq_length}"])
    _, held_out = load_prepared(recipe)
    t = recipe.training
    rows = min(len(held_out), t.eval_batches * t.micro_batch_size)
    from finetune.tasks.classification import load_rt_sentiment
    return {"mlm_rows": rows, "mlm_held_out_rows": len(held_out),
            "rt_train": len(load_rt_sentiment()["train"]), "rt_validation": len(load_rt_sentiment()["validation"])}


def plot_training(out: Path, sizes: DemoSizes) -> Path:
    """Four panels from the runs' TensorBoard events: the students' sparsity (target and reached),
    their rewound learning rate, the pre-training loss of the teacher and the students, and the RT
    training loss of the task teacher and of each pattern-locked transfer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_s, ax_lr, ax_loss, ax_rt) = plt.subplots(1, 4, figsize=(20, 4))
    teacher = out / "minilm-l6-teacher"
    loss = tensorboard_series(teacher, "train/loss")
    ax_loss.plot([s + 1 for s in loss], list(loss.values()), label="teacher preparation", color="black")
    for s in sizes.sparsities:
        pct = round(100 * s)
        run = out / f"minilm-l6-{pct}"
        target, reached = tensorboard_series(run, "sparsity/target"), tensorboard_series(run, "sparsity/global")
        ax_s.step([k + 1 for k in target], list(target.values()), where="post", label=f"{pct}% target")
        ax_s.plot([k + 1 for k in reached], list(reached.values()), "o", ms=3, label=f"{pct}% masks")
        lr = tensorboard_series(run, "train/lr")
        ax_lr.plot([k + 1 for k in lr], list(lr.values()), label=f"student {pct}%")
        loss = tensorboard_series(run, "train/loss")
        ax_loss.plot([k + 1 for k in loss], list(loss.values()), label=f"student {pct}% (0.5 MLM + 0.5 KD)")
    for name, label in [("rt-teacher", "dense task teacher (cross-entropy)"),
                        *[(f"rt-sparse-{round(100 * s)}", f"{round(100 * s)}% transfer (KD, T=2)")
                          for s in sizes.sparsities]]:
        loss = tensorboard_series(out / name, "train/loss")
        ax_rt.plot(list(loss), list(loss.values()), label=label)
    ax_rt.set(title="RT fine-tuning loss", xlabel="step")
    ax_s.set(title="sparsity of the pruned layers", xlabel="step", ylabel="sparsity")
    ax_lr.set(title="learning rate (rewound every f steps)", xlabel="step")
    ax_loss.set(title="training loss", xlabel="step")
    for ax in (ax_s, ax_lr, ax_loss, ax_rt):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def results_table(results: dict) -> str:
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    lines = ["| model | sparsity after pre-training | RT accuracy (transfer) | sparsity after transfer | "
             "RT accuracy (QAT fake-quant / int8 on CPU) | pruned weights nonzero in int8 | encoder compression "
             "nominal / real | whole file real |",
             "|---|---|---|---|---|---|---|---|",
             f"| dense MiniLM-L6 (task teacher) | 0 | {results['rt_teacher']['accuracy']:.4f} | - | - | - | 1x | 1x |"]
    for s in results["students"]:
        lines.append(
            f"| {round(100 * s['target'])}% Prune OFA | {pct(s['pretrain_sparsity'])} | {s['transfer_accuracy']:.4f} | "
            f"{pct(s['transfer_sparsity'])} ({'unchanged' if s['transfer_sparsity_unchanged'] else 'CHANGED'}) | "
            f"{s['qat_accuracy']:.4f} / {s['int8_accuracy']:.4f} | {s['int8_pruned_nonzero']} | "
            f"{s['nominal_encoder']:.1f}x / {s['real_encoder']:.1f}x | {s['real_whole_file']:.2f}x |")
    return "\n".join(lines)
