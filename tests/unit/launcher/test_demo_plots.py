"""The demo's training.png (launcher/demo_plots.py), drawn from TensorBoard events written here: a 2 x 3
grid at a legible size, every axis titled and labelled, evaluation curves, the KL terms, sparsity."""
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("matplotlib")


def stage(root: Path, name: str, sparsity=None) -> SimpleNamespace:
    """What the plot reads of a DemoStage: the pipeline stage's name and output directory, the sparsity."""
    return SimpleNamespace(pipeline_stage=SimpleNamespace(name=name, output_dir=root / name), sparsity=sparsity)


def write_events(run: Path, series: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(run / "tensorboard"))
    for tag, points in series.items():
        for step, value in points.items():
            writer.add_scalar(tag, value, step)
    writer.close()


@pytest.mark.slow
def test_the_training_plot_is_a_legible_grid_with_evaluations_kl_and_sparsity(tmp_path):
    from launcher.demo_pipeline import DemoSizes
    from launcher.demo_plots import DPI, plot_training, training_figure
    todo = [stage(tmp_path, "teacher"), stage(tmp_path, "student", 0.85), stage(tmp_path, "rt-teacher"),
            stage(tmp_path, "rt-transfer", 0.85), stage(tmp_path, "rt-qat", 0.85)]
    write_events(tmp_path / "teacher", {"train/loss": {0: 9.0, 9: 7.0}, "eval/mlm_accuracy": {9: 0.1}})
    write_events(tmp_path / "student", {
        "sparsity/target": {0: 0.0, 4: 0.85}, "sparsity/global": {0: 0.0, 4: 0.85}, "train/lr": {0: 1e-4, 9: 0.0},
        "train/loss_pt": {4: 7.5, 9: 7.4}, "train/kd_kl": {4: 3.0, 9: 2.0}, "eval/mlm_accuracy": {4: 0.05, 9: 0.06}})
    for name, kl in (("rt-teacher", None), ("rt-transfer", {10: 0.5, 20: 0.2}), ("rt-qat", {10: 0.1})):
        write_events(tmp_path / name, {"train/loss_task": {10: 0.7, 20: 0.6}, **({"train/kd_kl": kl} if kl else {}),
                                       "eval/validation/accuracy": {10: 0.6, 20: 0.7},
                                       **({"sparsity/global": {20: 0.85}} if kl else {})})
    sizes = DemoSizes()
    fig = training_figure(todo, sizes)
    axes = fig.axes
    assert len(axes) == 6 and [round(x) for x in fig.get_size_inches() * DPI] == [1600, 950]
    for ax in axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        assert min(t.get_fontsize() for t in (ax.title, ax.xaxis.label, *ax.get_legend().get_texts())) >= 10
    by_title = {ax.get_title().split(" (")[0]: ax for ax in axes}
    lines = {name: {line.get_label(): line for line in ax.get_lines()} for name, ax in by_title.items()}
    accuracy = lines["RT validation accuracy"]
    assert set(accuracy) == {"dense task teacher", "85% transfer, 85.0% sparse", "85% QAT, 85.0% sparse"}
    assert list(accuracy["85% transfer, 85.0% sparse"].get_xdata()) == [10, 20]
    assert list(lines["RT fine-tuning: losses"]["85% transfer: KL to the task teacher"].get_ydata()) == pytest.approx(
        [0.5, 0.2])
    assert list(lines["Pre-training: losses"]["student 85%: KL to the teacher"].get_xdata()) == [5, 10]   # 1-based
    assert list(lines["Held-out masked-LM accuracy"]["student 85%"].get_ydata()) == pytest.approx([0.05, 0.06])
    assert "85% masks" in lines["Pre-training: sparsity of the pruned layers"]
    path = plot_training(tmp_path, todo, sizes)
    from PIL import Image
    assert Image.open(path).size == (1600, 950)
