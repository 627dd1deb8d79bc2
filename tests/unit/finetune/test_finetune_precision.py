"""training.precision of fine-tuning and QAT: validated with the recipe, resolved before anything
loads, handed to Accelerate over what ``accelerate launch`` says, and the forward, the teacher and
the evaluation all computed in it."""
import json
from pathlib import Path

import pytest
import torch

from finetune.recipe import load_finetune_recipe
from finetune.trainer import make_accelerator, run, run_precision
from sparse_pretrain.runtime.schema import ConfigError

KD = ["distillation.teacher=runs/no-teacher", "distillation.lambda_task=1"]


@pytest.fixture
def fresh_accelerate():
    """Accelerate's process-wide state, reset before and after (an Accelerator is a singleton per process)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_the_key_is_validated_with_the_recipe():
    assert load_finetune_recipe(None, KD).training.precision == "auto"
    with pytest.raises(ConfigError, match=r"^training\.precision: must be one of auto, bf16, fp16, fp32, got 'tf32'$"):
        load_finetune_recipe(None, KD + ["training.precision=tf32"])
    for precision in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=rf"^training\.precision: QAT \(qat\.enabled\) runs in fp32, got "
                                              rf"{precision}: .* int8 grid"):
            load_finetune_recipe(None, KD + ["qat.enabled=true", f"training.precision={precision}"])
    for precision in ("auto", "fp32"):
        load_finetune_recipe(None, KD + ["qat.enabled=true", f"training.precision={precision}"])


def test_qat_runs_fp32_even_where_auto_is_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert run_precision(load_finetune_recipe(None, KD), "cuda") == "bf16"
    assert run_precision(load_finetune_recipe(None, KD + ["qat.enabled=true"]), "cuda") == "fp32"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match=r"^training\.precision: fp16 under Accelerate's DeepSpeed plugin"):
        run_precision(load_finetune_recipe(None, KD + ["training.precision=fp16"]), "cuda")


def test_the_run_identity_holds_the_resolved_precision(tmp_path):
    from finetune.trainer import finetune_identity
    data = tmp_path / "train.jsonl"
    data.write_text('{"sentence": "a", "label": 0}\n')
    keys = KD + [f"task.data_files.train={data}", f"task.data_files.validation={data}"]
    auto, fp32 = (load_finetune_recipe(None, keys + [f"training.precision={p}"]) for p in ("auto", "fp32"))
    on_cpu = finetune_identity(auto, "fp32")
    assert finetune_identity(fp32, "fp32") == on_cpu                # auto on a CPU is fp32: the same run
    assert "training.precision" not in on_cpu          # an fp32 run is the run it was before the key existed
    on_gpu = finetune_identity(auto, "bf16")
    assert on_gpu["training.precision"] == "bf16"
    assert {k: v for k, v in on_gpu.items() if k != "training.precision"} == on_cpu


def test_fp16_on_cpu_fails_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    recipe = load_finetune_recipe(None, KD + [f"model.name_or_path={tmp_path / 'no-model'}", "training.precision=fp16",
                                              f"training.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"^training\.precision: fp16 needs a CUDA GPU .* runs on cpu"):
        run(recipe)               # the model does not exist: loading anything would fail otherwise
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("precision, expected", [("bf16", "bf16"), ("fp32", "no")])
def test_the_recipe_not_accelerate_launch_decides(fresh_accelerate, monkeypatch, precision, expected):
    # what `accelerate launch --mixed_precision=fp16` (or its config file) leaves each process
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert make_accelerator(0, precision=precision).mixed_precision == expected


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "sentence", "number", *map(str, range(10))]


def tiny_classifier(out: Path, seed: int) -> Path:
    """One layer of width 32 and a 17-word vocabulary (a large vocabulary makes datasets' fingerprint of
    the tokenizer, pickled at every map, the slowest part of the run)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer
    torch.manual_seed(seed)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2)).save_pretrained(out)
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(out)
    return out


def test_bf16_on_cpu_trains_distils_and_evaluates_in_bf16(tmp_path, fresh_accelerate, monkeypatch):
    student, teacher = tiny_classifier(tmp_path / "student", 0), tiny_classifier(tmp_path / "teacher", 1)
    files = {}
    for split, n in (("train", 8), ("validation", 4)):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"text": f"sentence number {i}", "label": i % 2}) + "\n"
                                        for i in range(n)))
    recipe = load_finetune_recipe(None, [
        "task.name=tiny", f"task.data_files.train={files['train']}",
        f"task.data_files.validation={files['validation']}", "task.text_columns=[text]", "task.num_labels=2",
        "task.max_seq_length=16", f"model.name_or_path={student}", "model.pattern_lock=false",
        f"distillation.teacher={teacher}", "training.max_steps=1", "training.batch_size=4", "training.precision=bf16",
        f"training.output_dir={tmp_path / 'run'}"])
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    seen = set()     # (phase, dtype of a Linear's output)

    def linear_outputs(module, args, output):
        if isinstance(module, torch.nn.Linear):
            phase = ("train" if module.training else "teacher" if torch.is_inference_mode_enabled() else "eval")
            seen.add((phase, output.dtype))
    hook = torch.nn.modules.module.register_module_forward_hook(linear_outputs)
    try:
        summary = run(recipe)
    finally:
        hook.remove()
    assert seen == {("train", torch.bfloat16), ("teacher", torch.bfloat16), ("eval", torch.bfloat16)}
    from accelerate.state import AcceleratorState
    assert AcceleratorState().mixed_precision == "bf16" and summary["precision"] == "bf16"
    assert summary["steps"] == 1 and "accuracy" in summary["metrics"]["validation"]
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["dtype"] == "float32"                     # mixed precision: the weights stay fp32
