import json
import os
import shutil

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from finetune.report import build_report, format_markdown, write_report
from finetune.report.storage import QuantizedWeight, load_compact, load_state, tensor_bytes, write_compact
from sparse_pretrain.core.masks import find_prunable

SPARSITY = 0.9


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg)


def prune_exactly(model, sparsity):
    """Zero the round(s*n) smallest magnitudes of each pruned Linear by ``w * mask``, as other tools do
    (pruned negative weights become -0.0; the pruner writes +0.0). Returns {name: zeros}."""
    zeros = {}
    with torch.no_grad():
        for name, w in find_prunable(model):
            k = round(sparsity * w.numel())
            order = w.abs().reshape(-1).argsort(stable=True)
            mask = torch.ones(w.numel(), dtype=torch.bool)
            mask[order[:k]] = False
            w.mul_(mask.reshape(w.shape))
            zeros[name] = k
    return zeros


def int8_per_channel(w, zero_point=0):
    """Per-output-channel affine int8 with zeros exactly at the zero point."""
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 100.0
    q = torch.round(w / scale[:, None]).clamp(-100, 100) + zero_point
    return QuantizedWeight(q.to(torch.int8), scale, torch.full((w.shape[0],), zero_point, dtype=torch.int32), 0)


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    model = tiny_classifier()
    zeros = prune_exactly(model, SPARSITY)
    model.save_pretrained(root / "sparse")
    dense = tiny_classifier(seed=1)
    dense.save_pretrained(root / "dense")
    names = [n for n, _ in find_prunable(model)]
    return root, zeros, names


def test_per_layer_and_encoder_sparsity_exact(sparse_dir):
    root, zeros, names = sparse_dir
    report = build_report(root / "sparse")
    assert [row["name"] for row in report["layers"]] == names      # the find_prunable selection, in order
    assert len(names) == 13                                          # 2 x 6 encoder Linears + pooler
    for layer in report["layers"]:
        assert layer["zeros"] == zeros[layer["name"]]
        assert layer["sparsity"] == zeros[layer["name"]] / layer["numel"]
        assert layer["stored_as"] == "float32"
    total = sum(row["numel"] for row in report["layers"])
    assert report["sparsity"]["encoder"] == sum(zeros.values()) / total
    assert "find_prunable on BertForSequenceClassification" in report["selection"]["method"]


def test_nominal_ratios(sparse_dir):
    root, zeros, names = sparse_dir
    report = build_report(root / "sparse")
    enc = report["nominal"]["encoder"]
    nonzeros = enc["parameters"] - sum(zeros.values())
    assert enc["ratio"] == enc["parameters"] / nonzeros                  # 32 n / (32 nnz)
    assert enc["ratio"] == pytest.approx(10.0, rel=0.01)
    assert 1.0 < report["nominal"]["whole_model"]["ratio"] < enc["ratio"]   # embeddings etc. stay dense

    state = load_state(root / "sparse")
    quantized = {name: int8_per_channel(state[name]) for name in names}
    report8 = build_report(root / "sparse", quantized=quantized)
    enc8 = report8["nominal"]["encoder"]
    assert enc8["stored_bits"] == 8 * nonzeros                           # no kept weight rounded to zero
    assert enc8["ratio"] == pytest.approx(40.0, rel=0.01)
    assert enc8["ratio"] == 4 * enc["ratio"]
    assert all(row["stored_as"] == "int8" for row in report8["layers"])

    dense = build_report(root / "dense")
    assert dense["nominal"]["encoder"]["ratio"] == 1.0
    assert dense["sparsity"]["encoder"] == 0.0
    dense_state = load_state(root / "dense")
    all_nonzero = {name: (torch.randint(1, 128, dense_state[name].shape, dtype=torch.int8), 0.01, 0)
                   for name in names}
    assert build_report(root / "dense", quantized=all_nonzero)["nominal"]["encoder"]["ratio"] == 4.0


