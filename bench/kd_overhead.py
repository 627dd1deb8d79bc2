"""What the pre-training loss costs per step, before and after issue 14, measured in one run.

One process, the same batch (sequence 128, 15% of the positions masked for MLM, no padding) and the
same weights: a student and a frozen teacher, both the model given by ``--model``. Variants,
interleaved round by round, each a full AdamW step of the student:

  student, today          the model's own forward with labels: the HF head projects every position
                          onto the vocabulary, the MLM loss reads the masked ones (teacher preparation
                          before this issue)
  student                 ``sparse_pretrain.pretraining_loss.pretraining_losses`` without a teacher,
                          ``vocab_rows="needed"``: the head projects the masked rows only (the default now)
  kd all, today           the trainer's step before this issue: student forward with labels, teacher
                          forward under inference mode, its logits cloned, the soft cross-entropy over
                          every position at once (``distillation.positions: all``)
  kd all, chunked         the same rows, KD over chunks of 4,096 rows in fp32 (``distillation.chunk_rows``),
                          teacher under no_grad, no clone (``vocab_rows="all"``)
  kd all                  the default now: ``vocab_rows="needed"`` (all non-padding rows here, so the same
                          rows as before) + chunked KD
  kd masked, today        before: ``positions: masked``, both models still project every position
  kd masked               now: both heads at the masked rows only, chunked KD
  kd all, compiled        with ``--compile``: "kd all" on copies of the models whose encoders are
                          compiled (``training.compile``: ``sparse_pretrain.trainer.compile_encoders``,
                          inductor); the compile time is reported apart

Losses: L = lambda_pt * L_mlm + lambda_kd * L_kd with the recipes' 0.5 / 0.5, T = 2; models are
``BertForMaskedLM`` (BERT's NSP term adds a 2-way soft cross-entropy, negligible here). Before timing,
each new variant's loss is checked equal to its "today" variant's (eval mode, no step).
Reported: median step time over rounds (the first warms up), per-round ratios (median) to "student,
today", and with ``--memory`` the peak memory of a step's forward and backward: on GPU
``torch.cuda.max_memory_allocated`` above what was allocated before; on CPU the peak bytes of the
tensors the step creates and holds at once (``LiveTensorBytes``, per storage; torch keeps no CPU
allocator statistics). The parameters and AdamW's state are not counted; their gradients are,
the same for every variant.

One thread by default (``--threads``): with two threads on a shared 2-core machine every parallel
region waits for a worker thread the other load has descheduled; one thread keeps the ratios steady.

CPU (default):  python bench/kd_overhead.py [--memory]
GPU:            python bench/kd_overhead.py --device cuda --bf16 --model bert-base --seq 512 --batch 32
                (student under bf16 autocast, the teacher in bf16 weights, as the trainer holds it;
                peak memory from torch.cuda.max_memory_allocated)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _mlm_bench import add_device_arguments, add_model_argument, build_model, device_setup, make_batch

VARIANTS = ("student, today", "student", "kd all, today", "kd all, chunked", "kd all", "kd masked, today",
            "kd masked")
SAME_LOSS = {"student": "student, today", "kd all, chunked": "kd all, today", "kd all": "kd all, today",
             "kd masked": "kd masked, today"}


class Losses:
    """The loss of each variant, for one student/teacher pair."""

    def __init__(self, student, teacher, autocast):
        from sparse_pretrain.core.distill import DistillationWeights
        self.student, self.teacher, self.autocast = student, teacher, autocast
        self.weights = {(p, c): DistillationWeights(positions=p, chunk_rows=c) for p in ("all", "masked")
                        for c in (0, 4096)}

    def today(self, positions: str, batch: dict) -> torch.Tensor:
        """The trainer's loss before issue 14 (sparse_pretrain/trainer.py at 024688d)."""
        from sparse_pretrain.core.distill import pretraining_distillation_loss
        with self.autocast():
            out = self.student(**batch)
        with torch.inference_mode():
            t_logits = self.teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return pretraining_distillation_loss(self.weights[positions, 0], out.loss, out.logits, t_logits.clone(),
                                             batch["attention_mask"], batch["labels"])["loss"]

    def __call__(self, variant: str, batch: dict) -> torch.Tensor:
        from sparse_pretrain.pretraining_loss import pretraining_losses
        if variant == "student, today":
            with self.autocast():
                return self.student(**batch).loss
        if variant.endswith("today"):
            return self.today(variant.split()[1].rstrip(","), batch)
        positions = "masked" if "masked" in variant else "all"
        teacher, weights = (None, None) if variant == "student" else (self.teacher, self.weights[positions, 4096])
        with self.autocast():
            return pretraining_losses(self.student, teacher, batch, weights, False,
                                      vocab_rows="all" if variant.endswith("chunked") else "needed")["loss"]


