"""What keeping a sparsity pattern costs per training step: ours against the two torch ways.

One process, one model shape, one batch; four copies of the same weights, each with its own AdamW
(the trainer's groups: no decay for biases and LayerNorm), each trained with the same step
(forward, backward, AdamW step):

  dense           no pruning (the baseline)
  ours            sparse_pretrain's GradualPruner on whole parameters, as a one-process or DDP
                  loop uses it (README, finetune/trainer.py without DeepSpeed): gradients of pruned
                  weights zeroed before the step (``mask_gradients``), weights re-masked in place
                  after it (``step``: the clock advances, no update is due, ``apply_masks``);
                  masks are bool, one byte per weight, applied by ``zero_pruned_`` (the
                  tensor's bit patterns, as integers, times the mask's bytes)
  nn.utils.prune  ``torch.nn.utils.prune.custom_from_mask`` with the same masks: the reference
                  code's approach, a forward pre-hook recomputing ``weight = weight_orig *
                  weight_mask`` every forward (float masks; the gradient reaches weight_orig
                  through the product)
  ao.pruning      ``torch.ao.pruning.WeightNormSparsifier.prepare`` (a ``FakeSparsity``
                  parametrization, ``weight = mask * original`` on every access) with its mask
                  buffers overwritten by the same masks (float)

The masks are the pruner's own at 85% (per layer, every encoder Linear, as the recipes prune).
The variants are interleaved (dense, ours, prune, ao, dense, ...) for ``--rounds`` rounds of
``--steps`` steps; the first round warms up and is dropped. Reported: median step time, and the
median over rounds of each variant's time divided by the dense time of the same round, in wall
time and in this process's CPU time (less sensitive to other processes on a shared machine).
Because a few percent drown in a shared machine's noise, the work each variant adds is also
timed alone (``Run.maintenance``: ours, the two in-place zeroing passes; the torch ways, building
the masked weight for the forward and the backward of that product), ``--maintenance-repeats``
times interleaved, median of wall and of CPU time, and given as a share of the median dense step.
One more row times ours as it was before ``zero_pruned_``: ``mul_`` by the bool masks, which torch
casts element by element on CPU (the same two passes; ``previous_upkeep``). After the
run every masked variant is checked to hold zeros at every pruned position of the weights its
forward uses (and the same number of zeros), so all three keep the same pattern.

Also timed, once per round: one mask recomputation of our pruner (``update_masks``: the sharded
radix search in one process), amortized over f = ``--interval`` steps, for a rising target (a
pruner on the dense copy, from all-ones masks to the target: the cost of an update on the cubic
ramp) and for the same target again (the masks in force come back unchanged: the updates between
``policy_end`` and ``end``), and for reference ``WeightNormSparsifier.step()`` (its own
norm-based masks, 1x1 blocks; our masks are put back after it).

The ZeRO path (masks kept inside DeepSpeed's optimizer step by sparse_pretrain.zero.shards) is
measured by bench/pretrain_step.py.

One thread by default (``--threads``): with two threads on a shared 2-core machine every parallel
region waits for a worker thread the other load has descheduled, and the same elementwise op was
measured 0.4 ms in one run and 16 ms in the next; one thread keeps the ratios steady.

CPU (default):  python bench/mask_overhead.py
GPU:            python bench/mask_overhead.py --device cuda --bf16 --model bert-base --seq 512 --batch 32
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from _mlm_bench import add_device_arguments, add_model_argument, build_model, device_setup, make_batch
from sparse_pretrain.core.gmp_schedule import GMPSchedule
from sparse_pretrain.core.masks import find_prunable, whole_parameters
from sparse_pretrain.core.methods import build_method
from sparse_pretrain.core.pruner import GradualPruner

VARIANTS = ("dense", "ours", "nn.utils.prune", "ao.pruning")
PREVIOUS = "ours before zero_pruned_ (mul_ by bool), upkeep only"


def module_of(model, weight_name: str):
    return model.get_submodule(weight_name.rsplit(".", 1)[0])


class Run:
    """One variant: its model, optimizer and step, and the weights its forward actually uses."""

    def __init__(self, variant, model, masks, pruner=None, sparsifier=None):
        from sparse_pretrain.runtime.optimizer import optimizer_groups
        self.variant, self.model, self.masks = variant, model, masks
        self.pruner, self.sparsifier = pruner, sparsifier
        self.optimizer = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=1e-5)

    def step(self, batch, autocast):
        with autocast():
            loss = self.model(**batch).loss
        loss.backward()
        if self.pruner is not None:
            self.pruner.mask_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.pruner is not None:
            self.pruner.step()

    @torch.no_grad()
    def used_weight(self, name: str) -> torch.Tensor:
        module = module_of(self.model, name)
        if self.variant == "nn.utils.prune":
            return module.weight_orig * module.weight_mask     # what the next forward pre-hook sets
        return module.weight                                   # plain, or the parametrization's value

    def maintenance(self, grads: dict) -> None:
        """Only the work this variant adds to a step for the pruned weights, with the gradients
        ``grads`` standing in for backward's: ours, the two in-place masked multiplies; the torch
        ways, the masked weight built for the forward (the prune hook / the parametrization) and
        the backward of that product into the original weight."""
        if self.variant == "ours":
            named = dict(self.model.named_parameters())
            params = [named[n] for n in self.masks]
            for p, n in zip(params, self.masks):
                p.grad = grads[n]
            self.pruner.mask_gradients()
            self.pruner.apply_masks()
            for p in params:
                p.grad = None
            return
        modules = [module_of(self.model, n) for n in self.masks]
        if self.variant == "nn.utils.prune":
            for m in modules:
                for hook in m._forward_pre_hooks.values():
                    hook(m, None)                          # weight = weight_orig * weight_mask
            weights, originals = [m.weight for m in modules], [m.weight_orig for m in modules]
        else:
            weights = [m.weight for m in modules]          # mask * original
            originals = [m.parametrizations.weight.original for m in modules]
        torch.autograd.backward(weights, [grads[n] for n in self.masks])
        for o in originals:
            o.grad = None

    def previous_upkeep(self, grads: dict) -> None:
        """Ours before ``zero_pruned_`` (for reference): ``mul_`` by the bool masks, gradients then weights."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, mask in self.pruner.masks.items():
                grads[name].view(-1).mul_(mask)
                params[name].view(-1).mul_(mask)

    def mask_bytes(self) -> int:
        if self.variant == "ours":
            return sum(m.numel() * m.element_size() for m in self.pruner.masks.values())
        if self.variant == "nn.utils.prune":
            return sum(module_of(self.model, n).weight_mask.nbytes for n in self.masks)
        if self.variant == "ao.pruning":
            return sum(module_of(self.model, n).parametrizations.weight[0].mask.nbytes for n in self.masks)
        return 0


