"""bench/fidelity/lr_sweep.py selects the transfer LR without touching what the study reports: the dev rows
come from the training split only, no stage reads the study's validation file, the task teacher has not
seen the dev rows, and each swept run trains at its own LR (fast: nothing runs)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from bench.fidelity import lr_sweep
from bench.fidelity.study import SCALES


def study_runs(tmp_path: Path, tasks, rows=50) -> Path:
    runs = tmp_path / "runs"
    (runs / "tasks").mkdir(parents=True)
    for task in tasks:
        for split, n in (("train", rows), ("validation", 10)):
            lines = [json.dumps({"text": f"{task} {split} {i}", "label": i % 3}) for i in range(n)]
            (runs / "tasks" / f"{task}-{split}.jsonl").write_text("\n".join(lines) + "\n")
    return runs


def test_dev_rows_are_a_fixed_fifth_of_the_training_rows_and_fit_is_the_rest(tmp_path):
    runs = study_runs(tmp_path, ["trec"], rows=101)
    train = runs / "tasks" / "trec-train.jsonl"
    files = lr_sweep.write_dev_split(train, tmp_path / "a", "trec")
    fit, dev = (Path(files[k]).read_text().splitlines() for k in ("train", "validation"))
    assert len(dev) == round(101 * lr_sweep.DEV_FRACTION) and not set(fit) & set(dev)
    assert Counter(fit + dev) == Counter(train.read_text().splitlines())
    again = lr_sweep.write_dev_split(train, tmp_path / "b", "trec")
    assert Path(again["validation"]).read_text().splitlines() == dev      # the same rows every time


def test_no_sweep_stage_reads_the_studys_validation_split_and_each_trains_at_its_lr(tmp_path):
    from finetune.recipe import load_finetune_recipe
    s = SCALES["cpu-medium"]
    runs = study_runs(tmp_path, s.tasks)
    lrs = [1e-4, 3e-4, 1e-3]
    stages = lr_sweep.sweep_stages(s, runs, runs / "lr-sweep", {t: 20.0 for t in s.tasks}, 0, list(s.tasks), lrs)
    assert len(stages) == len(s.tasks) * (1 + len(lrs) * len(lr_sweep.SWEPT))
    by_key = {st.key: st for st in stages}
    for st in stages:
        text = " ".join(st.overrides)
        assert "-validation.jsonl" not in text and f"{st.task}-fit.jsonl" in text and f"{st.task}-dev.jsonl" in text
        recipe = load_finetune_recipe(st.config, [o for o in st.overrides if not o.startswith((
            "model.name_or_path=", "distillation.teacher=", "task.data_files="))])
        assert recipe.training.max_steps == s.task_steps and recipe.task.name == st.task
        if st.key.startswith("lr"):
            lr = float(st.key.split("/")[0][2:])
            assert [o for o in st.overrides if o.startswith("training.learning_rate=")] == [
                f"training.learning_rate={lr}"]
            dense = by_key[st.needs[0]]
            assert f"distillation.teacher={dense.out / 'model'}" in st.overrides     # taught on fit rows only
            model = next(o for o in st.overrides if o.startswith("model.name_or_path="))
            expected = runs / "seed0" / "student-ofa" / "model" if st.key.endswith("/prune-ofa") else \
                runs / "teacher" / "model"
            assert model == f"model.name_or_path={expected}"
        else:
            assert f"training.learning_rate={s.task_lr}" in st.overrides


def test_the_table_bolds_each_rows_best_lr_and_compares_the_variants_at_their_own_best(tmp_path):
    accuracy = {("lr0.0001", "prune-ofa"): 0.5, ("lr0.001", "prune-ofa"): 0.7,
                ("lr0.0001", "ft-pruning-1x"): 0.8, ("lr0.001", "ft-pruning-1x"): 0.6}
    for (lr, variant), value in accuracy.items():
        path = tmp_path / lr / "seed0" / "trec" / f"{variant}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": f"{lr}/seed0/trec/{variant}", "seed": 0, "task": "trec",
                                    "variant": variant, "accuracy": value}))
    table = lr_sweep.summarize_sweep(tmp_path, [1e-4, 1e-3])
    assert "| trec | (a) Prune OFA: transfer B | 50.0 | **70.0** |" in table
    assert "| trec | (b) fine-tune pruning, B | **80.0** | 60.0 |" in table
    assert "best (a) 70.0 at lr0.001, best (b) 80.0 at lr0.0001: (a) − (b) at their own best LR -10.0" in table


def test_the_linear_probe_scores_separable_features_high_and_label_noise_at_chance():
    """bench/fidelity/probe.py's probe: what it reports is what a linear model can read off the features."""
    import torch

    from bench.fidelity.probe import probe_accuracy
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (800,), generator=g)
    centres = 3 * torch.randn(4, 16, generator=g)
    features = centres[labels] + torch.randn(800, 16, generator=g)
    assert probe_accuracy(features[:600], labels[:600], features[600:], labels[600:]) > 0.95
    noise = torch.randn(800, 16, generator=g)
    assert probe_accuracy(noise[:600], labels[:600], noise[600:], labels[600:]) < 0.4     # chance is 0.25
