"""bench/fidelity/: what the amortized study plans (every stage's command is a valid recipe, the
dependencies, the budgets and the cpu-medium pruning run's 10x), the bundle's round trip, and the
statements the summary draws from results (fast: no stage runs here; tests/bench/test_fidelity_smoke.py
runs them all)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.fidelity import study
from bench.fidelity.study import SCALES, Inputs, break_even_tasks, plan, variants_for
from bench.fidelity.summary import summarize

ROOT = Path(__file__).resolve().parents[2]
MEASURED = ROOT / "bench" / "fidelity" / "results" / "cpu-medium" / "inputs.json"


def inputs_for(s, tmp_path: Path, task_tokens=None, per_row=123.4) -> Inputs:
    files = {t: {"train": str(tmp_path / f"{t}-train.jsonl"), "validation": str(tmp_path / f"{t}-validation.jsonl")}
             for t in s.tasks}
    return Inputs("packaged:minilm-l6", (str(tmp_path / "corpus.jsonl"),), files,
                  task_tokens or {t: 30.0 for t in s.tasks}, per_row)


def test_cpu_medium_prunes_for_at_least_ten_per_task_budgets_of_the_measured_tokens(tmp_path):
    """The issue's rule, on the token counts the committed run measured (mean tokens per row)."""
    measured = json.loads(MEASURED.read_text())
    s = SCALES["cpu-medium"]
    stages = {st.key: st for st in plan(s, inputs_for(s, tmp_path, measured["task_tokens"],
                                                       measured["corpus_tokens_per_row"]),
                                        tmp_path / "runs", [0], variants_for(s), list(s.tasks))}
    per_task = [stages[f"seed0/{t}/dense"].tokens for t in s.tasks]
    assert stages["seed0/student-ofa"].tokens >= 10 * sum(per_task) / len(per_task)
    assert len(s.tasks) >= 3


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_stage_is_a_valid_recipe_and_needs_only_earlier_stages(scale, tmp_path):
    from finetune.recipe import load_finetune_recipe
    from sparse_pretrain.recipe import load_recipe
    s = SCALES[scale]
    stages = plan(s, inputs_for(s, tmp_path), tmp_path / "runs", [0, 1], variants_for(s), list(s.tasks))
    keys = [st.key for st in stages]
    assert len(keys) == len(set(keys))
    # one teacher for all seeds; per seed three students (no-kd-transfer reuses ofa's) and 8 runs per task
    assert len(stages) == 1 + 2 * (3 + 8 * len(s.tasks))
    for i, st in enumerate(stages):
        assert all(keys.index(n) < i for n in st.needs), st.key
        overrides = [o for o in st.overrides if not o.startswith(("model.name_or_path=", "model.teacher_name_or_path=",
                                                                     "distillation.teacher=", "task.data_files="))]
        if st.command == "pretrain":
            recipe = load_recipe(st.config, overrides)
            assert recipe.training.total_steps in (s.teacher_steps, s.student_steps)
        else:
            recipe = load_finetune_recipe(st.config, overrides)
            assert recipe.training.max_steps == study.multiple(st.key.rsplit("/", 1)[1]) * s.task_steps
            assert recipe.task.name == st.task
    by_key = {st.key: st for st in stages}
    assert by_key["seed1/trec/ofa-no-kd-transfer" if "trec" in s.tasks else
                  f"seed1/{s.tasks[0]}/ofa-no-kd-transfer"].needs[0] == "seed1/student-ofa"


def test_fine_tune_pruning_keeps_the_students_schedule_fractions_at_each_budget(tmp_path):
    s = SCALES["cpu-medium"]
    for k in s.multiples:
        steps = k * s.task_steps
        sched = study.schedule(steps, s)
        assert abs(sched["policy_end"] / steps - s.policy_end) < 0.01
        assert abs(sched["end"] / steps - s.end) < 0.01


def test_break_even_is_where_prune_once_plus_n_budgets_costs_less_than_n_times_k():
    pruning, per_task = 600_000.0, 50_000.0
    for k in (2, 4):
        n = break_even_tasks(pruning, per_task, k)
        assert pruning + math.ceil(n + 1e-9) * per_task < math.ceil(n + 1e-9) * k * per_task
        assert pruning + math.floor(n) * per_task >= math.floor(n) * k * per_task
    assert break_even_tasks(pruning, per_task, 1) == math.inf


