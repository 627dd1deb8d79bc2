"""Run under torchrun by test_zero_shards.py: prune a tiny BERT under DeepSpeed ZeRO (gloo, CPU) with
masks sharded per rank, and check against one-process pruning of the gathered weights."""
import json
import sys

import torch
import torch.distributed as dist
from transformers import BertConfig, BertForPreTraining

from sparse_pretrain.core.gmp_schedule import GMPSchedule
from sparse_pretrain.core.masks import PrunedParameter, find_prunable
from sparse_pretrain.core.methods import build_method
from sparse_pretrain.core.pruner import GradualPruner
from sparse_pretrain.core.threshold import pruned_count
from sparse_pretrain.zero.runtime import init_distributed
from sparse_pretrain.zero.shards import ZeroShards


def gather_full_masks(pruner):
    if all(p.is_whole for p in pruner.params):   # ZeRO-0: every rank holds whole replicas
        return {p.name: pruner.masks[p.name].clone() for p in pruner.params}
    pieces = [None] * dist.get_world_size()
    mine = {p.name: (p.offset, p.numel, pruner.masks[p.name].cpu()) for p in pruner.params}
    dist.all_gather_object(pieces, mine)
    full = {}
    for p in pruner.params:
        mask = torch.zeros(p.shape.numel(), dtype=torch.bool)
        covered = torch.zeros(p.shape.numel(), dtype=torch.int64)
        for piece in pieces:
            offset, numel, m = piece[p.name]
            mask[offset:offset + numel] = m
            covered[offset:offset + numel] += 1
        assert bool((covered == 1).all()), f"{p.name}: shards do not tile the weight"
        full[p.name] = mask
    return full


def main(out_dir, stage, method_name, final, persistence_threshold=0):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertForPreTraining(cfg)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2 * world,
                 "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage,
                                       "stage3_param_persistence_threshold": persistence_threshold},
                 "steps_per_print": 10 ** 9}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    named = find_prunable(engine.module)
    shards = ZeroShards(engine, named)
    options = {"block_shape": [1, 4]} if method_name == "block" else {}
    schedule = GMPSchedule(final_sparsity=final, start=0, policy_end=4, end=6, interval=2)
    shard_rank, shard_world = shards.shard_world()
    pruner = GradualPruner(shards.params, build_method(method_name, **options), schedule,
                           all_reduce=shards.all_reduce(), rank=shard_rank, world_size=shard_world)
    shards.install(pruner)
    g = torch.Generator().manual_seed(100 + rank)
    result = {}
    for step in range(8):
        ids = torch.randint(0, 96, (2, 12), generator=g)
        out = engine(input_ids=ids, labels=ids, next_sentence_label=torch.zeros(2, dtype=torch.long))
        engine.backward(out.loss)
        engine.step()
        if step == 6:   # the last update: the one-process answer from the same gathered weights
            weights = {name: (safe_get_full_fp32_param(p) if stage else p.data).detach().clone().view(
                getattr(p, "ds_shape", p.shape)) for name, p in named}
            prior = gather_full_masks(pruner)
        shards.after_step(pruner)   # masks recomputed when due, then every copy masked
        if step == 6:
            got = gather_full_masks(pruner)
            ref = GradualPruner([PrunedParameter(n, w.shape, (lambda w=w: [w.view(-1)])) for n, w in weights.items()],
                                build_method(method_name, **options), schedule)
            for n in ref.masks:
                ref.masks[n] = prior[n].clone()
            ref.update_masks(schedule.sparsity(6))
            result["masks_equal_one_process"] = all(torch.equal(got[n], ref.masks[n]) for n in got)
    # what a forward sees and what a checkpoint would hold: zeros exactly where masks say
    full_masks = gather_full_masks(pruner)
    counts = {}
    for name, p in named:
        master = safe_get_full_fp32_param(p).detach() if stage else p.data.detach()
        if stage == 3:
            with deepspeed.zero.GatheredParameters([p]):
                working = p.data.detach().clone()
        else:
            working = p.data.detach().clone()
        unit = {"block": 4, "unstructured": 1}[method_name]
        numel = getattr(p, "ds_numel", p.numel())
        expected = pruned_count(final, numel // unit) * unit
        counts[name] = {"master_zeros": int((master == 0).sum()), "working_zeros": int((working == 0).sum()),
                        "expected": expected, "mask_pruned": int((~full_masks[name]).sum()),
                        "pruned_nonzero": int((working.flatten()[~full_masks[name]] != 0).sum())}
    mask_bytes = [None] * world
    dist.all_gather_object(mask_bytes, sum(m.numel() for m in pruner.masks.values()))
    persistent = [name for name, p in named if getattr(p, "ds_persist", False)]
    result.update(persistent=persistent, counts=counts, mask_bytes=mask_bytes,
                  total=sum(p.shape.numel() for p in pruner.params), sparsity=pruner.sparsity())
    if rank == 0:
        with open(f"{out_dir}/result.json", "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), *map(int, sys.argv[5:]))
