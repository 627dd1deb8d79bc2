"""Cost of the exact threshold search (sparse_pretrain.core.threshold) against the whole-tensor ways.

For BERT-Base- and BERT-Large-shaped layers, one process, median of several repetitions, all in one
run so that the ratios are comparable:
  radix     keep_masks() on the whole layer (what one rank does on its shard, for a shard = layer)
  kthvalue  torch.kthvalue on the whole layer, then a compare (no exact tie handling)
  sort      a stable sort of the whole layer (the exact one-process answer)
and the bytes of the tensors each way holds per rank at world size 8, computed (not measured): the
radix search holds int32 keys and int32 digits of the rank's shard (8 bytes per element held);
gathering holds the whole fp32 layer on every rank (4 bytes per element of the layer), before
kthvalue's own working copy.

Run: python bench/threshold_search.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from sparse_pretrain.core.threshold import ScoreShard, keep_masks, pruned_count

LAYERS = {"BERT-Base FFN 3072x768": (3072, 768), "BERT-Large FFN 4096x1024": (4096, 1024)}


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# threshold search, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| layer | elements | radix (ms) | kthvalue (ms) | stable sort (ms) | radix/kthvalue | "
          "bytes/rank radix, W=8 | bytes/rank gather |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shape in LAYERS.items():
        scores = torch.randn(shape).abs()
        n = scores.numel()
        k = pruned_count(args.sparsity, n)
        radix = timed(lambda scores=scores: keep_masks([[ScoreShard(scores)]], args.sparsity), args.repeats)
        kth = timed(lambda scores=scores, k=k: scores > torch.kthvalue(scores.flatten(), k).values, args.repeats)
        srt = timed(lambda scores=scores: torch.sort(scores.flatten(), stable=True), args.repeats)
        print(f"| {name} | {n:,} | {radix * 1e3:.1f} | {kth * 1e3:.1f} | {srt * 1e3:.1f} | "
              f"{radix / kth:.2f} | {n // 8 * 8:,} | {n * 4:,} |")


if __name__ == "__main__":
    main()
