"""bench/gpu/: the device check's time budget, its result file and table (fast), and the whole check at
toy size on CPU (``check.py --smoke``, in a subprocess: it starts a process group), whose JSON must hold
a real number for every measurement, so that the one device run is not spent finding a broken path."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "bench" / "gpu"
PRIORITY = ["1_dense", "2_kd", "3_mask_upkeep", "4_zero3", "5_finetune", "7_large", "6_compile"]


def load_harness():
    spec = importlib.util.spec_from_file_location("gpu_harness", GPU / "harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


harness = load_harness()


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plan_skips_what_no_longer_fits_records_errors_and_writes_after_each(tmp_path):
    clock = FakeClock()
    path = tmp_path / "gpu_check.json"
    results = harness.ResultFile(path, {"device": "test"})
    seen_on_disk = {}

    def slow():                       # takes 6 of the 10 s
        clock.now += 6
        return [{"model": "m", "step_ms": 1.0}]

    def fails():
        raise RuntimeError("no kernel image")

    def small():                      # runs after a skipped one: the file already holds the earlier entries
        seen_on_disk.update(json.loads(path.read_text())["measurements"])
        return [{"model": "m", "step_ms": 2.0}]

    plan = [harness.Measurement("a", "slow", 5, slow), harness.Measurement("b", "too big", 5, list),
            harness.Measurement("c", "fails", 1, fails), harness.Measurement("d", "small", 2, small)]
    harness.run_plan(plan, harness.Budget(10, clock), results, say=lambda line: None)

    written = json.loads(path.read_text())["measurements"]
    assert [written[k]["status"] for k in "abcd"] == ["ok", "skipped", "error", "ok"]
    assert written["a"]["seconds"] == 6 and written["a"]["cpu_s"] >= 0
    assert written["a"]["rows"] == [{"model": "m", "step_ms": 1.0}]
    assert "needs ~5 s, 4 s of the budget left" in written["b"]["reason"]
    assert written["c"]["error"] == "RuntimeError: no kernel image"
    assert set(seen_on_disk) == {"a", "b", "c"}


def test_a_measurement_running_past_budget_and_grace_is_stopped_and_recorded(tmp_path):
    results = harness.ResultFile(tmp_path / "r.json", {})
    start = time.monotonic()
    harness.run_plan([harness.Measurement("hang", "hangs", 0.1, lambda: time.sleep(30)),
                      harness.Measurement("next", "after", 0.0, list)],
                     harness.Budget(0.2), results, grace_s=0.2, say=lambda line: None)
    assert time.monotonic() - start < 5
    hang = results.data["measurements"]["hang"]
    assert hang["status"] == "error" and hang["error"].startswith("OverBudget")
    assert results.data["measurements"]["next"]["status"] == "skipped"     # the budget is spent


def test_table_has_the_header_a_row_per_result_and_why_a_measurement_has_none():
    data = {"device": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "date": "2026-12-01", "mode": "full",
            "measurements": {
                "1_dense": {"status": "ok", "rows": [
                    {"model": "bert-base", "variant": "dense", "tokens_per_s": 412345.6, "step_ms": 39.73,
                     "mfu": 0.3012, "peak_gib": 21.456, "ratio": 1.2345, "note": "vs all rows"},
                    {"model": "bert-base", "variant": "upkeep", "step_ms": 0.5, "ratio": None}]},
                "6_compile": {"status": "skipped", "reason": "needs ~180 s, 20 s of the budget left"},
                "7_large": {"status": "error", "error": "OutOfMemoryError: CUDA out of memory"}}}
    lines = harness.render_table(data).splitlines()
    assert lines[0] == "# GPU check: NVIDIA H200, torch 2.11.0, CUDA 13.0, 2026-12-01 (full)"
    assert lines[2] == "| measurement | model | variant | tokens/s | step (ms) | MFU | peak GiB | ratio | note |"
    assert lines[4] == "| 1_dense | bert-base | dense | 412,346 | 39.7 | 30.1% | 21.46 | 1.234 | vs all rows |"
    assert lines[5] == "| 1_dense | bert-base | upkeep |  | 0.5 |  |  |  |  |"
    assert lines[6].startswith("| 6_compile |")
    assert lines[6].endswith("skipped: needs ~180 s, 20 s of the budget left |")
    assert "error: OutOfMemoryError: CUDA out of memory" in lines[7]
    assert all(line.count("|") == 10 for line in lines[2:])


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_smoke_run_measures_every_path_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(GPU / "check.py"), "--smoke", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["mode"] == "smoke" and data["date"] and data["torch"]
    measurements = data["measurements"]
    assert list(measurements) == PRIORITY                          # all of them, in priority order
    for key, entry in measurements.items():
        assert entry["status"] == "ok", (key, entry.get("error"), entry.get("traceback"))
        for row in entry["rows"]:
            assert positive(row["step_ms"]) and positive(row["peak_gib"]), (key, row)
            numbers = {k: v for k, v in row.items() if k in ("tokens_per_s", "mfu", "ratio") and v is not None}
            assert all(positive(v) for v in numbers.values()), (key, row)
            if key != "5_finetune" and "upkeep" not in row["variant"]:   # pre-training steps: throughput and MFU
                assert positive(row["tokens_per_s"]) and positive(row["mfu"]), (key, row)
    rows = {(key, row["variant"]): row for key, entry in measurements.items() for row in entry["rows"]}
    # every comparison the check exists for has its ratio
    for key, variant in [("1_dense", "dense, vocab rows needed"), ("3_mask_upkeep", "masked, no KD"),
                         ("3_mask_upkeep", "upkeep alone (the step hooks)"), ("4_zero3", "dense, ZeRO-3"),
                         ("5_finetune", "bf16"), ("7_large", "student+KD all, rows needed")]:
        assert positive(rows[key, variant]["ratio"]), (key, variant)
    assert all(positive(row["ratio"]) for row in measurements["2_kd"]["rows"])
    assert positive(measurements["6_compile"]["rows"][0]["compile_s"])
    # the student's masks are really at 90%, and "needed" projects fewer vocabulary rows than "all"
    assert all(abs(row["sparsity"] - 0.9) < 0.01 for row in measurements["2_kd"]["rows"])
    assert rows["2_kd", "student+KD all, rows all"]["projected_fraction"] == 1.0
    assert rows["2_kd", "student+KD masked, rows needed"]["projected_fraction"] < 0.5
    assert rows["1_dense", "dense, vocab rows needed"]["projected_fraction"] < 0.5
    table = out.with_suffix(".md").read_text()
    assert all(f"| {key} |" in table for key in PRIORITY) and table in proc.stdout