def test_compact_export_is_measured_smaller_and_round_trips(sparse_dir, tmp_path):
    root, zeros, names = sparse_dir
    compact = tmp_path / "model.compact.safetensors"
    report = build_report(root / "sparse", compact_path=compact)
    real = report["real"]
    original = os.path.getsize(root / "sparse" / "model.safetensors")
    assert real["compact"]["bytes"] == os.path.getsize(compact)
    assert real["original"]["bytes"] == original
    assert real["dense_fp32"]["bytes"] == original                       # the original already is dense fp32
    assert real["compact"]["bytes"] < real["dense_fp32"]["bytes"]
    assert real["ratio_vs_dense_fp32"] == real["dense_fp32"]["bytes"] / real["compact"]["bytes"]
    # encoder alone: the pruned weights' bytes in each file, positions included, < the nominal 10x
    assert 5.0 < real["encoder"]["ratio"] < report["nominal"]["encoder"]["ratio"]
    assert all(row["encoding"] in ("bitmask", "delta") for row in report["layers"])
    print(f"\ndense fp32 {real['dense_fp32']['bytes']} B, compact {real['compact']['bytes']} B (header "
          f"{real['compact']['header_bytes']} B) "
          f"({real['ratio_vs_dense_fp32']:.2f}x); encoder {real['encoder']['dense_fp32_bytes']} -> "
          f"{real['encoder']['compact_bytes']} B ({real['encoder']['ratio']:.2f}x)")

    state = load_state(root / "sparse")
    restored, quantized = load_compact(compact)
    assert quantized == {} and set(restored) == set(state)
    assert any(bool(torch.signbit(state[n][state[n] == 0]).any()) for n in names)   # -0.0 from w * mask
    for name, t in state.items():
        expected = torch.where(t == 0, torch.zeros_like(t), t) if name in names else t   # pruned zeros -> +0.0
        assert restored[name].dtype == t.dtype and restored[name].shape == t.shape
        assert torch.equal(restored[name].view(torch.int32), expected.view(torch.int32)), name


def test_int8_compact_round_trip_with_zero_points(sparse_dir, tmp_path):
    root, zeros, names = sparse_dir
    state = load_state(root / "sparse")
    quantized = {name.removesuffix(".weight"): int8_per_channel(state[name], zero_point=3) for name in names}
    quantized["classifier.weight"] = int8_per_channel(state["classifier.weight"])   # a dense int8 head
    compact = tmp_path / "int8.safetensors"
    report = build_report(root / "sparse", quantized=quantized, compact_path=compact)
    assert report["nominal"]["encoder"]["ratio"] == pytest.approx(40.0, rel=0.01)
    assert [row["sparsity"] for row in report["layers"]] == [zeros[n] / state[n].numel() for n in names]
    restored, q = load_compact(compact)
    assert set(q) == set(names) | {"classifier.weight"}
    assert set(restored) == set(state) - set(q)
    for name, original in quantized.items():
        key = name if name in q else f"{name}.weight"
        assert torch.equal(q[key].data, original.data) and q[key].data.dtype == torch.int8
        assert torch.equal(q[key].scale, original.scale) and torch.equal(q[key].zero_point, original.zero_point)
        assert torch.equal(q[key].dequantize(), original.dequantize())
    fp32 = build_report(root / "sparse")["real"]
    # int8 values are a quarter of fp32 ones; per-channel scales and zero points take some back
    assert report["real"]["encoder"]["compact_bytes"] < fp32["encoder"]["compact_bytes"]
    # (not so the whole file on this tiny model: its safetensors header, with three keys per int8
    # layer, outweighs the saving; on BERT-Base the header is a few tens of KB of ~40 MB)
    print(f"\nint8: compact {report['real']['compact']['bytes']} B (header "
          f"{report['real']['compact']['header_bytes']} B), encoder "
          f"{report['real']['encoder']['compact_bytes']} B ({report['real']['encoder']['ratio']:.2f}x)")


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_torch_quantized_tensors_are_accepted(sparse_dir):
    root, zeros, names = sparse_dir
    state = load_state(root / "sparse")
    w = state[names[0]]
    per_channel = torch.quantize_per_channel(w, w.abs().amax(1).double() / 127, torch.zeros(32, dtype=torch.int64),
                                             0, torch.qint8)
    per_tensor = torch.quantize_per_tensor(state[names[1]], float(state[names[1]].abs().max()) / 127, 0, torch.qint8)
    report = build_report(root / "sparse", quantized={names[0]: per_channel, names[1]: per_tensor})
    assert [row["stored_as"] for row in report["layers"][:3]] == ["int8", "int8", "float32"]
    assert report["layers"][0]["zeros"] >= zeros[names[0]]       # pruned zeros stay zero in int8
    assert any("no int8 version" in note for note in report["notes"])


