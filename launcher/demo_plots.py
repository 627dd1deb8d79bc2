"""``training.png``, the demo's curves, read back from the stages' TensorBoard events: a 2 x 3 grid,
pre-training on top (sparsity, the rewound learning rate, the losses with the KD term as a KL
divergence), then the held-out masked-LM accuracy and the RT fine-tuning (losses with the KL to the
task teacher, validation accuracy at every evaluation, each run's sparsity in its legend).
Pre-training logs at 0-based steps (``sparse_pretrain/trainer.py``), fine-tuning at 1-based ones:
both are drawn 1-based, the steps done.
"""
from __future__ import annotations

from pathlib import Path

from launcher.demo_pipeline import DemoSizes, DemoStage, output_dir

#: matplotlib settings of the figure: at 100 dpi, 11 pt text and 10 pt legends stay legible
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
         "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.grid": True, "grid.alpha": 0.3}
SIZE_INCHES, DPI = (16, 9.5), 100


def _plot(ax, series: dict | None, label: str, shift: int = 0, **style) -> None:
    """``series`` ({step: value}) as a line at ``step + shift``; nothing where the run logged none."""
    if series:
        steps = sorted(series)
        if len(steps) == 1:                # one point (a short run): a marker, not an invisible line
            style.setdefault("marker", "o")
        ax.plot([s + shift for s in steps], [series[s] for s in steps], label=label, **style)


def run_scalars(run: Path) -> dict[str, dict[int, float]]:
    """Every scalar of ``run``'s TensorBoard events, ``{tag: {step: value}}`` (the later file's value
    where two hold a step: a resumed run's), each file read once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    series: dict[str, dict[int, float]] = {}
    for events in sorted((run / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return series


def _sparsity_label(scalars: dict) -> str:
    reached = scalars.get("sparsity/global")
    return f", {100 * reached[max(reached)]:.1f}% sparse" if reached else ""


def plot_training(out: Path, todo: list[DemoStage], sizes: DemoSizes) -> Path:
    """Draw ``out/training.png`` from the runs of ``todo``; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = training_figure(todo, sizes)
    path = out / "training.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def training_figure(todo: list[DemoStage], sizes: DemoSizes):
    """The figure of :func:`plot_training` (a matplotlib Figure, 2 x 3 axes)."""
    import matplotlib.pyplot as plt
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(2, 3, figsize=SIZE_INCHES, dpi=DPI)
        (ax_s, ax_lr, ax_loss), (ax_mlm, ax_rt, ax_acc) = axes
        teacher = run_scalars(output_dir(todo, "teacher"))
        _plot(ax_loss, teacher.get("train/loss"), "teacher preparation: MLM", 1, color="black")
        _plot(ax_mlm, teacher.get("eval/mlm_accuracy"), "teacher preparation", 1, color="black", marker="o")
        for i, s in enumerate(sizes.sparsities):
            pct, color = round(100 * s), f"C{i}"
            run = run_scalars(output_dir(todo, "student", s))
            target = run.get("sparsity/target")
            if target:
                ax_s.step([k + 1 for k in sorted(target)], [target[k] for k in sorted(target)], where="post",
                          label=f"{pct}% schedule's target", color=color)
            _plot(ax_s, run.get("sparsity/global"), f"{pct}% masks", 1, color=color, marker="o", ls="", ms=4)
            _plot(ax_lr, run.get("train/lr"), f"student {pct}%", 1, color=color)
            _plot(ax_loss, run.get("train/loss_pt"), f"student {pct}%: MLM", 1, color=color)
            _plot(ax_loss, run.get("train/kd_kl"), f"student {pct}%: KL to the teacher", 1, color=color, ls="--")
            _plot(ax_mlm, run.get("eval/mlm_accuracy"), f"student {pct}%", 1, color=color, marker="o")
        finetuned = [(output_dir(todo, "rt-teacher"), "dense task teacher", "black")]
        for i, s in enumerate(sizes.sparsities):
            pct = round(100 * s)
            finetuned += [(output_dir(todo, "rt-transfer", s), f"{pct}% transfer", f"C{i}"),
                          (output_dir(todo, "rt-qat", s), f"{pct}% QAT", f"C{i + len(sizes.sparsities)}")]
        for run_dir, name, color in finetuned:
            run = run_scalars(run_dir)
            _plot(ax_rt, run.get("train/kd_kl"), f"{name}: KL to the task teacher", color=color, ls="--")
            if "train/loss_task" in run:
                _plot(ax_rt, run["train/loss_task"], f"{name}: cross-entropy", color=color)
            else:           # a run logged before the terms were: its loss only
                _plot(ax_rt, run.get("train/loss"), f"{name}: loss", color=color)
            _plot(ax_acc, run.get("eval/validation/accuracy"), name + _sparsity_label(run), color=color, marker="o")
        ax_s.set(title="Pre-training: sparsity of the pruned layers", xlabel="pre-training step", ylabel="sparsity")
        ax_lr.set(title="Pre-training: learning rate (rewound every f steps)", xlabel="pre-training step",
                  ylabel="learning rate")
        ax_loss.set(title="Pre-training: losses (KL x T², 0 = the teacher's)", xlabel="pre-training step",
                    ylabel="loss (nats, log scale)")
        ax_mlm.set(title="Held-out masked-LM accuracy", xlabel="pre-training step", ylabel="accuracy")
        ax_rt.set(title="RT fine-tuning: losses (KL x T², T = 2)", xlabel="fine-tuning step",
                  ylabel="loss (nats, log scale)")
        ax_acc.set(title="RT validation accuracy (each evaluation)", xlabel="fine-tuning step", ylabel="accuracy")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        for ax in (ax_loss, ax_rt):        # cross-entropies of ~1-10 and a KL falling towards 0, both readable
            ax.set_yscale("log")
        for ax in axes.flat:
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.tight_layout()
    return fig
