"""The gpu-window fidelity study's command on CPU (``bench/fidelity/run.py --smoke``): it packs a bundle
(the model in bf16, the corpus and the task split, compressed), unpacks it as the GPU machine would, and
runs every stage of the study on one task with the project's real commands, two at a time. Asserted: a
result for every variant with the sparsity each must have, (b)'s k x B steps, the summary's statements,
and that a second run reuses every finished stage (nothing is trained twice)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain_fixtures import env, make_corpus

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_smoke(tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "fidelity" / "run.py"), "--smoke",
                           "--corpus", str(tmp_path / "corpus.jsonl"), "--runs", str(tmp_path / "runs"),
                           "--results", str(tmp_path / "results")],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)


def test_the_smoke_study_runs_every_stage_from_a_bundle_and_resumes_without_training_again(tmp_path):
    from bench.fidelity.study import SCALES, TASK_VARIANTS
    make_corpus(tmp_path / "corpus.jsonl", documents=80)
    done = run_smoke(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = SCALES["smoke"]
    (task,) = s.tasks
    assert (tmp_path / "runs" / "bundle" / "manifest.json").is_file()
    assert (tmp_path / "runs" / "inputs" / "model" / "model.safetensors").is_file()   # unpacked from the bundle
    results = tmp_path / "results"
    teacher = json.loads((results / "teacher.json").read_text())
    assert 0 < teacher["mlm_accuracy"] < 1
    for name in ("ofa", "no-lrr", "no-kd-pruning"):
        student = json.loads((results / "seed0" / f"student-{name}.json").read_text())
        assert student["exact_per_layer"] and student["encoder_sparsity"] == pytest.approx(0.85, abs=1e-3)
    for variant in TASK_VARIANTS:
        record = json.loads((results / "seed0" / task / f"{variant}.json").read_text())
        assert 0 <= record["accuracy"] <= 1
        if variant == "dense":
            assert record["encoder_sparsity"] == 0
            continue
        assert record["exact_per_layer"], variant        # every pruned layer holds exactly 85% zeros
        if variant.startswith("ft-pruning-"):
            k = int(variant[len("ft-pruning-"):-1])
            assert record["steps"] == k * s.task_steps and len(record["pruning_updates"]) > 1
        else:
            assert record["sparsity_unchanged"] is True   # pattern-lock kept the student's zeros
    summary = (results / "summary.md").read_text()
    assert "(a) vs (b) at equal per-task budget B" in summary and "Tasks from which (a) costs less" in summary
    assert summary.count("(n=") == 0 and "Seeds so far: 0." in summary

    again = run_smoke(tmp_path)
    assert again.returncode == 0, again.stdout[-3000:]
    assert " start " not in again.stdout, again.stdout          # every stage was finished and is reused
