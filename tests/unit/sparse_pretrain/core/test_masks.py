"""Applying masks: ``zero_pruned_`` against the reference ``tensor.mul_(keep)``, and what a mask holds."""
import pytest
import torch

from sparse_pretrain.core.masks import MaskedParameters, PrunedParameter, pack_mask, zero_pruned_

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
SPECIALS = (float("nan"), float("inf"), float("-inf"), -0.0, -1.5)


def random_case(kind, dtype, numel=4099, seed=0):
    """A tensor (random signs, with NaN, +-inf and -0.0 at kept and at pruned positions) and a keep-mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g).to(dtype)
    keep = {"all kept": torch.ones(numel, dtype=torch.bool), "all pruned": torch.zeros(numel, dtype=torch.bool),
            "mixed": torch.rand(numel, generator=g) > 0.85}[kind]
    for i, value in enumerate(SPECIALS):
        x[i] = value                     # kept where keep[i] is
        x[-1 - i] = value
    if kind == "mixed":
        keep[:len(SPECIALS)] = True
        keep[-len(SPECIALS):] = False
    return x, keep


def assert_zeroed(out, x, keep):
    """Kept elements: bit for bit as in ``x`` (NaN payloads too) and, NaNs aside, as ``x * keep`` leaves them;
    pruned: +0.0 exactly. Where ``x * keep`` is a number it is the same number (``x * keep`` differs only in
    leaving -0.0 for a pruned negative, and NaN for a pruned NaN or inf)."""
    bits = BITS[x.dtype]
    assert torch.equal(out[keep].view(bits), x[keep].view(bits))
    assert not bool(out[~keep].view(bits).any()), "a pruned element is not +0.0"
    reference = x.clone().mul_(keep)
    kept_numbers = keep & ~x.isnan()            # (x * 1 may change a NaN's payload)
    assert torch.equal(out[kept_numbers].view(bits), reference[kept_numbers].view(bits))
    numbers = ~reference.isnan()
    assert torch.equal(out[numbers], reference[numbers])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["all kept", "all pruned", "mixed"])
def test_zero_pruned_is_the_reference_multiply_with_exact_zeros(kind, dtype):
    x, keep = random_case(kind, dtype)
    out = x.clone()
    zero_pruned_([out], [keep])
    assert_zeroed(out, x, keep)
    assert keep.dtype == torch.bool                 # the mask itself is read, not changed
    # several tensors of mixed dtypes in one call (ZeRO-3: an fp32 master and its bf16 working copy)
    y, keep_y = random_case("mixed", torch.bfloat16, numel=777, seed=1)
    out, out_y = x.clone(), y.clone()
    zero_pruned_([out, out_y], [keep, keep_y])
    assert_zeroed(out, x, keep)
    assert_zeroed(out_y, y, keep_y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_parameters_zero_weights_and_gradients_like_the_reference(dtype):
    shapes = [(24, 16), (7, 13), (5,)]
    weights, grads, params, keeps = [], [], [], []
    for i, shape in enumerate(shapes):
        numel = torch.Size(shape).numel()
        w, keep = random_case(("mixed", "all kept", "all pruned")[i], dtype, numel=numel, seed=i)
        g, _ = random_case("all kept", dtype, numel=numel, seed=10 + i)
        param = torch.nn.Parameter(w.view(shape).clone())
        param.grad = g.view(shape).clone()
        weights.append(w)
        grads.append(g)
        keeps.append(keep)
        params.append(PrunedParameter.whole(f"w{i}", param))
    masked = MaskedParameters(params)
    for p, keep in zip(params, keeps):
        masked.masks[p.name] = keep.clone()
    masked._masks_changed()
    masked.mask_gradients()
    masked.apply_masks()
    for p, w, g, keep in zip(params, weights, grads, keeps):
        assert_zeroed(p.views()[0], w, keep)
        assert_zeroed(p.grad(), g, keep)


def test_masks_hold_one_byte_per_weight_element_and_save_bit_packed():
    params = [PrunedParameter.whole(f"w{i}", torch.nn.Parameter(torch.randn(shape)))
              for i, shape in enumerate([(32, 16), (9, 7)])]
    masked = MaskedParameters(params)
    masked.masks["w0"] = torch.rand(32 * 16) > 0.5
    masked._masks_changed()
    masked.apply_masks()
    masked.mask_gradients()
    numel = sum(p.numel for p in params)
    assert all(m.dtype == torch.bool for m in masked.masks.values())
    assert sum(m.numel() * m.element_size() for m in masked.masks.values()) == numel
    saved = masked.state_dict()["masks"]
    assert torch.equal(saved["w0"]["bits"], pack_mask(masked.masks["w0"]))
    assert sum(entry["bits"].numel() for entry in saved.values()) == sum((p.numel + 7) // 8 for p in params)