def write(results: Path, record: dict) -> None:
    path = results / (record["key"] + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_summary_states_the_comparison_the_catch_up_budget_and_the_ablations(tmp_path):
    s = SCALES["cpu-medium"]
    results = tmp_path / "results"
    write(results, {"key": "teacher", "seed": 0, "tokens": 1e6, "seconds": 60, "mlm_accuracy": 0.3})
    acc = {"dense": 0.80, "prune-ofa": 0.75, "ft-pruning-1x": 0.70, "ft-pruning-2x": 0.74, "ft-pruning-4x": 0.78,
           "ofa-no-lrr": 0.74, "ofa-no-kd-pruning": 0.70, "ofa-no-kd-transfer": 0.76}
    for seed in (0, 1):
        write(results, {"key": f"seed{seed}/student-ofa", "seed": seed, "tokens": 600_000, "seconds": 60,
                        "mlm_accuracy": 0.2, "encoder_sparsity": 0.85, "exact_per_layer": True})
        for task in s.tasks:
            for variant, a in acc.items():
                write(results, {"key": f"seed{seed}/{task}/{variant}", "seed": seed, "task": task, "variant": variant,
                                "accuracy": a + 0.01 * seed, "tokens": study.multiple(variant) * 50_000,
                                "seconds": 10, "encoder_sparsity": 0.0 if variant == "dense" else 0.85,
                                "exact_per_layer": True})
    text = summarize(results, "cpu-medium", s)
    statements = json.loads((results / "summary.json").read_text())["statements"]
    assert statements["a_minus_b_equal_budget"]["all"]["mean"] == pytest.approx(0.05)
    assert statements["b_catches_up_at"] == {t: 4 for t in s.tasks}
    assert "at 4B, so pruning once costs less in all from 4.0 tasks" in text      # 600k / (3 x 50k)
    assert statements["gain_of_ofa-no-kd-pruning"]["paired"]["mean"] == pytest.approx(0.05)
    assert "**KD in pruning**: (a) − (a without it) = +5.0" in text
    assert "**KD in transfer**: (a) − (a without it) = -1.0" in text
    assert statements["gain_of_ofa-no-kd-pruning"]["verdict"] == "helps beyond the spread"
    assert statements["gain_of_ofa-no-kd-transfer"]["verdict"] == "not beyond the spread"
    (results / "seed1" / "trec" / "ofa-no-lrr.json").unlink()
    for path in results.glob("seed1/*/ofa-no-kd-pruning.json"):   # the ablation in one seed, the core in two
        path.unlink()
    summarize(results, "cpu-medium", s)
    statements = json.loads((results / "summary.json").read_text())["statements"]
    assert statements["gain_of_ofa-no-kd-pruning"]["verdict"] == "one seed: no spread to judge against"
    assert statements["gain_of_ofa-no-lrr"]["verdict"] != "one seed: no spread to judge against"  # 2 of 3 tasks
    for path in results.glob("seed1/**/*.json"):      # one seed left: no spread to judge a gain against
        path.unlink()
    summarize(results, "cpu-medium", s)
    statements = json.loads((results / "summary.json").read_text())["statements"]
    assert statements["gain_of_ofa-no-kd-pruning"]["verdict"] == "one seed: no spread to judge against"


def test_a_bundle_unpacks_to_the_packaged_weights_rounded_to_bf16(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from bench.fidelity.inputs import bundle_bytes, from_bundle, pack
    from sparse_pretrain.runtime.packaged_models import packaged_model_dir
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "A sentence. Another one."}) + "\n")
    s = SCALES["smoke"]
    pack(tmp_path / "bundle", s.tasks, (str(corpus),))
    assert bundle_bytes(tmp_path / "bundle") < 50 * 2**20
    original = load_file(packaged_model_dir("minilm-l6") / "model.safetensors")
    unpacked_dir = tmp_path / "work" / "inputs" / "model"
    import bench.fidelity.inputs as inputs_module
    monkeypatch.setattr(inputs_module, "corpus_tokens_per_row", lambda *a: 1.0)   # the smoke test's part
    got = from_bundle(s, tmp_path / "bundle", tmp_path / "work")
    unpacked = load_file(unpacked_dir / "model.safetensors")
    name = "encoder.layer.0.attention.self.query.weight"
    assert unpacked[name].dtype == torch.float32
    assert torch.equal(unpacked[name], original[name].to(torch.bfloat16).float())
    assert Path(got.task_files["trec"]["train"]).read_text() == (tmp_path / "work" / "inputs" / "tasks" /
                                                                 "trec-train.jsonl").read_text()
    # a changed file is refused, naming it
    (tmp_path / "bundle" / "tasks" / "trec-train.jsonl.xz").write_bytes(b"x")
    with pytest.raises(SystemExit, match=r"tasks/trec-train\.jsonl\.xz"):
        from_bundle(s, tmp_path / "bundle", tmp_path / "work2")
