"""What distillation costs per student-pruning step, and what restricting it to masked positions saves.

One process, the same batch (sequence 128, 15% of the positions masked for MLM, no padding) and the
same weights: a student and a frozen teacher, both the model given by ``--model`` (the student
stage starts both from the prepared teacher). Variants, interleaved round by round, each a full
AdamW step of the student:

  student            student forward with its MLM loss, backward, step (no teacher); the HF head
                     projects every position onto the vocabulary, as the trainer's models do
  student, gather    the same loss with the MLM head applied to the masked positions only (see
                     "kd masked, gather"): what the student-only step could cost
  kd all             + the teacher's forward under inference mode and the trainer's loss,
                     ``sparse_pretrain.core.distill.pretraining_distillation_loss`` with positions "all":
                     both models project every non-padding position onto the vocabulary and the
                     soft cross-entropy runs over all of them (the reference code's choice, our
                     default)
  kd masked          the same function with positions "masked" (``distillation.positions:
                     masked``): KD only where labels != -100, but both models still project every
                     position (the HF heads do), and the rest are thrown away
  kd masked, gather  what "masked" could cost: the encoders run as before, then the hidden states of
                     the masked positions are gathered (``hidden[labels != -100]``) and only they go
                     through the MLM head (transform + vocabulary projection) of each model; the MLM
                     loss and the KD term (``sparse_pretrain.core.distill.soft_cross_entropy``) are
                     computed on those rows. Same losses as "student" and "kd masked" (checked in
                     eval mode before timing).

Losses: L = lambda_pt * L_mlm + lambda_kd * L_kd with the recipes' 0.5 / 0.5, T = 2. Models are
``BertForMaskedLM`` (MLM only; BERT's NSP term adds a 2-way soft cross-entropy, negligible here).
Reported: median step time over rounds (the first round warms up) and per-round ratios (median):
each variant against the student-only step ("student", and "student, gather") and against "kd all".

One thread by default (``--threads``): with two threads on a shared 2-core machine every parallel
region waits for a worker thread the other load has descheduled, and the same elementwise op was
measured 0.4 ms in one run and 16 ms in the next; one thread keeps the ratios steady.

CPU (default):  python bench/kd_overhead.py
GPU:            python bench/kd_overhead.py --device cuda --bf16 --model bert-base --seq 512 --batch 32
                (student under bf16 autocast, the teacher in bf16 weights, as the trainer holds it)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from _mlm_bench import add_device_arguments, add_model_argument, build_model, device_setup, make_batch

VARIANTS = ("student", "student, gather", "kd all", "kd masked", "kd masked, gather")


class Losses:
    """The loss of each variant, for one student/teacher pair."""

    def __init__(self, student, teacher, autocast):
        from sparse_pretrain.core.distill import DistillationWeights
        self.student, self.teacher, self.autocast = student, teacher, autocast
        self.all = DistillationWeights(positions="all")
        self.masked = DistillationWeights(positions="masked")

    def __call__(self, variant: str, batch: dict) -> torch.Tensor:
        from sparse_pretrain.core.distill import (
            pretraining_distillation_loss,
            soft_cross_entropy,
        )
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch["labels"]
        if variant.endswith("gather"):
            selected = labels != -100
            with self.autocast():
                hidden = self.student.bert(**inputs).last_hidden_state[selected]     # [masked, H]
                logits = self.student.cls(hidden)                                   # [masked, V]
                loss_pt = F.cross_entropy(logits.float(), labels[selected])
            if variant == "student, gather":
                return loss_pt
            with torch.inference_mode():
                t_hidden = self.teacher.bert(**inputs).last_hidden_state[selected]
                t_logits = self.teacher.cls(t_hidden)
            kd = soft_cross_entropy(logits, t_logits.clone(), self.masked.temperature)
            return self.masked.lambda_pt * loss_pt + self.masked.lambda_kd * kd
        with self.autocast():
            out = self.student(**batch)
        if variant == "student":
            return out.loss
        with torch.inference_mode():
            t_logits = self.teacher(**inputs).logits
        weights = self.all if variant == "kd all" else self.masked
        return pretraining_distillation_loss(weights, out.loss, out.logits, t_logits.clone(),
                                             batch["attention_mask"], labels)["loss"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mlm", type=float, default=0.15, help="fraction of positions masked")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds counted (one more warms up)")
    add_device_arguments(parser, threads=1, bf16_help="student under bf16 autocast, teacher in bf16")
    args = parser.parse_args()
    device, sync, autocast = device_setup(args)

    student = build_model(args.model).to(device).train()
    teacher = copy.deepcopy(student).to(dtype=torch.bfloat16 if args.bf16 else torch.float32)
    teacher.eval().requires_grad_(False)
    from sparse_pretrain.runtime.optimizer import optimizer_groups
    optimizer = torch.optim.AdamW(optimizer_groups(student, 0.01), lr=1e-5)
    batch = make_batch(student.config.vocab_size, args.batch, args.seq, device, args.mlm)
    losses = Losses(student, teacher, autocast)

    # the gathered variants compute the same losses as the full ones (no dropout, no step)
    student.eval()
    with torch.no_grad():
        for full, gathered in (("student", "student, gather"), ("kd masked", "kd masked, gather")):
            a, b = losses(full, batch), losses(gathered, batch)
            assert torch.allclose(a.float(), b.float(), rtol=1e-2 if args.bf16 else 1e-4), (full, float(a), float(b))
    student.train()

    times = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    for _ in range(args.rounds + 1):
        for variant in VARIANTS:
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                losses(variant, batch).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sync()
            times[variant].append((time.perf_counter() - start) / args.steps)
            cpu[variant].append((time.process_time() - start_cpu) / args.steps)
    times = {v: t[1:] for v, t in times.items()}
    cpu = {v: t[1:] for v, t in cpu.items()}

    def ratio(series, v, base):
        return statistics.median(x / y for x, y in zip(series[v], series[base]))

    masked = int((batch["labels"] != -100).sum())
    tokens = int(batch["attention_mask"].sum())
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# distillation, {args.model}, batch {args.batch} x seq {args.seq}, {masked} of {tokens} positions "
          f"masked, {'bf16' if args.bf16 else 'fp32'}, {name}, torch {torch.__version__}; "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print("| variant | step (ms) | vs student (wall) | vs student (CPU time) | vs student, gather (wall) | "
          "vs kd all (wall) | vocabulary rows projected (student + teacher) |")
    print("|---|---|---|---|---|---|---|")
    rows = {"student": tokens, "student, gather": masked, "kd all": 2 * tokens, "kd masked": 2 * tokens,
            "kd masked, gather": 2 * masked}
    for v in VARIANTS:
        print(f"| {v} | {statistics.median(times[v]) * 1e3:.1f} | {ratio(times, v, 'student'):.3f} | "
              f"{ratio(cpu, v, 'student'):.3f} | {ratio(times, v, 'student, gather'):.3f} | "
              f"{ratio(times, v, 'kd all'):.3f} | {rows[v]:,} |")


if __name__ == "__main__":
    main()
