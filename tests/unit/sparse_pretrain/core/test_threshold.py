import pytest
import torch

from simulated_ranks import SimulatedWorld, split_points
from sparse_pretrain.core.threshold import ScoreShard, keep_masks, pruned_count


def reference_pruned(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest scores, ties by position: a stable sort, the plain one-process answer."""
    order = torch.sort(scores.flatten(), stable=True).indices
    pruned = torch.zeros(scores.numel(), dtype=torch.bool)
    pruned[order[:k]] = True
    return pruned.view(scores.shape)


def scores_with_ties(n, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=g).abs()
    values[torch.randint(0, n, (n // 3,), generator=g)] = 0.25        # a big tie
    values[torch.randint(0, n, (n // 5,), generator=g)] = 0.0         # zeros, as after pruning
    return values


@pytest.mark.parametrize("n", [1, 7, 100, 1_003, 4_096])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.85, 0.9, 0.999])
def test_exact_count_and_matches_stable_sort(n, sparsity):
    scores = scores_with_ties(n, seed=n)
    keep = keep_masks([[ScoreShard(scores)]], sparsity)[0][0]
    k = pruned_count(sparsity, n)
    assert int((~keep).sum()) == k
    assert torch.equal(~keep, reference_pruned(scores, k))


def test_round_half_up():
    assert pruned_count(0.5, 3) == 2 and pruned_count(0.25, 2) == 1 and pruned_count(0.9, 10) == 9
    assert pruned_count(0.85, 20) == 17 and pruned_count(0.9, 7) == 6


def test_all_equal_scores_prune_lowest_positions():
    keep = keep_masks([[ScoreShard(torch.ones(10))]], 0.3)[0][0]
    assert keep.tolist() == [False] * 3 + [True] * 7


def test_prior_pruned_units_go_first_even_against_smaller_scores():
    scores = torch.tensor([0.5, 0.1, 0.2, 0.9])
    prior = torch.tensor([False, True, True, True])    # unit 0 was pruned earlier (score is stale)
    keep = keep_masks([[ScoreShard(scores, 0, prior)]], 0.5)[0][0]
    assert keep.tolist() == [False, False, True, True]


def test_rejects_negative_or_nan_scores():
    with pytest.raises(ValueError, match="non-negative"):
        keep_masks([[ScoreShard(torch.tensor([1.0, -1.0]))]], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        keep_masks([[ScoreShard(torch.tensor([1.0, float("nan")]))]], 0.5)


def test_negative_zero_sorts_as_zero():
    keep = keep_masks([[ScoreShard(torch.tensor([0.3, -0.0, 0.0, 0.1]))]], 0.5)[0][0]
    assert keep.tolist() == [True, False, False, True]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_sharded_search_equals_one_process_answer(world_size, seed):
    g = torch.Generator().manual_seed(100 + seed)
    layers = [scores_with_ties(n, seed=seed * 10 + i) for i, n in enumerate([1_000, 37, 2_048])]
    targets = [0.9, 0.5, 0.85]
    expected = [keep_masks([[ScoreShard(s)]], t)[0][0] for s, t in zip(layers, targets)]
    bounds = [split_points(s.numel(), world_size, g) for s in layers]

    def on_rank(rank, all_reduce):
        groups = [[ScoreShard(s[b[rank]:b[rank + 1]], b[rank])] for s, b in zip(layers, bounds)]
        return [grp[0] for grp in keep_masks(groups, targets, all_reduce)]

    world = SimulatedWorld(world_size)
    per_rank = world.run(on_rank)
    for i in range(len(layers)):
        assert torch.equal(torch.cat([per_rank[r][i] for r in range(world_size)]), expected[i])
    assert world.calls <= 1 + 4 + 8     # sizes, 4 score rounds, at most 8 tie rounds: for ALL layers


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_global_search_across_layers(world_size):
    g = torch.Generator().manual_seed(7)
    layers = [scores_with_ties(n, seed=i) for i, n in enumerate([300, 120, 501])]
    offsets = [0, 300, 420]
    flat = torch.cat(layers)
    expected = keep_masks([[ScoreShard(flat)]], 0.8)[0][0]
    bounds = [split_points(s.numel(), world_size, g) for s in layers]

    def on_rank(rank, all_reduce):
        group = [ScoreShard(s[b[rank]:b[rank + 1]], off + b[rank]) for s, b, off in zip(layers, bounds, offsets)]
        return keep_masks([group], 0.8, all_reduce)[0]

    per_rank = SimulatedWorld(world_size).run(on_rank)
    got = torch.cat([torch.cat([per_rank[r][i] for r in range(world_size)]) for i in range(len(layers))])
    assert torch.equal(got, expected)
    assert int((~got).sum()) == pruned_count(0.8, flat.numel())
