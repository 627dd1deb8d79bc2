"""Run under torchrun by test_distributed.py: every rank holds an uneven slice of each layer's
weights (as a ZeRO partition), prunes with the gloo all-reduce, and saves its slices."""
import sys

import torch
import torch.distributed as dist

from sparse_pretrain.core.gmp_schedule import GMPSchedule
from sparse_pretrain.core.masks import PrunedParameter
from sparse_pretrain.core.methods import build_method
from sparse_pretrain.core.pruner import GradualPruner


def main(out_dir: str, scope: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    weights = [torch.randn(96, 64), torch.randn(33, 17), torch.randn(1, 257)]
    for w in weights:
        w[torch.rand(w.shape) < 0.2] = 0.5          # ties across rank boundaries
    params, slices = [], []
    for i, w in enumerate(weights):
        n = w.numel()
        bounds = [0] + [int(n * (r + 1) ** 2 / world ** 2) for r in range(world)]   # uneven
        lo, hi = bounds[rank], bounds[rank + 1]
        shard = w.view(-1)[lo:hi].clone()
        slices.append(shard)
        params.append(PrunedParameter(f"w{i}", w.shape, (lambda s=shard: [s]), offset=lo, numel=hi - lo))
    schedule = GMPSchedule(final_sparsity=0.9, start=0, policy_end=4, end=4, interval=2)
    pruner = GradualPruner(params, build_method("unstructured"), schedule, scope,
                           all_reduce=lambda t: dist.all_reduce(t))
    for _ in range(5):
        pruner.step()
    report = pruner.sparsity()
    torch.save({"slices": slices, "report": report}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
