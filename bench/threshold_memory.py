"""Time and memory per rank of the sharded threshold search against gathering whole weights.

Real processes (``torch.multiprocessing``, gloo, one thread each); every rank holds 1/W of every
pruned weight as ZeRO-3 splits it (contiguous flat ranges, the last one shorter), and computes this
rank's part of the per-layer keep-masks at ``--sparsity``:

  collective         what GradualPruner.update_masks does: scores |w| of the shard, then ONE
                     ``sparse_pretrain.core.threshold.keep_masks`` call for all layers (a radix select
                     over the float bit patterns; one all-reduce of 256-bin histograms per round,
                     4 rounds, for all layers together)
  collective/layer   the same search called once per layer (4 all-reduces per layer): only one
                     layer's working buffers alive at a time (shown for the whole-model sets)
  gather/layer       the peers' way: per layer, all-gather the scores so that every rank holds the
                     whole layer (``all_gather_into_tensor``), ``torch.kthvalue`` for the k-th
                     smallest, compare, keep this rank's slice of the mask

Time: one group of W processes per layer set runs the variants interleaved for ``--repeats``
rounds (after one warm-up round) with barriers around each call; reported are the median of rank
0's wall times and the median over rounds of each variant's time / gather's time in that round.
Before timing, the masks of the variants are checked to be identical.

Memory, measured: for each (set, variant) a fresh group of W processes builds its shards, runs the
variant once on a small set (code paths warm), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), runs the variant once and reads ``VmHWM - VmRSS`` before the call:
the extra resident memory the call needed at its peak, max over ranks. These workers (not the
timing ones) run with ``MALLOC_MMAP_THRESHOLD_=131072``, so that glibc maps every large tensor
separately and unmaps it when freed: RSS then follows the live buffers. (With glibc's default its
threshold grows after the first big free, later temporaries land in a heap that fragments and
keeps pages, and the gather variant's peak reads ~3x higher; ``--default-malloc`` measures that.)
Memory, computed: the bytes of the largest buffers the code allocates at its peak (see ``analytic_bytes``).

CPU (default):  python bench/threshold_memory.py
Larger:         python bench/threshold_memory.py --sets base-ffn large-ffn base-model large-model --world 2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def bert_layers(hidden: int, inner: int, layers: int) -> list[tuple[int, int]]:
    block = [(hidden, hidden)] * 4 + [(inner, hidden), (hidden, inner)]
    return block * layers + [(hidden, hidden)]          # + the pooler


SETS = {
    "base-ffn": ("BERT-Base FFN 768x3072", [(3072, 768)]),
    "large-ffn": ("BERT-Large FFN 1024x4096", [(4096, 1024)]),
    "base-model": ("BERT-Base, all 73 pruned Linear", bert_layers(768, 3072, 12)),
    "large-model": ("BERT-Large, all 145 pruned Linear", bert_layers(1024, 4096, 24)),
}


def shard_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """ZeRO-3's split: rank r holds flat [r*ps, (r+1)*ps), ps = ceil(numel / world)."""
    per = -(-numel // world)
    start = min(rank * per, numel)
    return start, min(start + per, numel)


# -- the variants: each returns this rank's keep-masks, one per layer -------------------------------

def collective(shards, offsets, sparsity):
    from sparse_pretrain.core.threshold import ScoreShard, keep_masks
    groups = [[ScoreShard(w.abs(), off)] for w, off in zip(shards, offsets)]
    return [g[0] for g in keep_masks(groups, sparsity, dist.all_reduce)]


def collective_per_layer(shards, offsets, sparsity):
    from sparse_pretrain.core.threshold import ScoreShard, keep_masks
    return [keep_masks([[ScoreShard(w.abs(), off)]], sparsity, dist.all_reduce)[0][0]
            for w, off in zip(shards, offsets)]


def gather_per_layer(shards, offsets, sparsity, numels):
    from sparse_pretrain.core.threshold import pruned_count
    world = dist.get_world_size()
    masks = []
    for w, off, numel in zip(shards, offsets, numels):
        per = -(-numel // world)
        mine = torch.zeros(per)                            # padded to equal sizes for the collective
        mine[:w.numel()] = w.abs()
        whole = torch.empty(per * world)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            dist.all_gather_into_tensor(whole, mine)
        del mine
        whole = whole[:numel]
        k = pruned_count(sparsity, numel)
        keep = torch.ones(numel, dtype=torch.bool)
        if k:
            kth = torch.kthvalue(whole, k).values
            keep = whole > kth
            # exact on ties, as the radix search: of the scores equal to the k-th, only the
            # lowest positions needed to reach k are pruned; the others are kept
            tied = torch.nonzero(whole == kth).flatten()
            keep[tied[k - int((whole < kth).sum()):]] = True
        masks.append(keep[off:off + w.numel()].clone())
        del whole, keep
    return masks


def run_variant(name, shards, offsets, numels, sparsity):
    if name == "collective":
        return collective(shards, offsets, sparsity)
    if name == "collective/layer":
        return collective_per_layer(shards, offsets, sparsity)
    return gather_per_layer(shards, offsets, sparsity, numels)


def analytic_bytes(name, numels, world) -> int:
    """Bytes of the largest buffers alive at the variant's peak on one rank (h = elements held).

    collective (read from threshold.py): for every layer at once the scores |w| (4 B per element
    held) and int32 keys (4 B); in round 1 the int32 digits of every layer (4 B); in round 2 the
    round-1 digits are still referenced while the candidates left after round 1 (~57% of the
    elements for Gaussian weights: the bucket [0.5, 2) of the top 8 bits) and their digits exist
    (2 x 4 B x 0.57), plus one layer's shift temporary (4 B): ~16.6 B x sum(h) + 4 B x max(h).
    collective/layer: the same for the largest layer, plus the 1-B masks of all layers returned.
    gather/layer (per layer, n elements): the padded local copy (4 B x h), the gathered layer (4 B
    x n), kthvalue's copy of it (4 B x n) and its int64 indices (8 B x n), plus the masks."""
    held = [-(-n // world) for n in numels]
    if name == "collective":
        return int((12 + 8 * 0.57) * sum(held) + 4 * max(held))
    if name == "collective/layer":
        return int(sum(held) + (16 + 8 * 0.57) * max(held))
    return sum(held) + max(4 * h + 16 * n for h, n in zip(held, numels))


# -- the processes ------------------------------------------------------------------------------

def make_shards(layers, rank, world, seed):
    shards, offsets, numels = [], [], []
    for i, (rows, cols) in enumerate(layers):
        numel = rows * cols
        start, end = shard_range(numel, rank, world)
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        whole = torch.randn(numel, generator=g)            # the same layer on every rank
        shards.append(whole[start:end].clone())
        del whole
        offsets.append(start)
        numels.append(numel)
    return shards, offsets, numels


def make_shards_light(layers, rank, world, seed):
    """As make_shards without the transient whole layer (for memory runs; other values, same law)."""
    shards, offsets, numels = [], [], []
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    for rows, cols in layers:
        numel = rows * cols
        start, end = shard_range(numel, rank, world)
        shards.append(torch.randn(end - start, generator=g))
        offsets.append(start)
        numels.append(numel)
    return shards, offsets, numels


def memory_kb() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        status = f.read()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM"))


def worker(rank, world, port, task, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    layers, sparsity = task["layers"], task["sparsity"]
    result = {}
    if task["mode"] == "time":
        shards, offsets, numels = make_shards(layers, rank, world, 0)
        masks = {v: run_variant(v, shards, offsets, numels, sparsity) for v in task["variants"]}
        reference = masks[task["variants"][0]]
        for v, m in masks.items():
            assert all(torch.equal(a, b) for a, b in zip(m, reference)), f"{v} masks differ"
        del masks, reference
        times = {v: [] for v in task["variants"]}
        for _ in range(task["repeats"] + 1):
            for v in task["variants"]:
                dist.barrier()
                start = time.perf_counter()
                run_variant(v, shards, offsets, numels, sparsity)
                dist.barrier()
                times[v].append(time.perf_counter() - start)
        result = {v: t[1:] for v, t in times.items()}
    else:
        v = task["variant"]
        shards, offsets, numels = make_shards_light(layers, rank, world, 1)
        small = make_shards_light([(64, 64)] * 2, rank, world, 2)
        run_variant(v, *small, sparsity)                        # load the code paths, gloo buffers
        dist.barrier()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                        # peak RSS := current RSS
        rss, _ = memory_kb()
        masks = run_variant(v, shards, offsets, numels, sparsity)
        _, peak = memory_kb()
        del masks
        extra = torch.tensor([peak - rss], dtype=torch.int64)
        dist.all_reduce(extra, op=dist.ReduceOp.MAX)
        result = {"extra_kb": int(extra), "shard_bytes": sum(s.numel() * 4 for s in shards)}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def launch(world, task) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    try:
        mp.spawn(worker, args=(world, port, task, out_path), nprocs=world, join=True)
        with open(out_path) as f:
            return json.load(f)
    finally:
        os.unlink(out_path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["base-ffn", "large-ffn", "base-model"], choices=list(SETS))
    parser.add_argument("--world", type=int, default=2, help="processes (ranks)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one more warms up)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's dynamic mmap threshold (see the docstring)")
    args = parser.parse_args()

    print(f"# threshold search across {args.world} processes (gloo, 1 thread each), torch {torch.__version__}, "
          f"sparsity {args.sparsity}, median of {args.repeats} interleaved rounds; memory: extra peak RSS "
          f"of one call, max over ranks, fresh processes"
          f"{', glibc default malloc' if args.default_malloc else ', MALLOC_MMAP_THRESHOLD_=131072'}")
    print("| layers | elements | per rank | variant | time (ms) | vs gather | extra peak RSS / rank (MB) | "
          "computed (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for key in args.sets:
        label, layers = SETS[key]
        variants = ["collective", "gather/layer"] if len(layers) == 1 else \
            ["collective", "collective/layer", "gather/layer"]
        base = {"layers": layers, "sparsity": args.sparsity}
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)       # timing: glibc as usual
        times = launch(args.world, {**base, "mode": "time", "variants": variants, "repeats": args.repeats})
        numels = [r * c for r, c in layers]
        for v in variants:
            if not args.default_malloc:                      # read by the spawned workers' glibc
                os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
            mem = launch(args.world, {**base, "mode": "memory", "variant": v})
            ratio = statistics.median(a / b for a, b in zip(times[v], times["gather/layer"]))
            print(f"| {label} | {sum(numels):,} | {-(-sum(numels) // args.world):,} | {v} | "
                  f"{statistics.median(times[v]) * 1e3:.1f} | {ratio:.2f} | "
                  f"{mem['extra_kb'] / 1024:.1f} | {analytic_bytes(v, numels, args.world) / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
