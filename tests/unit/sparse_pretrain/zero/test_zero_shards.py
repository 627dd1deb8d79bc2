"""Masks sharded with DeepSpeed ZeRO partitions, across real processes (torchrun, gloo, CPU); and the
optimizer step hooks that keep them, in one process."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain_fixtures import free_port
from sparse_pretrain.core.masks import MaskedParameters
from sparse_pretrain.zero.shards import ZeroShards

ROOT = Path(__file__).resolve().parents[4]
SUPPORT = ROOT / "tests" / "support"


def run_worker(tmp_path, world_size, stage, method, final, *extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(SUPPORT)]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(SUPPORT / "dist_zero_worker.py"), str(tmp_path), str(stage), method, str(final), *map(str, extra)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((tmp_path / "result.json").read_text())


def test_step_hooks_zero_pruned_gradients_and_masters_like_the_reference():
    """``ZeroShards.install``'s hooks around the optimizer's step (ZeRO-0: the whole tensors, which an engine
    stand-in is enough for) give the weights of masking by multiplication around the step, with pruned
    gradients and weights exactly +0.0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8))
    reference = copy.deepcopy(model)
    names = ["0.weight", "1.weight"]
    keeps = {name: torch.rand(dict(model.named_parameters())[name].numel()) > 0.7 for name in names}
    keeps["1.weight"][:] = False                                  # a weight pruned entirely

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.01)
    engine = SimpleNamespace(zero_optimization_stage=lambda: 0, optimizer=optimizer, module=model)
    shards = ZeroShards.for_parameters(engine, [(name, None) for name in names])
    masked = MaskedParameters(shards.params)
    masked.masks.update({name: keep.clone() for name, keep in keeps.items()})
    masked._masks_changed()
    shards.install(masked)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.1, weight_decay=0.01)
    ref_params = dict(reference.named_parameters())
    x = torch.randn(4, 16)
    for _ in range(3):
        for net, opt in ((model, optimizer), (reference, ref_optimizer)):
            opt.zero_grad(set_to_none=True)
            net(x).pow(2).sum().backward()
            with torch.no_grad():
                for name in names if net is reference else ():
                    ref_params[name].grad.view(-1).mul_(keeps[name])      # the reference: multiply by the mask
            opt.step()                                                     # ours: the hooks, inside the step
            with torch.no_grad():
                for name in names if net is reference else ():
                    ref_params[name].view(-1).mul_(keeps[name])
        for name, p in model.named_parameters():
            assert torch.equal(p, ref_params[name]) and torch.equal(p.grad, ref_params[name].grad), name
            if name in keeps:
                for pruned in (p.detach().view(-1)[~keeps[name]], p.grad.view(-1)[~keeps[name]]):
                    assert not bool(pruned.view(torch.int32).any()), f"{name}: a pruned element is not +0.0"
    shards.uninstall()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


@pytest.mark.slow
@pytest.mark.parametrize("world_size, stage, method, final", [
    (2, 1, "unstructured", 0.9), (3, 1, "unstructured", 0.9),
    (2, 2, "unstructured", 0.9), (3, 2, "unstructured", 0.9),
    (2, 3, "unstructured", 0.9), (3, 3, "unstructured", 0.9),
    (3, 2, "block", 0.8), (3, 3, "block", 0.8), (2, 1, "block", 0.8),
    (2, 0, "unstructured", 0.9),
])
def test_sharded_masks_under_zero(tmp_path, world_size, stage, method, final):
    result = run_worker(tmp_path, world_size, stage, method, final)
    # the masks of the last update equal one-process masks computed from the same gathered weights
    assert result["masks_equal_one_process"]
    for name, c in result["counts"].items():
        # exact target zeros in the fp32 master, in the working copy a forward reads, and in the masks
        assert c["master_zeros"] == c["working_zeros"] == c["mask_pruned"] == c["expected"], name
        assert c["pruned_nonzero"] == 0, name
    per_rank, total = result["mask_bytes"], result["total"]
    if stage == 0:
        assert per_rank == [total] * world_size                 # whole replicas
    else:
        assert sum(per_rank) == total                           # shards tile the pruned weights once
        if stage == 3:                                          # ds_tensor partitions: 1/world each
            assert max(per_rank) <= total / world_size + 64 * len(result["counts"])
        else:                                                   # flat partitions of ALL params
            assert max(per_rank) < total


@pytest.mark.slow
@pytest.mark.parametrize("method, final", [("unstructured", 0.9), ("block", 0.8)])
def test_persistent_zero3_parameters_are_masked_everywhere(tmp_path, method, final):
    """With ZeRO-3's default persistence threshold every weight of a tiny model stays whole on every
    rank as well as partitioned: the whole copies must carry the zeros too."""
    result = run_worker(tmp_path, 2, 3, method, final, 100_000)
    assert len(result["persistent"]) == len(result["counts"])
    assert result["masks_equal_one_process"]
    for name, c in result["counts"].items():
        assert c["master_zeros"] == c["working_zeros"] == c["mask_pruned"] == c["expected"], name
        assert c["pruned_nonzero"] == 0, name
