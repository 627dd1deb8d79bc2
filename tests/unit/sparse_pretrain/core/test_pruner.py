import copy
import re

import pytest
import torch
from transformers import BertConfig, BertForPreTraining, DistilBertConfig, DistilBertForMaskedLM

from simulated_ranks import SimulatedWorld, split_points
from sparse_pretrain.core.gmp_schedule import GMPSchedule
from sparse_pretrain.core.masks import (
    PrunedParameter,
    SparsityPatternError,
    find_prunable,
    pack_mask,
    unpack_mask,
    whole_parameters,
)
from sparse_pretrain.core.methods import build_method, is_valid_block_pattern
from sparse_pretrain.core.pattern_lock import PatternLock
from sparse_pretrain.core.pruner import GradualPruner
from sparse_pretrain.core.threshold import pruned_count


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=36, max_position_embeddings=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForPreTraining(cfg)


def test_default_selection_is_every_encoder_linear_and_the_pooler():
    model = tiny_bert()
    names = [name for name, _ in find_prunable(model)]
    assert len(names) == 2 * 6 + 1
    assert "bert.pooler.dense.weight" in names
    assert "bert.encoder.layer.1.output.dense.weight" in names
    assert not any(n.startswith("cls.") or "embeddings" in n for n in names)
    distil = DistilBertForMaskedLM(DistilBertConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, hidden_dim=32))
    names = [name for name, _ in find_prunable(distil)]
    assert len(names) == 2 * 6 and all(n.startswith("distilbert.transformer.layer.") for n in names)


def test_selection_errors_name_the_key():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"pruning\.include\[1\]: pattern .*decoder.* matches no Linear"):
        find_prunable(model, include=[r".*encoder\.layer\.0\..*", r"decoder\.layer.*"])
    with pytest.raises(ValueError, match=r"pruning\.exclude\[0\]"):
        find_prunable(model, exclude=["nothing"])
    with pytest.raises(ValueError, match="not a valid regex"):
        find_prunable(model, include=["("])


def make_pruner(model, method="unstructured", scope="layer", final=0.9, **method_options):
    schedule = GMPSchedule(final_sparsity=final, start=0, policy_end=4, end=6, interval=2)
    params = whole_parameters(find_prunable(model))
    return GradualPruner(params, build_method(method, **method_options), schedule, scope)


def train_on(model, pruner, opt, batches):
    """The step order of every recipe: backward, mask gradients, optimizer step, pruner step."""
    for ids in batches:
        out = model(input_ids=ids, labels=ids, next_sentence_label=torch.zeros(len(ids), dtype=torch.long))
        opt.zero_grad()
        out.loss.backward()
        pruner.mask_gradients()
        opt.step()
        pruner.step()


def train_steps(model, pruner, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    train_on(model, pruner, opt, [torch.randint(0, 64, (4, 12), generator=g) for _ in range(steps)])
    return opt


@pytest.mark.parametrize("method, options", [("unstructured", {}), ("block", {"block_shape": [1, 4]}),
                                             ("nm", {"n": 2, "m": 4})])
def test_pruner_follows_schedule_with_exact_counts_during_training(method, options):
    model = tiny_bert()
    final = 0.5 if method == "nm" else 0.9
    pruner = make_pruner(model, method, final=final, **options)
    for step in range(8):
        train_steps(model, pruner, 1, seed=step)
        target = pruner.schedule.sparsity_for_mask_at(step)
        for p in pruner.params:
            weight = p.views()[0].view(p.shape)
            units = pruner.method.units_per_weight(p.shape)
            per_unit = p.shape.numel() // units
            assert int((weight == 0).sum()) >= pruned_count(target, units) * per_unit
            assert int((~pruner.masks[p.name]).sum()) == pruned_count(target, units) * per_unit
            if method == "block":
                assert is_valid_block_pattern(pruner.masks[p.name].view(p.shape), (1, 4))
        assert pruner.nonzeros_where_pruned() == {p.name: 0 for p in pruner.params}
    assert pruner.sparsity()["global"] == pytest.approx(final, abs=0.01)


def test_pruned_weights_never_return():
    model = tiny_bert()
    pruner = make_pruner(model)
    train_steps(model, pruner, 1)
    train_steps(model, pruner, 2, seed=1)    # update at step 2
    before = {n: m.clone() for n, m in pruner.masks.items()}
    train_steps(model, pruner, 4, seed=2)    # updates at steps 4 and 6 (higher sparsity)
    for name, mask in pruner.masks.items():
        assert not (mask & ~before[name]).any(), f"{name}: a pruned weight came back"


def test_gradients_of_pruned_weights_are_zeroed():
    model = tiny_bert()
    pruner = make_pruner(model)
    train_steps(model, pruner, 3)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids, next_sentence_label=torch.zeros(2, dtype=torch.long)).loss.backward()
    pruner.mask_gradients()
    for p in pruner.params:
        assert (p.grad()[~pruner.masks[p.name]] == 0).all()


