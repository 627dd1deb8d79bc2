"""8-bit quantization-aware training of a (sparse) BERT encoder, Q8BERT style (Prune OFA, Appendix D).

Every Linear of the encoder and the pooler (the layers the sparsity core prunes,
:func:`sparse_pretrain.core.masks.find_prunable`) computes ``y = W_q x_q + b`` with

- ``W_q``: int8 weights, symmetric (``[-127, 127]``, zero point 0, scale ``max|W| / 127``), per tensor
  or per output channel, the scale following the current weights at every forward;
- ``x_q``: uint8 inputs, asymmetric, the range ``[min, max]`` an exponential moving average of each
  training batch's (decay ``ema_decay``, Q8BERT's 0.9999 by default), frozen in eval;
- the product accumulated in int32 and returned in fp32 (no requantization of the output).

Embeddings, LayerNorm, GELU, softmax, the attention matmuls (``QK^T``, ``PV``: functional
``torch.matmul`` calls inside Hugging Face's attention, which eager-mode quantization cannot reach
without editing the model code) and the task/MLM heads stay float: only the GEMMs of the Linears are
quantized, as in Q8BERT.

Built on ``torch.ao.quantization``: ``FakeQuantize`` with moving-average min/max observers (straight-
through gradients), modules swapped by ``torch.ao.quantization.convert`` with a module mapping (the
swap ``prepare_qat`` does), and at conversion fbgemm's int8 GEMM
(``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``: quantizes fp32 input with the stored
scale/zero point, u8 x s8 -> s32, fp32 output) behind the packed weights of
``torch.ao.nn.quantized.Linear``. Two deliberate differences from torch.ao's eager QAT recipe:

- ``prepare_qat``'s second half (``prepare``) hangs an output observer on every QAT module, and the
  static ``nnq.Linear`` requantizes its output to uint8 and needs QuantStub/DeQuantStub around each
  Linear. Q8BERT quantizes GEMM inputs and weights only, so the input fake-quant lives in the QAT
  module itself and the converted module returns fp32.
- A ``FakeQuantize`` observes whenever its observer flag is on, in eval too; here input ranges move
  only in train mode (``TrainOnlyFakeQuantize``), so evaluation never changes the model.

Pattern lock: symmetric quantization maps 0 to 0, so pruned weights are zero in the fake-quantized and
the int8 weights as long as they are zero in the float weights (``PatternLock.mask_gradients()``
before, ``apply_masks()`` after each optimizer step). ``prepare_qat`` keeps the Parameter objects, so
a ``PatternLock`` built before or after it is the same.

Activation range and the CPU (measured on this project's AMD EPYC, AVX2 without VNNI): fbgemm's AVX2
kernel multiplies u8 x s8 pairs into a saturating int16 (``vpmaddubsw``); with full-range uint8
inputs (0..255) a random 64x256 layer gave errors of 4.4 on outputs of magnitude 87 against the
fake-quantized reference, with 0..127 inputs 2e-5. So ``reduce_range=True`` (7-bit input range, as
torch.ao's own x86/fbgemm qconfigs) is the default: the int8 model then matches QAT on every x86 CPU.
Use ``reduce_range=False`` (full 8 bits, Q8BERT exactly) only when the model will run on VNNI
(AVX512-VNNI / AVX-VNNI) CPUs.

Precision: QAT runs in IEEE fp32 (``training.precision`` auto or fp32; bf16/fp16 are refused, and
TF32 is off). torch's ``fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` do run on bf16 and
fp16 tensors under autocast (only the fused observer op, which this module does not use, rejects
them), but the GEMM then reads 16-bit operands: an int8 value times its fp32 scale rounded to
bf16's 8-bit significand. Measured on a 256x256 QATLinear: fake-quantized weights up to 0.24 of a
quantization step off the int8 grid; outputs 7e-3 away from the converted Int8Linear's under bf16
autocast (2.6e-2 with bf16 inputs, as inside a bf16 model), against 6e-7 in fp32, on outputs of
magnitude 2.4. Trained that way, the exported int8 model would not be the model QAT trained.

Export format (:func:`save_quantized`), a directory written atomically:

- ``config.json``: the float architecture (Hugging Face config, ``architectures`` names the class);
- ``quantization.json``: ``{"format": "prune-ofa-int8", "version": 1, "model_class", "layers"
  (names of the int8 Linears), "per_channel", "reduce_range", "ema_decay", "torch"}``;
- ``int8_state_dict.pt``: ``torch.save`` of the converted model's ``state_dict()``: float tensors for
  everything not quantized; per int8 Linear ``<name>._packed_params._packed_params`` = (qint8 weight
  with its scale(s) and zero point(s), fp32 bias), ``<name>.input_scale``, ``<name>.input_zero_point``,
  ``<name>.input_quant_max`` (127, or 255 without ``reduce_range``).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn import qat as nnqat
from torch.ao.nn.quantized.modules.linear import LinearPackedParams
from torch.ao.nn.quantized.modules.utils import _hide_packed_params_repr
from torch.ao.quantization import (
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
)
from torch.ao.quantization import convert as _ao_convert

from sparse_pretrain.core.masks import DEFAULT_INCLUDE, find_prunable
from sparse_pretrain.runtime.atomic import replacing_dir

FORMAT = "prune-ofa-int8"
FORMAT_VERSION = 1
STATE_FILE = "int8_state_dict.pt"
META_FILE = "quantization.json"

#: Symmetric int8 weights: [-127, 127] (not -128), so that +max and -max both map exactly.
WEIGHT_QMIN, WEIGHT_QMAX = -127, 127


class TrainOnlyFakeQuantize(FakeQuantize):
    """A ``FakeQuantize`` whose observer updates only in train mode: the moving-average range is
    learned during training and frozen in eval (torch's ``FakeQuantize`` would keep observing)."""

    def forward(self, X):
        if self.training or not self.fake_quant_enabled[0]:
            return super().forward(X)
        if not self.is_initialized():
            raise RuntimeError("fake-quantized input range was never observed: run at least one "
                               "training forward before evaluating or converting")
        return torch.fake_quantize_per_tensor_affine(X, self.scale, self.zero_point,
                                                     self.quant_min, self.quant_max)

    def is_initialized(self) -> bool:
        return bool(torch.isfinite(self.activation_post_process.min_val).all())


def q8bert_qconfig(per_channel: bool = False, reduce_range: bool = True,
                   ema_decay: float = 0.9999) -> QConfig:
    """Inputs: uint8 asymmetric, EMA of min/max (``averaging_constant = 1 - ema_decay``), 0..127 with
    ``reduce_range``. Weights: int8 symmetric in [-127, 127], qparams from the current weights
    (``averaging_constant = 1``), per tensor or per output channel."""
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    activation = TrainOnlyFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, averaging_constant=1.0 - ema_decay,
        quant_min=0, quant_max=127 if reduce_range else 255,   # (the observers' own reduce_range
        dtype=torch.quint8, qscheme=torch.per_tensor_affine)    # flag is deprecated for quant_max)
    if per_channel:
        weight = FakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0, ch_axis=0,
            quant_min=WEIGHT_QMIN, quant_max=WEIGHT_QMAX, dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric)
    else:
        weight = FakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, averaging_constant=1.0,
            quant_min=WEIGHT_QMIN, quant_max=WEIGHT_QMAX, dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric)
    return QConfig(activation=activation, weight=weight)


