import pytest
import torch

from sparse_pretrain.core.methods import (
    PRUNING_METHODS,
    BlockMagnitude,
    NMMagnitude,
    build_method,
    is_valid_block_pattern,
    is_valid_nm,
)
from sparse_pretrain.core.threshold import ScoreShard, keep_masks, pruned_count


def element_keep(method, weight, sparsity):
    unit_keep = keep_masks([[ScoreShard(method.scores(weight))]], sparsity)[0][0]
    return method.expand(unit_keep, weight.shape)


def weight_with_ties(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < 0.3] = 0.5          # ties in |w| (and sign flips)
    w[torch.rand(rows, cols, generator=g) < 0.1] = -0.5
    return w


def test_registry():
    assert set(PRUNING_METHODS) == {"unstructured", "block", "nm"}
    assert build_method("block", block_shape=[2, 2]).block_shape == (2, 2)
    with pytest.raises(ValueError, match="unknown pruning method 'topk'"):
        build_method("topk")


@pytest.mark.parametrize("shape", [(7, 13), (64, 48), (1, 5), (384, 1536)])
@pytest.mark.parametrize("sparsity", [0.3, 0.85, 0.9])
def test_unstructured_exact_zeros(shape, sparsity):
    w = weight_with_ties(*shape, seed=sum(shape))
    keep = element_keep(build_method("unstructured"), w, sparsity)
    n = w.numel()
    assert int((~keep).sum()) == pruned_count(sparsity, n)
    if keep.any():  # every pruned |w| <= every kept |w|
        assert w.abs()[~keep].max() <= w.abs()[keep].min()


@pytest.mark.parametrize("block_shape, shape", [((1, 4), (12, 20)), ((4, 1), (8, 6)), ((2, 3), (6, 9)),
                                                 ((1, 4), (384, 1536))])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
def test_block_exact_zeros_and_valid_pattern(block_shape, shape, sparsity):
    method = BlockMagnitude(block_shape)
    w = weight_with_ties(*shape, seed=3)
    keep = element_keep(method, w, sparsity)
    blocks = method.units_per_weight(shape)
    block_size = block_shape[0] * block_shape[1]
    assert int((~keep).sum()) == pruned_count(sparsity, blocks) * block_size
    assert is_valid_block_pattern(keep, block_shape)
    # the pruned blocks are those of lowest mean |w|
    scores = method.scores(w)
    unit_keep = method.units(keep)
    assert scores[~unit_keep].max() <= scores[unit_keep].min()


def test_block_scores_are_mean_abs_of_real_2d_blocks():
    w = torch.arange(16, dtype=torch.float32).reshape(2, 8) - 8
    scores = BlockMagnitude((1, 4)).scores(w)
    assert scores.tolist() == [[6.5, 2.5], [1.5, 5.5]]
    scores = BlockMagnitude((2, 2)).scores(w)
    assert scores[0, 0] == pytest.approx((8 + 7 + 0 + 1) / 4)


def test_block_shape_must_divide():
    assert "does not divide" in BlockMagnitude((1, 4)).shape_problem((8, 6))
    assert BlockMagnitude((1, 4)).shape_problem((8, 8)) is None


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8)])
@pytest.mark.parametrize("shape", [(8, 16), (5, 24), (384, 1536)])
def test_nm_final_pattern_is_exact(n, m, shape):
    method = NMMagnitude(n, m)
    w = weight_with_ties(*shape, seed=11)
    keep = element_keep(method, w, 1 - n / m)
    groups = keep.reshape(shape[0], shape[1] // m, m).sum(-1)
    assert (groups == n).all()
    # the kept ones are the n largest |w| of each group
    mag = w.abs().reshape(shape[0], shape[1] // m, m)
    kept_min = torch.where(keep.reshape(mag.shape), mag, torch.inf).min(-1).values
    pruned_max = torch.where(~keep.reshape(mag.shape), mag, -1.0).max(-1).values
    assert (pruned_max <= kept_min).all()


def test_nm_gradual_steps_never_exceed_m_minus_n_zeros():
    method = NMMagnitude(2, 4)
    w = weight_with_ties(16, 32, seed=5)
    for sparsity in (0.1, 0.25, 0.4):
        keep = element_keep(method, w, sparsity)
        assert int((~keep).sum()) == pruned_count(sparsity, w.numel())
        assert is_valid_nm(keep, 2, 4)


def test_nm_checks():
    with pytest.raises(ValueError, match="0 < n < m"):
        NMMagnitude(4, 4)
    assert "does not divide" in NMMagnitude(2, 4).shape_problem((4, 6))
    assert NMMagnitude(2, 4).max_sparsity == 0.5