def test_global_scope_one_threshold_across_layers():
    model = tiny_bert()
    pruner = make_pruner(model, scope="global", final=0.7)
    train_steps(model, pruner, 5)   # masks at 0.7 after step 4
    total = sum(p.shape.numel() for p in pruner.params)
    pruned = sum(int((~m).sum()) for m in pruner.masks.values())
    assert pruned == pruned_count(0.7, total)
    per_layer = [v for k, v in pruner.sparsity().items() if k != "global"]
    assert max(per_layer) - min(per_layer) > 0.05     # layers differ: one threshold, not one quota
    kept_min = min(p.views()[0][pruner.masks[p.name]].abs().min() for p in pruner.params)
    pruned_max = max(p.views()[0][~pruner.masks[p.name]].abs().max() for p in pruner.params)
    assert pruned_max <= kept_min


def test_resume_is_bitwise_equal():
    model_a = tiny_bert()
    pruner_a = make_pruner(model_a)
    opt_a = train_steps(model_a, pruner_a, 3)
    state = {"model": copy.deepcopy(model_a.state_dict()), "opt": copy.deepcopy(opt_a.state_dict()),
             "pruner": copy.deepcopy(pruner_a.state_dict())}
    # continue A
    g = torch.Generator().manual_seed(99)
    batches = [torch.randint(0, 64, (4, 12), generator=g) for _ in range(5)]
    train_on(model_a, pruner_a, opt_a, batches)
    # B: fresh objects restored from the state
    model_b = tiny_bert(seed=123)
    model_b.load_state_dict(state["model"])
    pruner_b = make_pruner(model_b)
    pruner_b.load_state_dict(state["pruner"])
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2, weight_decay=0.01)
    opt_b.load_state_dict(state["opt"])
    train_on(model_b, pruner_b, opt_b, batches)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert pruner_a.clock.next_step == pruner_b.clock.next_step == 8


def test_state_is_bit_packed_and_checked():
    mask = torch.rand(1001) > 0.5
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == 126
    assert torch.equal(unpack_mask(bits, 1001), mask)
    model = tiny_bert()
    pruner = make_pruner(model)
    other = make_pruner(model, method="block", block_shape=[1, 4])
    with pytest.raises(ValueError, match="method/options/scope"):
        other.load_state_dict(pruner.state_dict())


def test_bad_pruner_settings():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"pruning.method: .*does not divide"):
        make_pruner(model, "block", block_shape=[1, 5])
    with pytest.raises(ValueError, match="above what method 'nm' can reach"):
        make_pruner(model, "nm", final=0.75, n=2, m=4)
    with pytest.raises(ValueError, match=re.escape("pruning.scope")):
        make_pruner(model, scope="model")


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_unstructured_pruner_equals_whole_tensor_pruner(world_size):
    """Each simulated rank holds an uneven flat slice of every weight (as a ZeRO partition)."""
    torch.manual_seed(0)
    weights = [torch.randn(12, 20), torch.randn(7, 9), torch.randn(1, 33)]
    schedule = GMPSchedule(final_sparsity=0.85, start=0, policy_end=2, end=2, interval=1)
    method = build_method("unstructured")

    whole = [w.clone() for w in weights]
    ref = GradualPruner([PrunedParameter(f"w{i}", w.shape, (lambda w=w: [w.view(-1)]))
                         for i, w in enumerate(whole)], method, schedule)
    for _ in range(3):
        ref.step()

    g = torch.Generator().manual_seed(1)
    bounds = [split_points(w.numel(), world_size, g) for w in weights]
    shards = [[w.view(-1)[b[r]:b[r + 1]].clone() for w, b in zip(weights, bounds)] for r in range(world_size)]

    def on_rank(rank, all_reduce):
        params = [PrunedParameter(f"w{i}", w.shape, (lambda s=shards[rank][i]: [s]), offset=b[rank],
                                  numel=b[rank + 1] - b[rank]) for i, (w, b) in enumerate(zip(weights, bounds))]
        pruner = GradualPruner(params, method, schedule, all_reduce=all_reduce)
        for _ in range(3):
            pruner.step()
        return pruner.sparsity()

    reports = SimulatedWorld(world_size).run(on_rank)
    for i, w in enumerate(whole):
        gathered = torch.cat([shards[r][i] for r in range(world_size)])
        assert torch.equal(gathered, w.view(-1))
        assert int((gathered == 0).sum()) == pruned_count(0.85, w.numel())
    assert reports[0] == reports[-1] == ref.sparsity()