def setup(args):
    device, sync, autocast = device_setup(args)
    student = build_model(args.model).to(device).train()
    teacher = copy.deepcopy(student).to(dtype=torch.bfloat16 if args.bf16 else torch.float32)
    teacher.eval().requires_grad_(False)
    from sparse_pretrain.runtime.optimizer import optimizer_groups
    optimizer = torch.optim.AdamW(optimizer_groups(student, 0.01), lr=1e-5)
    batch = make_batch(student.config.vocab_size, args.batch, args.seq, device, args.mlm)
    losses = Losses(student, teacher, autocast)
    if args.compile:
        from sparse_pretrain.trainer import compile_encoders
        compiled = Losses(copy.deepcopy(student), copy.deepcopy(teacher), autocast)
        compile_encoders(compiled.student, compiled.teacher)
        compiled.optimizer = torch.optim.AdamW(optimizer_groups(compiled.student, 0.01), lr=1e-5)
        losses.compiled = compiled
    return device, sync, student, optimizer, batch, losses


def step(losses, optimizer, variant, batch):
    if variant.endswith("compiled"):
        losses, optimizer, variant = losses.compiled, losses.compiled.optimizer, variant.replace(", compiled", "")
    losses(variant, batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class LiveTensorBytes(TorchDispatchMode):
    """The peak bytes of the tensors created inside the block and still alive, counted per storage
    (a storage counts while any tensor an op returned on it lives): on CPU torch has no allocator
    statistics, and the process's peak RSS also holds what the allocator keeps after a free."""

    def __init__(self):
        super().__init__()
        self.live, self.refs, self.now, self.peak = {}, {}, 0, 0

    def _release(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            self.now -= self.live.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                key = tensor.untyped_storage().data_ptr()
                if key not in self.live:
                    self.live[key], self.refs[key] = tensor.untyped_storage().nbytes(), 0
                    self.now += self.live[key]
                    self.peak = max(self.peak, self.now)
                self.refs[key] += 1
                weakref.finalize(tensor, self._release, key)
        return out


def peak_memory(losses, variant: str, batch: dict, device) -> float:
    """MiB: the peak of what the loss, its forward and its backward hold at once (the optimizer step,
    the same for every variant, is left out)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        losses(variant, batch).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with LiveTensorBytes() as counter:
            losses(variant, batch).backward()
        peak = counter.peak
    losses.student.zero_grad(set_to_none=True)
    return peak / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mlm", type=float, default=0.15, help="fraction of positions masked")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds counted (one more warms up)")
    parser.add_argument("--memory", action="store_true", help="also the peak memory of each variant's step")
    parser.add_argument("--compile", action="store_true", help="also the variant with compiled encoders")
    add_device_arguments(parser, threads=1, bf16_help="student under bf16 autocast, teacher in bf16")
    args = parser.parse_args()
    device, sync, student, optimizer, batch, losses = setup(args)
    variants = VARIANTS + (("kd all, compiled",) if args.compile else ())
    compile_s = None
    if args.compile:                    # the first step compiles (forward and backward graphs)
        start = time.perf_counter()
        step(losses, optimizer, "kd all, compiled", batch)
        sync()
        compile_s = time.perf_counter() - start

    student.eval()                      # each new variant is its "today" variant's loss (no dropout)
    with torch.no_grad():
        for new, old in SAME_LOSS.items():
            a, b = losses(new, batch).float(), losses(old, batch).float()
            assert torch.allclose(a, b, rtol=1e-2 if args.bf16 else 1e-4), (new, float(a), float(b))
    student.train()

    times = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for _ in range(args.rounds + 1):
        for variant in variants:
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(losses, optimizer, variant, batch)
            sync()
            times[variant].append((time.perf_counter() - start) / args.steps)
            cpu[variant].append((time.process_time() - start_cpu) / args.steps)
    times = {v: t[1:] for v, t in times.items()}
    cpu = {v: t[1:] for v, t in cpu.items()}
    memory = {}
    if args.memory:
        for variant in VARIANTS:          # (not the compiled one: its kernels bypass the dispatch mode)
            memory[variant] = peak_memory(losses, variant, batch, device)

    def ratio(series, v, base):
        return statistics.median(x / y for x, y in zip(series[v], series[base]))

    masked = int((batch["labels"] != -100).sum())
    tokens = int(batch["attention_mask"].sum())
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# pre-training loss, {args.model}, batch {args.batch} x seq {args.seq}, {masked} of {tokens} positions "
          f"masked, {'bf16' if args.bf16 else 'fp32'}, {name}, torch {torch.__version__}; "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print("| variant | step (ms) | vs student, today (wall) | vs student, today (CPU time) | vs its today (wall) | "
          "vocabulary rows projected (student + teacher) | peak MiB a step adds |")
    print("|---|---|---|---|---|---|---|")
    rows = {"student, today": tokens, "student": masked, "kd all, today": 2 * tokens, "kd all, chunked": 2 * tokens,
            "kd all": 2 * tokens, "kd masked, today": 2 * tokens, "kd masked": 2 * masked,
            "kd all, compiled": 2 * tokens}
    for v in variants:
        today = SAME_LOSS.get(v, "kd all, today" if v.startswith("kd all") else v)
        print(f"| {v} | {statistics.median(times[v]) * 1e3:.1f} | {ratio(times, v, 'student, today'):.3f} | "
              f"{ratio(cpu, v, 'student, today'):.3f} | {ratio(times, v, today):.3f} | {rows[v]:,} | "
              f"{memory.get(v, float('nan')):.0f} |")
    if compile_s is not None:
        print(f"compiling the encoders (first step of \"kd all, compiled\"): {compile_s:.1f} s")


if __name__ == "__main__":
    main()
