"""What a fine-tuning run shows (finetune/monitoring.py, finetune/trainer.py): evaluations at the end
of every epoch (or every training.eval_every steps) in metrics.json's history and in TensorBoard, and
the training scalars: each loss term (the KD term also as a KL divergence), the learning rate,
throughput and the masks' sparsity."""
import json
from pathlib import Path

import pytest
import torch

from finetune.monitoring import TERMS, TrainingWindow, evaluation_due

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "sentence", "number", *map(str, range(10))]


def test_evaluations_are_due_every_n_steps_or_at_every_epoch_end():
    assert [s for s in range(1, 10) if evaluation_due(s, None, 3)] == [3, 6, 9]
    assert [s for s in range(1, 10) if evaluation_due(s, 2, 3)] == [2, 4, 6, 8]


def test_the_window_logs_means_over_steps_and_processes_and_survives_a_save():
    window = TrainingWindow("cpu", distilled=True)
    batch = {"input_ids": torch.zeros(4, 5, dtype=torch.long), "attention_mask": torch.tensor([[1] * 3 + [0] * 2] * 4)}
    for value in (1.0, 2.0, 3.0):
        window.add({k: torch.tensor(value * (i + 1)) for i, k in enumerate(TERMS)}, batch)
    saved = json.loads(json.dumps(window.state_dict(lambda x: x * 2, main=True)))   # 2 processes alike
    resumed = TrainingWindow("cpu", distilled=True)
    resumed.load_state_dict(saved, main=True)
    for w in (window, resumed):
        w.add({k: torch.tensor(4.0 * (i + 1)) for i, k in enumerate(TERMS)}, batch)
    on_other = TrainingWindow("cpu", distilled=True)
    on_other.load_state_dict(saved, main=False)                 # the other process starts from zero sums
    assert on_other.sums.sum() == 0 and on_other.steps == 3
    first, second = (w.scalars(lambda x: x, processes=2) for w in (window, resumed))
    assert first["train/loss"] == second["train/loss"] == (2 * 6.0 + 4.0) / (4 * 2)
    assert first["train/kd_kl"] == (2 * 24.0 + 16.0) / (4 * 2)
    # throughput: samples and non-padding tokens per second, a step's time
    assert first["perf/samples_per_s"] * first["perf/step_time"] == pytest.approx(4.0)
    assert first["perf/tokens_per_s"] / first["perf/samples_per_s"] == pytest.approx(3.0)
    assert window.steps == 0 and window.sums.sum() == 0
    plain = TrainingWindow("cpu", distilled=False)
    plain.add({"loss": torch.tensor(1.0), "loss_task": torch.tensor(1.0)}, batch)
    assert {k for k in plain.scalars(lambda x: x, 1) if k.startswith("train/")} == {"train/loss", "train/loss_task"}


# -- tiny runs, in this process ---------------------------------------------------------------------

@pytest.fixture
def fresh_accelerate(monkeypatch):
    """Accelerate's process-wide state, reset before and after (an Accelerator is a singleton per process)."""
    from accelerate.state import AcceleratorState, GradientState
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_classifier(out: Path, seed: int, sparsity: float = 0.0) -> Path:
    """One layer of width 32, a 17-word vocabulary; ``sparsity`` of its encoder's Linear weights zeroed."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from sparse_pretrain.core.masks import find_prunable
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2))
    with torch.no_grad():
        for _, w in find_prunable(model):
            w.view(-1)[torch.randperm(w.numel())[:int(sparsity * w.numel())]] = 0
    model.save_pretrained(out)
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(out)
    return out


def zeros_fraction(model_dir: Path) -> float:
    from transformers import AutoModelForSequenceClassification

    from sparse_pretrain.core.masks import find_prunable
    weights = [w for _, w in find_prunable(AutoModelForSequenceClassification.from_pretrained(model_dir))]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring")
    files = {}
    for split, n in (("train", 12), ("validation", 4)):     # 3 steps per epoch at batch 4
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"text": "sentence number " + " ".join(str(i)[:1] * (i % 4)),
                                                    "label": i % 2}) + "\n" for i in range(n)))
    return root, files, tiny_classifier(root / "student", 0, sparsity=0.5), tiny_classifier(root / "teacher", 1)


def run_tiny(models, out: Path, *overrides):
    from finetune.recipe import load_finetune_recipe
    from finetune.trainer import run
    _, files, student, teacher = models
    return run(load_finetune_recipe(None, [
        "task.name=tiny", f"task.data_files.train={files['train']}",
        f"task.data_files.validation={files['validation']}", "task.text_columns=[text]", "task.num_labels=2",
        "task.max_seq_length=16", f"model.name_or_path={student}",
        "model.pattern_lock=true", "model.min_sparsity=0.4", f"distillation.teacher={teacher}",
        "distillation.lambda_task=0.5", "distillation.lambda_kd=0.5", "training.epochs=3", "training.batch_size=4",
        f"training.output_dir={out}", *overrides]))


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every TensorBoard scalar of the run, read with TensorBoard's own reader: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    series = {}
    for events in sorted((run_dir / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return series


@pytest.mark.slow
def test_three_epochs_evaluate_at_every_epoch_end_and_log_every_term(models, tmp_path, fresh_accelerate):
    """training.eval_every unset: an evaluation at the end of each of the 3 epochs (steps 3, 6, 9), in
    metrics.json's history and in TensorBoard; the last one is the final metrics. The training scalars:
    the loss is lambda_task x task + lambda_kd x KD, the KL term is below the soft cross-entropy by the
    teacher's entropy (> 0), throughput is the batch per step, the sparsity the pattern-locked model's."""
    out = tmp_path / "run"
    summary = run_tiny(models, out)
    assert [h["step"] for h in summary["history"]] == [3, 6, 9]
    assert summary["metrics"] == {k: v for k, v in summary["history"][-1].items() if k != "step"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["history"] == summary["history"]
    series = scalars(out)
    assert series["eval/validation/accuracy"] == {h["step"]: pytest.approx(h["validation"]["accuracy"])
                                                  for h in summary["history"]}
    last = {tag: values[9] for tag, values in series.items() if 9 in values}
    assert {"train/loss", "train/loss_task", "train/loss_kd", "train/kd_kl", "train/lr", "perf/samples_per_s",
            "perf/tokens_per_s", "perf/step_time", "sparsity/global"} <= set(last)
    assert last["train/loss"] == pytest.approx(0.5 * last["train/loss_task"] + 0.5 * last["train/loss_kd"], rel=1e-5)
    assert 0 < last["train/kd_kl"] < last["train/loss_kd"]
    assert last["perf/samples_per_s"] * last["perf/step_time"] == pytest.approx(4.0, rel=1e-3)
    assert last["perf/tokens_per_s"] > last["perf/samples_per_s"] * 3          # [CLS] sentence number [SEP] ...
    assert last["sparsity/global"] == pytest.approx(zeros_fraction(models[2]), abs=1e-6)
    assert last["sparsity/global"] == pytest.approx(summary["sparsity"], abs=1e-6)


@pytest.mark.slow
def test_eval_every_n_steps_evaluates_at_n_2n_and_the_end(models, tmp_path, fresh_accelerate):
    out = tmp_path / "run"
    summary = run_tiny(models, out, "training.eval_every=2")
    assert [h["step"] for h in summary["history"]] == [2, 4, 6, 8]
    assert set(scalars(out)["eval/validation/accuracy"]) == {2, 4, 6, 8, 9}      # and the final evaluation