def test_each_encoding_round_trips(tmp_path):
    torch.manual_seed(0)
    n = 4096
    def sparse(fraction_zero):
        t = torch.randn(64, n // 64)
        t.reshape(-1)[torch.randperm(n)[:round(fraction_zero * n)]] = 0.0
        return t
    state = {"dense": torch.randn(64, 64), "s50": sparse(0.5), "s85": sparse(0.85), "s99": sparse(0.99),
             "empty": torch.zeros(8, 8), "bias": torch.randn(64)}
    state["s99"].reshape(-1)[-1] = 1.5                 # a gap of more than 255 positions: wider indices
    path = tmp_path / "c.safetensors"
    entries = write_compact(state, ["dense", "s50", "s85", "s99", "empty"], path)
    assert {k: entries[k]["encoding"] for k in state} == {
        "dense": "dense", "s50": "bitmask", "s85": "bitmask", "s99": "delta", "empty": "delta", "bias": "dense"}
    restored, _ = load_compact(path)
    for name, t in state.items():
        assert torch.equal(restored[name].view(torch.int32), t.view(torch.int32)), name
    sizes, header = tensor_bytes(path)
    assert sum(sizes.values()) + header == os.path.getsize(path)
    assert sizes["s85::values"] == 4 * int((state["s85"] != 0).sum()) and sizes["s85::bitmask"] == n // 8


def test_markdown_metrics_and_files(sparse_dir, tmp_path):
    root, zeros, names = sparse_dir
    report = build_report(root / "sparse", metrics={"accuracy": 0.85, "f1": 0.8},
                          baseline={"accuracy": 0.87, "f1": 0.8, "mcc": 0.5})
    m = report["metrics"]
    assert m["accuracy"]["delta"] == pytest.approx(-0.02)
    assert m["accuracy"]["relative"] == pytest.approx(-0.02 / 0.87)
    assert m["f1"]["delta"] == 0.0 and m["mcc"]["value"] is None and m["mcc"]["delta"] is None

    md = format_markdown(report)
    assert "| layer | shape | stored as | sparsity | nonzeros | encoding |" in md
    for name in names:
        assert f"| {name} |" in md
    assert "| accuracy | 0.8500 | 0.8700 | -0.0200 |" in md
    assert "the weight matrices of the pruned Linear layers" in md
    assert "Why the model file did not shrink" in md

    json_path, md_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report))
    assert md_path.read_text() == md


def test_selection_by_patterns_without_config(sparse_dir, tmp_path):
    root, zeros, names = sparse_dir
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(root / "sparse" / "model.safetensors", bare / "model.safetensors")
    report = build_report(bare)
    assert sorted(row["name"] for row in report["layers"]) == sorted(names)  # checkpoint order here
    assert report["selection"]["method"].startswith("the 2-D weights of the numbered layers of bert.encoder.layer")
    assert build_report(bare, include=[r".*\.query"])["selection"]["method"].startswith("include")


def test_bad_quantized_input_fails_clearly(sparse_dir):
    root, zeros, names = sparse_dir
    with pytest.raises(KeyError, match="matches no tensor"):
        build_report(root / "sparse", quantized={"nope.weight": (torch.zeros(2, 2, dtype=torch.int8), 1.0, 0)})
    with pytest.raises(TypeError, match="int8"):
        build_report(root / "sparse", quantized={names[0]: (torch.zeros(32, 32), 1.0, 0)})
    with pytest.raises(ValueError, match="shape"):
        build_report(root / "sparse", quantized={names[0]: (torch.zeros(2, 2, dtype=torch.int8), 1.0, 0)})