class QATLinear(nnqat.Linear):
    """``nn.Linear`` with fake-quantized int8 weights (``weight_fake_quant``, from torch.ao's QAT
    Linear) and fake-quantized uint8 inputs (``input_fake_quant``); output fp32."""

    _FLOAT_MODULE = nn.Linear

    def __init__(self, in_features, out_features, bias=True, qconfig=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, qconfig, device, dtype)
        self.input_fake_quant = qconfig.activation()

    def forward(self, x):
        return F.linear(self.input_fake_quant(x), self.weight_fake_quant(self.weight), self.bias)

    @torch.no_grad()
    def fake_quantized_weight(self) -> torch.Tensor:
        return self.weight_fake_quant(self.weight)


class Int8Linear(nn.Module):
    """Static int8 Linear: int8 weights (packed for fbgemm, with their scale(s) and zero point(s)),
    the input quantized to uint8 with the range learned in QAT, int32 accumulation, fp32 output."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._packed_params = LinearPackedParams(dtype=torch.qint8)
        self.register_buffer("input_scale", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("input_quant_max", torch.tensor(255, dtype=torch.int64))

    def forward(self, x):
        scale, zero_point = float(self.input_scale), int(self.input_zero_point)
        # The kernel rounds the input into 0..255 whatever range QAT used: with the 7-bit range
        # (reduce_range) inputs above the learned max would land in 128..255, unlike in QAT (which
        # clamps at 127) and into the AVX2 int16 saturation. Measured on MiniLM-L6 after 2 QAT steps:
        # up to 9.6 off on one layer's outputs without this clamp, 4e-6 with it.
        x = x.float().clamp((0 - zero_point) * scale, (int(self.input_quant_max) - zero_point) * scale)
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x.contiguous(), scale, zero_point, self._packed_params._packed_params)

    def weight(self) -> torch.Tensor:
        """The quantized (qint8) weight tensor."""
        return self._packed_params._weight_bias()[0]

    def bias(self) -> Optional[torch.Tensor]:
        return self._packed_params._weight_bias()[1]

    def _load_from_state_dict(self, *args, **kwargs):
        with x86_engine():   # the packed weights are re-packed for the engine current at load
            super()._load_from_state_dict(*args, **kwargs)

    @classmethod
    @torch.no_grad()
    def from_float(cls, mod: QATLinear, use_precomputed_fake_quant: bool = False) -> "Int8Linear":
        """From a trained :class:`QATLinear` (called by ``torch.ao.quantization.convert``)."""
        if not isinstance(mod, QATLinear):
            raise TypeError(f"Int8Linear.from_float expects a QATLinear, got {type(mod).__name__}")
        in_fq, w_fq = mod.input_fake_quant, mod.weight_fake_quant
        if not in_fq.is_initialized():
            raise RuntimeError("input range was never observed: train (or calibrate in train mode) "
                               "before converting")
        if not use_precomputed_fake_quant:
            w_fq.activation_post_process(mod.weight)     # qparams of the final weights
        w_scale, w_zp = w_fq.activation_post_process.calculate_qparams()
        weight = mod.weight.detach().float()
        if w_fq.is_per_channel:
            qweight = torch.quantize_per_channel(weight, w_scale.double(), w_zp.long(), 0, torch.qint8)
        else:
            qweight = torch.quantize_per_tensor(weight, float(w_scale), int(w_zp), torch.qint8)
        new = cls(mod.in_features, mod.out_features)
        bias = None if mod.bias is None else mod.bias.detach().float()
        with x86_engine():
            new._packed_params.set_weight_bias(qweight, bias)
        new.input_scale.fill_(float(in_fq.scale))
        new.input_zero_point.fill_(int(in_fq.zero_point))
        new.input_quant_max.fill_(int(in_fq.quant_max))
        return new

    def __repr__(self):
        return _hide_packed_params_repr(self, LinearPackedParams)

    def extra_repr(self):
        qweight = self.weight()
        scheme = "per_channel" if qweight.qscheme() in (torch.per_channel_symmetric,
                                                        torch.per_channel_affine) else "per_tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight=qint8 "
                f"{scheme}, input_scale={float(self.input_scale):.4g}, "
                f"input_zero_point={int(self.input_zero_point)}")


@contextmanager
def x86_engine() -> Iterator[str]:
    """Pack weights for fbgemm (the ``x86`` engine packs Linears with fbgemm): the fp32-output
    int8 GEMM has no oneDNN or QNNPACK implementation."""
    engines = torch.backends.quantized.supported_engines
    engine = next((e for e in ("x86", "fbgemm") if e in engines), None)
    if engine is None:
        raise RuntimeError(f"int8 Linear needs the x86/fbgemm quantized engine; this build has {engines}")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield engine
    finally:
        torch.backends.quantized.engine = previous


def quantizable_linears(model: nn.Module, include: Optional[Sequence[str]] = DEFAULT_INCLUDE,
                        exclude: Sequence[str] = ()) -> list[str]:
    """Names of the Linear modules to quantize: the pruning selection (every encoder Linear and the
    pooler by default)."""
    return [name[:-len(".weight")] for name, _ in find_prunable(model, ("Linear",), include, exclude)]


def prepare_qat(model: nn.Module, include: Optional[Sequence[str]] = DEFAULT_INCLUDE, exclude: Sequence[str] = (),
                per_channel: bool = False, reduce_range: bool = True,
                ema_decay: float = 0.9999) -> nn.Module:
    """Swap the selected Linears for :class:`QATLinear`, in place (the weights stay the same
    Parameter objects); returns the model, in train mode. Everything else stays float."""
    names = quantizable_linears(model, include, exclude)
    modules = dict(model.named_modules())
    wrong = [n for n in names if type(modules[n]) is not nn.Linear]
    if wrong:
        raise TypeError(f"prepare_qat: not plain nn.Linear (already prepared?): {wrong[:3]}")
    qconfig = q8bert_qconfig(per_channel, reduce_range, ema_decay)
    for name in names:
        modules[name].qconfig = qconfig
    # QATLinear keeps its qconfig (convert_to_int8 swaps the modules that carry one); no other module
    # was given one, so nothing else is touched.
    _ao_convert(model, mapping={nn.Linear: QATLinear}, inplace=True, remove_qconfig=False)
    model.train()
    model._q8bert_settings = {"layers": names, "per_channel": per_channel,
                              "reduce_range": reduce_range, "ema_decay": ema_decay}
    return model


def qat_modules(model: nn.Module) -> dict[str, QATLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QATLinear)}


def int8_modules(model: nn.Module) -> dict[str, Int8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def convert_to_int8(qat_model: nn.Module, inplace: bool = False) -> nn.Module:
    """The QAT model with each :class:`QATLinear` replaced by an :class:`Int8Linear` (real int8
    weights, static input range), in eval mode, on CPU."""
    import copy
    if not qat_modules(qat_model):
        raise ValueError("convert_to_int8: the model has no QATLinear (call prepare_qat first)")
    model = qat_model if inplace else copy.deepcopy(qat_model)
    model.cpu().eval()
    _ao_convert(model, mapping={QATLinear: Int8Linear}, inplace=True, remove_qconfig=True)
    return model


def quantized_layer_report(model: nn.Module) -> dict[str, dict]:
    """Per quantized layer: weight dtype, scheme, int8 values and how many are nonzero, the input
    range. Works on a converted model (the stored int8 weights) and on a QAT model (the int8 values
    its fake quantization represents)."""
    report = {}
    for name, m in int8_modules(model).items():
        qweight = m.weight()
        ints = qweight.int_repr()
        report[name] = {"weight_dtype": str(qweight.dtype).replace("torch.", ""),
                        "per_channel": qweight.qscheme() in (torch.per_channel_symmetric,
                                                             torch.per_channel_affine),
                        "numel": ints.numel(), "nonzero": int((ints != 0).sum()),
                        "input_scale": float(m.input_scale), "input_zero_point": int(m.input_zero_point),
                        "input_quant_max": int(m.input_quant_max)}
    for name, m in qat_modules(model).items():
        fq = m.weight_fake_quant
        with torch.no_grad():
            fq.activation_post_process(m.weight)
            scale, zp = fq.activation_post_process.calculate_qparams()
            if fq.is_per_channel:
                scale, zp = scale.reshape(-1, 1), zp.reshape(-1, 1)
            ints = torch.clamp(torch.round(m.weight / scale) + zp, fq.quant_min, fq.quant_max)
        report[name] = {"weight_dtype": "qint8 (fake-quantized)", "per_channel": bool(fq.is_per_channel),
                        "numel": ints.numel(), "nonzero": int((ints != 0).sum()),
                        "input_scale": float(m.input_fake_quant.scale),
                        "input_zero_point": int(m.input_fake_quant.zero_point),
                        "input_quant_max": int(m.input_fake_quant.quant_max)}
    return report


def save_quantized(model: nn.Module, out_dir: Union[str, Path], tokenizer=None) -> Path:
    """Write a converted model (see the module docstring for the format); a new directory replaces
    an old one only once complete."""
    layers = list(int8_modules(model))
    if not layers:
        raise ValueError("save_quantized: the model has no Int8Linear (call convert_to_int8 first)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError("save_quantized needs a Hugging Face model (model.config)")
    settings = getattr(model, "_q8bert_settings", {})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "model_class": type(model).__name__,
            "layers": layers, "per_channel": settings.get("per_channel"),
            "reduce_range": settings.get("reduce_range"), "ema_decay": settings.get("ema_decay"),
            "torch": torch.__version__}
    out_dir = Path(out_dir)
    with replacing_dir(out_dir) as tmp:
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        torch.save(model.state_dict(), tmp / STATE_FILE)
        if tokenizer is not None:        # inside the same atomic directory: complete or absent
            tokenizer.save_pretrained(tmp)
    return out_dir


def load_quantized(model_dir: Union[str, Path], base_model_config_or_dir=None) -> nn.Module:
    """Rebuild a model written by :func:`save_quantized`: the float architecture from its
    ``config.json`` (or ``base_model_config_or_dir``: a config object or a Hugging Face directory),
    the saved Linears swapped for :class:`Int8Linear`, then the saved state dict loaded (strict).
    Returns it in eval mode on CPU."""
    import transformers
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{model_dir}: not a {FORMAT} v{FORMAT_VERSION} export ({meta.get('format')}, "
                         f"v{meta.get('version')})")
    if base_model_config_or_dir is None:
        base_model_config_or_dir = model_dir
    if isinstance(base_model_config_or_dir, (str, Path)):
        config = transformers.AutoConfig.from_pretrained(base_model_config_or_dir)
    else:
        config = base_model_config_or_dir
    model_class = getattr(transformers, meta["model_class"])
    model = model_class(config)
    modules = dict(model.named_modules())
    for name in meta["layers"]:
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{model_dir}: layer {name} is not a Linear of {meta['model_class']}")
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, Int8Linear(linear.in_features, linear.out_features))
    state = torch.load(model_dir / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model._q8bert_settings = {k: meta[k] for k in ("layers", "per_channel", "reduce_range", "ema_decay")}
    return model.eval()
