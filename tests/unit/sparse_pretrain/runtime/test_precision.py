"""Choosing a precision: what each request resolves to on each kind of device, the errors that name
the key, the TF32 policy, and autocast."""
import pytest
import torch

from sparse_pretrain.runtime.precision import autocast, enable_tf32, resolve_precision
from sparse_pretrain.runtime.schema import ConfigError

# a GPU with native bf16 (Ampere and later), one that only emulates it (Volta), one without it
GPUS = {"ampere": (True, True), "volta": (False, True), "none": (False, False)}


def fake_gpu(monkeypatch, kind):
    native, emulated = GPUS[kind]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or (including_emulation and emulated))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: f"a {kind} GPU")


@pytest.mark.parametrize("gpu, requested, expected", [
    ("ampere", "auto", "bf16"), ("ampere", "bf16", "bf16"), ("ampere", "fp16", "fp16"), ("ampere", "fp32", "fp32"),
    ("volta", "auto", "fp32"),      # emulated bf16 is slow, and auto never picks fp16
    ("volta", "bf16", "bf16"), ("volta", "fp16", "fp16"), ("none", "auto", "fp32")])
def test_on_a_gpu_auto_is_bf16_only_where_it_is_native(monkeypatch, gpu, requested, expected):
    fake_gpu(monkeypatch, gpu)
    assert resolve_precision(requested, "cuda") == expected
    assert resolve_precision(requested, torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("requested, expected", [("auto", "fp32"), ("bf16", "bf16"), ("fp32", "fp32")])
def test_on_cpu_auto_is_fp32_and_bf16_is_allowed(monkeypatch, requested, expected):
    fake_gpu(monkeypatch, "ampere")          # a GPU in the machine does not matter to a CPU process
    assert resolve_precision(requested, "cpu") == expected


def test_impossible_requests_fail_naming_the_key(monkeypatch):
    with pytest.raises(ConfigError, match=r"^training\.precision: fp16 needs a CUDA GPU .* runs on cpu; use bf16"):
        resolve_precision("fp16", "cpu", error=ConfigError)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^training\.precision: fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cuda")                 # asked for cuda, but torch sees none
    assert resolve_precision("auto", "cuda") == "fp32"
    fake_gpu(monkeypatch, "none")
    with pytest.raises(ValueError, match=r"^stage\.precision: bf16: this GPU \(a none GPU\) cannot compute"):
        resolve_precision("bf16", "cuda", key="stage.precision")
    with pytest.raises(ConfigError, match=r"^training\.precision: must be one of auto, bf16, fp16, fp32, got 'fp8'"):
        resolve_precision("fp8", "cpu", error=ConfigError)


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_on_under_mixed_precision_and_off_for_fp32(tf32_flags):
    for precision, on in (("bf16", True), ("fp32", False), ("fp16", True), ("fp32", False)):
        assert enable_tf32(precision) is on
        assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on
        # every reader of the flags still works (the per-backend fp32_precision setters break the old ones)
        assert torch.get_float32_matmul_precision() == ("high" if on else "highest")
        assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if on else "ieee")
    assert torch.backends.mkldnn.matmul.fp32_precision != "tf32"    # CPU matmuls untouched
    with pytest.raises(ValueError, match="resolved precision"):
        enable_tf32("auto")


def test_autocast_computes_in_the_precision_and_not_at_all_for_fp32():
    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("bf16", "cpu"):
        assert linear(x).dtype == torch.bfloat16
    with autocast("fp32", torch.device("cpu")):
        assert linear(x).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="resolved precision"):
        autocast("auto", "cpu")