@pytest.mark.parametrize("search_chunk", [GradualPruner.SEARCH_CHUNK_UNITS, 60], ids=["one-search", "chunked"])
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("method, options, final, scope", [
    ("block", {"block_shape": [1, 4]}, 0.8, "layer"),
    ("block", {"block_shape": [4, 1]}, 0.8, "layer"),
    ("block", {"block_shape": [2, 4]}, 0.75, "global"),
    ("nm", {"n": 2, "m": 4}, 0.5, "layer"),
    ("nm", {"n": 1, "m": 4}, 0.75, "global"),
])
def test_sharded_block_and_nm_equal_whole_tensor_masks(world_size, method, options, final, scope, search_chunk,
                                                       monkeypatch):
    """Boundaries at arbitrary flat indices cut blocks, rows and N:M groups: masks must still be
    those of the real 2-D units, identical to the one-process masks; also when the per-layer search
    runs in chunks of layers (bounded memory)."""
    monkeypatch.setattr(GradualPruner, "SEARCH_CHUNK_UNITS", search_chunk)
    torch.manual_seed(world_size)
    weights = [torch.randn(16, 24), torch.randn(8, 40), torch.randn(4, 8)]
    for w in weights:
        w[torch.rand(w.shape) < 0.2] = 0.5                       # ties
    schedule = GMPSchedule(final_sparsity=final, start=0, policy_end=2, end=3, interval=1)
    whole = [w.clone() for w in weights]
    ref = GradualPruner([PrunedParameter(f"w{i}", w.shape, (lambda w=w: [w.view(-1)]))
                         for i, w in enumerate(whole)], build_method(method, **options), schedule, scope)
    for _ in range(4):
        ref.step()
    g = torch.Generator().manual_seed(7)
    bounds = [split_points(w.numel(), world_size, g) for w in weights]
    shards = [[w.view(-1)[b[r]:b[r + 1]].clone() for w, b in zip(weights, bounds)] for r in range(world_size)]

    def on_rank(rank, all_reduce):
        params = [PrunedParameter(f"w{i}", w.shape, (lambda s=shards[rank][i]: [s]), offset=b[rank],
                                  numel=b[rank + 1] - b[rank]) for i, (w, b) in enumerate(zip(weights, bounds))]
        pruner = GradualPruner(params, build_method(method, **options), schedule, scope,
                               all_reduce=all_reduce, rank=rank, world_size=world_size)
        assert (len(pruner._search_chunks()) > 1) == (search_chunk == 60)
        for _ in range(4):
            pruner.step()
        return {name: m.clone() for name, m in pruner.masks.items()}

    masks = SimulatedWorld(world_size).run(on_rank)
    for i, w in enumerate(whole):
        gathered = torch.cat([masks[r][f"w{i}"] for r in range(world_size)])
        assert torch.equal(gathered, ref.masks[f"w{i}"]), f"w{i}"
        assert torch.equal(torch.cat([shards[r][i] for r in range(world_size)]), w.view(-1))
        if method == "block":
            assert is_valid_block_pattern(gathered.view(w.shape), options["block_shape"])


def test_pattern_lock_keeps_zeros_through_training():
    model = tiny_bert()
    pruner = make_pruner(model)
    train_steps(model, pruner, 7)          # 90% sparse
    sparse_model = copy.deepcopy(model)
    lock = PatternLock.from_model(sparse_model)
    zeros_before = {p.name: p.views()[0] == 0 for p in lock.params}
    assert lock.sparsity()["global"] == pytest.approx(0.9, abs=0.01)
    train_steps(sparse_model, lock, 3, seed=5)
    lock.verify()
    for p in lock.params:
        now = p.views()[0] == 0
        assert torch.equal(now, zeros_before[p.name]) or (now & ~zeros_before[p.name]).sum() == 0
        assert (now[zeros_before[p.name]]).all()
    # without apply_masks, AdamW momentum and weight decay would move pruned weights: verify catches it
    with torch.no_grad():
        lock.params[0].views()[0][~lock.masks[lock.params[0].name]] += 1e-3
    with pytest.raises(SparsityPatternError, match="nonzero in 1 layer"):
        lock.verify()