def setup(args, device):
    from torch.ao.pruning import WeightNormSparsifier
    from torch.nn.utils import prune

    base = build_model(args.model).to(device).train()
    copies = {v: copy.deepcopy(base) for v in VARIANTS}
    del base

    # ours: the pruner's masks at the target, then frozen (no update is due on later steps)
    ours = copies["ours"]
    schedule = GMPSchedule(final_sparsity=args.sparsity, start=0, policy_end=1, end=1, interval=1)
    pruner = GradualPruner(whole_parameters(find_prunable(ours)), build_method("unstructured"), schedule)
    pruner.step()
    pruner.step()                                 # step 0: initial sparsity 0; step 1: the target
    masks = pruner.full_masks()
    runs = {"dense": Run("dense", copies["dense"], {}), "ours": Run("ours", ours, masks, pruner=pruner)}

    model = copies["nn.utils.prune"]
    for name, mask in masks.items():
        prune.custom_from_mask(module_of(model, name), "weight", mask)
    runs["nn.utils.prune"] = Run("nn.utils.prune", model, masks)

    model = copies["ao.pruning"]
    sparsifier = WeightNormSparsifier(sparsity_level=args.sparsity, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": name} for name in masks])
    for name, mask in masks.items():               # the same masks (the buffer's identity must stay)
        module_of(model, name).parametrizations.weight[0].mask.copy_(mask)
    runs["ao.pruning"] = Run("ao.pruning", model, masks, sparsifier=sparsifier)
    return runs, masks


def check_same_zeros(runs, masks) -> int:
    """Every masked variant holds zeros at every pruned position of the weights its forward uses,
    and the same number of zeros in all (kept weights are not exactly zero). Returns that number."""
    zeros = {}
    for variant in ("ours", "nn.utils.prune", "ao.pruning"):
        total = 0
        for name, mask in masks.items():
            weight = runs[variant].used_weight(name)
            assert not bool(weight[~mask].any()), f"{variant}: pruned weights of {name} are nonzero"
            total += int((weight == 0).sum())
        zeros[variant] = total
    assert len(set(zeros.values())) == 1, f"different zero counts: {zeros}"
    return zeros["ours"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.85)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds counted (one more warms up)")
    parser.add_argument("--interval", type=int, default=1000, help="f, to amortize a mask update over")
    parser.add_argument("--maintenance-repeats", type=int, default=20,
                        help="repetitions of the maintenance work timed alone (one more warms up)")
    add_device_arguments(parser, threads=1, bf16_help="autocast the forward to bf16 (AMP)")
    args = parser.parse_args()
    device, sync, autocast = device_setup(args)

    runs, masks = setup(args, device)
    batch = make_batch(runs["dense"].model.config.vocab_size, args.batch, args.seq, device)
    times = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}            # process CPU time: less sensitive to other load
    updates = {"rising": [], "same": [], "ao": []}
    pruner, sparsifier = runs["ours"].pruner, runs["ao.pruning"].sparsifier
    # a pruner on the dense copy: update_masks only computes masks, the dense weights stay as they are
    probe = GradualPruner(whole_parameters(find_prunable(runs["dense"].model)), build_method("unstructured"),
                          GMPSchedule(final_sparsity=args.sparsity, start=0, policy_end=1, end=1, interval=1))
    for _ in range(args.rounds + 1):
        for variant in VARIANTS:
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                runs[variant].step(batch, autocast)
            sync()
            times[variant].append((time.perf_counter() - start) / args.steps)
            cpu[variant].append((time.process_time() - start_cpu) / args.steps)
        for mask in probe.masks.values():
            mask.fill_(True)
        sync()
        start = time.perf_counter()
        probe.update_masks(args.sparsity)         # a rising target: dense -> target
        sync()
        updates["rising"].append(time.perf_counter() - start)
        start = time.perf_counter()
        pruner.update_masks(args.sparsity)        # the same target: prior zeros go first, same masks
        pruner.apply_masks()
        sync()
        updates["same"].append(time.perf_counter() - start)
        start = time.perf_counter()
        sparsifier.step()                        # its own masks, for reference only ...
        sync()
        updates["ao"].append(time.perf_counter() - start)
        with torch.no_grad():                    # ... then ours again
            for name, mask in masks.items():
                module_of(runs["ao.pruning"].model, name).parametrizations.weight[0].mask.copy_(mask)
    # the maintenance work alone, interleaved, many repetitions (short, so much less noisy)
    grads = {n: torch.randn(m.shape, device=device) for n, m in masks.items()}
    upkeep = {v: runs[v].maintenance for v in VARIANTS[1:]}
    upkeep[PREVIOUS] = runs["ours"].previous_upkeep
    alone, alone_cpu = {v: [] for v in upkeep}, {v: [] for v in upkeep}
    for _ in range(args.maintenance_repeats + 1):
        for variant, work in upkeep.items():
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            work(grads)
            sync()
            alone[variant].append(time.perf_counter() - start)
            alone_cpu[variant].append(time.process_time() - start_cpu)
    zeros = check_same_zeros(runs, masks)

    times = {v: t[1:] for v, t in times.items()}   # the first round warms up
    cpu = {v: t[1:] for v, t in cpu.items()}
    median = {v: statistics.median(t) for v, t in times.items()}
    ratio = {v: statistics.median(a / b for a, b in zip(times[v], times["dense"])) for v in VARIANTS}
    cpu_ratio = {v: statistics.median(a / b for a, b in zip(cpu[v], cpu["dense"])) for v in VARIANTS}
    update = {k: statistics.median(t[1:]) for k, t in updates.items()}
    pruned = sum(m.numel() for m in masks.values())
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# mask maintenance, {args.model}, batch {args.batch} x seq {args.seq}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {name}, torch {torch.__version__}; "
          f"{len(masks)} pruned weights, {pruned:,} elements at {args.sparsity:.0%} "
          f"({zeros:,} zeros, the same in all three); median of {args.rounds} rounds x {args.steps} steps")
    print("| variant | step (ms) | ratio vs dense (wall) | ratio vs dense (CPU time) | maintenance work alone "
          "(ms/step) | alone, CPU time (ms/step) | alone / dense step | mask bytes held |")
    print("|---|---|---|---|---|---|---|---|")
    for v in (*VARIANTS, PREVIOUS):
        work = statistics.median(alone[v][1:]) if v in alone else 0.0
        work_cpu = statistics.median(alone_cpu[v][1:]) if v in alone else 0.0
        step = (f"{median[v] * 1e3:.1f} | {ratio[v]:.3f} | {cpu_ratio[v]:.3f}" if v in median else "- | - | -")
        held = runs["ours" if v == PREVIOUS else v].mask_bytes()
        print(f"| {v} | {step} | {work * 1e3:.1f} | {work_cpu * 1e3:.1f} | {work / median['dense']:.2%} | {held:,} |")
    print()
    print(f"| mask recomputation | once (ms) | amortized over f = {args.interval} (ms/step) | share of a dense step |")
    print("|---|---|---|---|")
    for label, key in (("ours, rising target (dense -> target): GradualPruner.update_masks", "rising"),
                       ("ours, same target (masks in force -> the same): update_masks + apply_masks", "same"),
                       ("reference: WeightNormSparsifier.step (its own masks)", "ao")):
        print(f"| {label} | {update[key] * 1e3:.1f} | {update[key] / args.interval * 1e3:.3f} | "
              f"{update[key] / args.interval / median['dense']:.5%} |")


if __name__ == "__main__":
    main()
