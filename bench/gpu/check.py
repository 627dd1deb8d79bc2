"""The device check of the GPU path: what one pre-training and fine-tuning step costs on one GPU,
measured in one run that fits the device's time (a budget, default 450 s; see harness.py).

Measurements, in priority order (a later one is skipped, and says so, when it would not fit):
  1_dense       dense BERT-Base pre-training step (MLM+NSP), ZeRO-2, bf16: vocabulary rows needed / all
  2_kd          student step, masks at 90% as the trainer keeps them, KD against a frozen bf16 teacher:
                positions all / masked x vocabulary rows all / needed
  3_mask_upkeep masked student step without KD vs dense on the same engine; the upkeep alone
  4_zero3       the dense Base step under ZeRO-3 vs ZeRO-2
  5_finetune    BertForSequenceClassification (seq 128, batch 32) under Accelerate: bf16 vs fp32 (+TF32)
  7_large       BERT-Large: dense and student+KD (positions all, rows needed)
  6_compile     the dense Base step with the encoder under torch.compile: compile time, vs eager
Models are random-init from transformers configs (nothing from a hub), sdpa attention; DeepSpeed's
config comes from the project's builder (sparse_pretrain/zero/config.py) with torch's AdamW (fused on
CUDA) as client optimizer, so no DeepSpeed op is JIT-built. Each number: warm-up steps, then timed
steps between torch.cuda.synchronize() calls; peak memory from torch.cuda.max_memory_allocated, reset
before each variant (on CPU the process's RSS high-water mark, which never resets).

On the device:  bash bench/gpu/run.sh   (installs the carried wheels, then runs this; see README.md)
Here, on CPU:   .venv/bin/python bench/gpu/check.py --smoke --out runs/gpu-check/gpu_check.json
``--smoke`` runs the same code at toy size (2 layers x 64 hidden, sequence 32, micro-batch 2, one warm-up
and one timed step; DeepSpeed on gloo in this one process, fp32; torch.compile with a backend that
generates no code, as inductor takes minutes on a CPU). Its numbers say nothing about speed.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]   # harness; the project's packages (not installed there)

from harness import Budget, Measurement, ResultFile, ratio, render_table, run_plan  # noqa: E402

from sparse_pretrain.runtime.monitor import flops_per_token, peak_tflops  # noqa: E402
from sparse_pretrain.runtime.precision import enable_tf32  # noqa: E402

SPARSITY = 0.9


@dataclass(frozen=True)
class Sizes:
    seq: int = 512
    micro_base: int = 32
    micro_large: int = 16
    finetune_seq: int = 128
    finetune_batch: int = 32
    warmup: int = 5
    steps: int = 20
    toy: bool = False


SMOKE = Sizes(seq=32, micro_base=2, micro_large=2, finetune_seq=32, finetune_batch=2, warmup=1, steps=1, toy=True)

#: seconds each measurement is expected to take on the H200 (engine builds included), and at --smoke here
ESTIMATES = {"1_dense": (40, 4), "2_kd": (45, 4), "3_mask_upkeep": (15, 2), "4_zero3": (40, 4),
             "5_finetune": (40, 4), "7_large": (75, 4), "6_compile": (180, 15)}


def bert_config(name: str, toy: bool, **extra):
    from transformers import BertConfig
    if toy:
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, **extra)
    elif name == "bert-large":
        config = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                            **extra)
    else:
        config = BertConfig(**extra)
    config._attn_implementation = "sdpa"
    return config


def build(model_class, config, device, seed: int = 0):
    """A random-init model built where it will run (initialising BERT-Large on the host takes seconds)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return model_class(config).train()


def pretraining_batch(config, micro: int, seq: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, config.vocab_size, (micro, seq), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, -100)
    token_type_ids = (torch.arange(seq) >= seq // 2).long().expand(micro, seq)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": token_type_ids,
             "labels": labels, "next_sentence_label": torch.randint(0, 2, (micro,), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def recipe(micro: int, zero_stage: int = 2, positions: str = "all", vocab_rows: str = "needed"):
    """A student-stage recipe with these settings and every other key at its default: the DeepSpeed
    config and distillation weights come from it as the trainer takes them."""
    from sparse_pretrain.recipe import recipe_from_dict
    return recipe_from_dict({"stage": "student", "distillation": {"positions": positions},
                             "training": {"micro_batch_size": micro, "global_batch_size": micro,
                                          "deepspeed_config": f"ds_configs/zero{zero_stage}.json",
                                          "zero_stage": zero_stage, "vocab_rows": vocab_rows}})


@contextmanager
def single_process_env():
    """Accelerate sees no launcher: DeepSpeed's init_distributed set RANK/LOCAL_RANK/WORLD_SIZE for
    this one process, which would make Accelerate wrap the fine-tuned model in a one-rank DDP."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class HookClock:
    """Times what the pruner's optimizer step hooks do, inside the real step: hooks of its own run just
    before and just after them (a torch optimizer runs its step hooks in the order they were registered).
    CUDA events on a GPU, so nothing waits; host time on CPU, where the work is synchronous."""

    def __init__(self, optimizer, install, cuda: bool):
        self.cuda, self.spans, self.started = cuda, [], None
        self.handles = [optimizer.register_step_pre_hook(self.start), optimizer.register_step_post_hook(self.start)]
        install()
        self.handles += [optimizer.register_step_pre_hook(self.stop), optimizer.register_step_post_hook(self.stop)]

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self, *hook_args):
        self.started = self.mark()

    def stop(self, *hook_args):
        self.spans.append((self.started, self.mark()))

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def seconds_per_step(self) -> float:
        """Mean over the steps seen (two spans each: before and after the inner step)."""
        if self.cuda:
            torch.cuda.synchronize()
            total = sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
        else:
            total = sum(b - a for a, b in self.spans)
        return total / (len(self.spans) / 2)


class Check:
    """The measurements, with what they share: the BERT-Base ZeRO-2 engine of 1-3, the dense
    throughputs the later ratios divide by."""

    def __init__(self, sizes: Sizes, peak: float | None, compile_backend: str):
        self.sizes, self.peak, self.compile_backend = sizes, peak, compile_backend
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.bf16 = self.cuda
        enable_tf32("bf16" if self.bf16 else "fp32")     # the project's policy: TF32 on under mixed precision
        self.dense_rows = {}     # (model, vocab_rows) -> the dense ZeRO-2 step's row (1_dense)
        self.base = None         # SimpleNamespace(engine, config, batch, teacher, shards, pruner)

    # -- plumbing -------------------------------------------------------------------------------
    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20     # KiB on Linux

    def seconds_per_step(self, step) -> float:
        """Mean seconds of the timed steps, after the warm-up ones; the first warm-up step's own time
        (where first-call costs and torch.compile's compilation land) in ``self.first_step_s``."""
        start = time.perf_counter()
        for i in range(max(1, self.sizes.warmup)):
            step()
            if i == 0:
                self.sync()
                self.first_step_s = time.perf_counter() - start
        self.sync()
        start = time.perf_counter()
        for _ in range(self.sizes.steps):
            step()
        self.sync()
        return (time.perf_counter() - start) / self.sizes.steps

    def release(self):
        """Drop the Base engine and teacher, so the next measurement's peak memory is its own."""
        if self.base is not None:
            self.base.engine.destroy()
            self.base = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def engine(self, model, micro: int, zero_stage: int):
        import deepspeed

        from sparse_pretrain.runtime.optimizer import optimizer_groups
        from sparse_pretrain.zero.config import deepspeed_config
        config = deepspeed_config(recipe(micro, zero_stage), 1, self.bf16)
        optimizer = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=1e-5, fused=self.cuda)
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]

    def setup(self, name: str, micro: int, zero_stage: int = 2, compiled: bool = False) -> SimpleNamespace:
        from transformers import BertForPreTraining
        config = bert_config(name, self.sizes.toy)
        engine = self.engine(build(BertForPreTraining, config, self.device), micro, zero_stage)
        if compiled:     # as the trainer's training.compile does: the encoder, in place, after the engine
            engine.module.base_model.compile(backend=self.compile_backend)
        return SimpleNamespace(name=name, config=config, engine=engine,
                               batch=pretraining_batch(config, micro, self.sizes.seq, self.device),
                               teacher=None, shards=None, pruner=None, hooked=False)

    def base_setup(self) -> SimpleNamespace:
        if self.base is None:
            self.base = self.setup("bert-base", self.sizes.micro_base)
        return self.base

    @staticmethod
    def hooks(s: SimpleNamespace, on: bool) -> None:
        """The pruner's step hooks on the optimizer of ``s`` (masked steps) or off (dense ones)."""
        if s.shards is not None and on != s.hooked:
            if on:
                s.shards.install(s.pruner)
            else:
                s.shards.uninstall()
            s.hooked = on

    def make_student(self, s: SimpleNamespace) -> None:
        """The frozen teacher, and the pruner's masks at 90% kept as the trainer keeps them: the
        engine's shards of the prunable weights, the optimizer's step hooks, masks applied."""
        if s.pruner is not None:
            return
        from transformers import BertForPreTraining

        from sparse_pretrain.core.gmp_schedule import GMPSchedule
        from sparse_pretrain.core.masks import find_prunable
        from sparse_pretrain.core.methods import build_method
        from sparse_pretrain.core.pruner import GradualPruner
        from sparse_pretrain.zero.shards import ZeroShards
        s.teacher = build(BertForPreTraining, s.config, self.device, seed=1).eval().requires_grad_(False)
        if self.bf16:
            s.teacher.to(torch.bfloat16)
        s.shards = ZeroShards.for_parameters(s.engine, find_prunable(s.engine.module))
        rank, world = s.shards.shard_world()
        s.pruner = GradualPruner(s.shards.params, build_method("unstructured"),
                                 GMPSchedule(final_sparsity=SPARSITY, start=0, policy_end=1, end=1, interval=1),
                                 all_reduce=s.shards.all_reduce(), rank=rank, world_size=world)
        self.hooks(s, True)
        while s.shards.after_step(s.pruner) != SPARSITY:    # steps 0 (sparsity 0) and 1 (the target)
            pass
        s.sparsity = s.pruner.sparsity()["global"]
        if abs(s.sparsity - SPARSITY) > 0.01:
            raise RuntimeError(f"the pruner's masks are {s.sparsity:.3f} sparse, not {SPARSITY}")

    def pretraining_row(self, s, variant: str, vocab_rows: str = "needed", kd_positions: str | None = None,
                        masked: bool = False) -> dict:
        """One pre-training step variant on setup ``s``: dense (no hooks), masked (the pruner's hooks
        and clock), or masked with KD against the teacher at ``kd_positions``."""
        from sparse_pretrain.pretraining_loss import pretraining_losses
        masked = masked or kd_positions is not None
        teacher = s.teacher if kd_positions is not None else None
        weights = recipe(1, positions=kd_positions).distillation_weights() if teacher is not None else None
        self.hooks(s, masked)
        rows = []

        def step():
            terms = pretraining_losses(s.engine, teacher, s.batch, weights, True, vocab_rows=vocab_rows)
            s.engine.backward(terms["loss"])
            s.engine.step()
            if masked:
                s.shards.after_step(s.pruner)
            rows.append(terms["rows"])

        self.reset_peak()
        seconds = self.seconds_per_step(step)
        tokens = s.batch["input_ids"].numel()
        fraction = min(1.0, float(rows[-1]) / tokens)
        flops = flops_per_token(s.config, self.sizes.seq, teacher is not None, projected_fraction=fraction)
        return {"model": s.name, "variant": variant, "tokens_per_s": tokens / seconds, "step_ms": seconds * 1e3,
                "mfu": tokens / seconds * flops / (self.peak * 1e12) if self.peak else None,
                "peak_gib": self.peak_gib(), "vocab_rows": vocab_rows, "projected_fraction": fraction,
                "first_step_s": self.first_step_s}

    # -- the measurements -----------------------------------------------------------------------
    def dense(self) -> list[dict]:
        s = self.base_setup()
        out = [self.pretraining_row(s, f"dense, vocab rows {rows}", rows) for rows in ("needed", "all")]
        for row in out:
            self.dense_rows[(s.name, row["vocab_rows"])] = row
        out[0].update(ratio=ratio(out[0]["tokens_per_s"], out[1]["tokens_per_s"]), note="tokens/s vs all rows")
        return out

    def kd(self) -> list[dict]:
        s = self.base_setup()
        self.make_student(s)
        out = []
        for positions in ("all", "masked"):
            for rows in ("all", "needed"):
                row = self.pretraining_row(s, f"student+KD {positions}, rows {rows}", rows, positions)
                dense = self.dense_rows.get((s.name, rows), {})
                row.update(ratio=ratio(row["tokens_per_s"], dense.get("tokens_per_s")), sparsity=s.sparsity,
                           note=f"tokens/s vs dense, rows {rows}; masks {s.sparsity:.1%}")
                out.append(row)
        return out

    def mask_upkeep(self) -> list[dict]:
        s = self.base_setup()
        self.make_student(s)
        dense = self.pretraining_row(s, "dense (hooks off)")          # leaves the hooks off
        clock = HookClock(s.shards.inner_optimizer(), lambda: self.hooks(s, True), self.cuda)
        try:
            masked = self.pretraining_row(s, "masked, no KD", masked=True)
        finally:
            clock.remove()
        masked.update(ratio=masked["step_ms"] / dense["step_ms"], note="step time vs dense")
        upkeep = clock.seconds_per_step()
        return [dense, masked, {"model": s.name, "variant": "upkeep alone (the step hooks)", "step_ms": upkeep * 1e3,
                                "peak_gib": masked["peak_gib"], "ratio": upkeep * 1e3 / masked["step_ms"],
                                "note": "share of a masked step"}]

    def zero3(self) -> list[dict]:
        self.release()
        s = self.setup("bert-base", self.sizes.micro_base, zero_stage=3)
        try:
            row = self.pretraining_row(s, "dense, ZeRO-3")
        finally:
            s.engine.destroy()
        zero2 = self.dense_rows.get((s.name, "needed"), {})
        row.update(ratio=ratio(row["tokens_per_s"], zero2.get("tokens_per_s")),
                   note=f"tokens/s vs ZeRO-2 (1_dense: peak {zero2.get('peak_gib', float('nan')):.2f} GiB)")
        return [row]

    def finetune(self) -> list[dict]:
        """As the fine-tuning recipe runs alone: its Accelerator (bf16: autocast, fp32 weights) and TF32
        policy (on under bf16, off for fp32), torch AdamW; plus fp32 with TF32 on, which no recipe sets."""
        from accelerate.state import AcceleratorState
        from transformers import BertForSequenceClassification

        from finetune.trainer import make_accelerator
        from sparse_pretrain.runtime.optimizer import optimizer_groups
        self.release()
        config = bert_config("bert-base", self.sizes.toy, num_labels=2)
        n, seq = self.sizes.finetune_batch, self.sizes.finetune_seq
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, config.vocab_size, (n, seq), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                 "labels": torch.randint(0, 2, (n,), generator=g)}
        out = []
        for variant, precision, tf32 in (("bf16", "bf16", True), ("fp32", "fp32", False),
                                         ("fp32 + TF32", "fp32", True)):
            # Accelerate allows one Accelerator per process; its own tests reset the state like this
            AcceleratorState._reset_state(reset_partial_state=True)
            with single_process_env():
                accelerator = make_accelerator(0, None, precision)
            enable_tf32("bf16" if tf32 else "fp32")
            model = build(BertForSequenceClassification, config, accelerator.device)
            optimizer = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=2e-5)
            model, optimizer = accelerator.prepare(model, optimizer)
            on_device = {k: v.to(accelerator.device) for k, v in batch.items()}

            def step(model=model, optimizer=optimizer, accelerator=accelerator, on_device=on_device):
                accelerator.backward(model(**on_device).loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            self.reset_peak()
            seconds = self.seconds_per_step(step)
            out.append({"model": "bert-base cls", "variant": variant, "tokens_per_s": n * seq / seconds,
                        "step_ms": seconds * 1e3, "peak_gib": self.peak_gib()})
            accelerator.free_memory()
            del model, optimizer, accelerator, step
            gc.collect()
        AcceleratorState._reset_state(reset_partial_state=True)
        enable_tf32("bf16" if self.bf16 else "fp32")
        for row in out:
            row.update(ratio=row["step_ms"] / out[1]["step_ms"], note="step time vs fp32")
        return out

    def large(self) -> list[dict]:
        self.release()
        s = self.setup("bert-large", self.sizes.micro_large)
        try:
            dense = self.pretraining_row(s, "dense, rows needed")
            self.make_student(s)
            kd = self.pretraining_row(s, "student+KD all, rows needed", kd_positions="all")
        finally:
            s.engine.destroy()
        kd.update(ratio=kd["tokens_per_s"] / dense["tokens_per_s"], sparsity=s.sparsity,
                  note=f"tokens/s vs dense; masks {s.sparsity:.1%}")
        return [dense, kd]

    def compiled(self) -> list[dict]:
        self.release()
        s = self.setup("bert-base", self.sizes.micro_base, compiled=True)
        try:
            row = self.pretraining_row(s, f"dense, encoder compiled ({self.compile_backend})")
        finally:
            s.engine.destroy()
        eager = self.dense_rows.get((s.name, "needed"), {})
        row.update(compile_s=row["first_step_s"], ratio=ratio(row["tokens_per_s"], eager.get("tokens_per_s")),
                   note=f"tokens/s vs eager (1_dense); first step, compiling: {row['first_step_s']:.1f} s")
        return [row]

    def plan(self, smoke: bool) -> list[Measurement]:
        runs = {"1_dense": ("dense pre-training, BERT-Base", self.dense),
                "2_kd": ("student + KD, BERT-Base, masks 90%", self.kd),
                "3_mask_upkeep": ("mask upkeep vs dense, BERT-Base", self.mask_upkeep),
                "4_zero3": ("ZeRO-3 vs ZeRO-2, dense BERT-Base", self.zero3),
                "5_finetune": ("fine-tuning bf16 vs fp32, Accelerate", self.finetune),
                "7_large": ("BERT-Large dense and student + KD", self.large),
                "6_compile": ("torch.compile of the encoder, dense BERT-Base", self.compiled)}
        return [Measurement(key, title, ESTIMATES[key][smoke], run) for key, (title, run) in runs.items()]


def header(args, sizes: Sizes, peak) -> dict:
    import accelerate
    import deepspeed
    import transformers
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "deepspeed": deepspeed.__version__,
            "deepspeed_from": str(Path(deepspeed.__file__).parent), "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "mode": "smoke" if args.smoke else "full",
            "budget_s": args.budget, "sizes": asdict(sizes), "precision": "bf16" if cuda else "fp32",
            "peak_tflops": peak, "peak_source": args.peak_source,
            "sparsity": SPARSITY, "compile_backend": args.compile_backend,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes, 1+1 steps: the code paths, on CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu-check")) / "gpu_check.json")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all measurements (default 450)")
    parser.add_argument("--only", default="", help="comma-separated measurement keys (default: all)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for MFU (default: the project's table; 1.0 with --smoke on CPU)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; eager with --smoke on CPU)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.compile_backend is None:
        args.compile_backend = "inductor" if cuda else "eager"
    args.peak_source = "--peak-tflops" if args.peak_tflops else "monitor.peak_tflops (by device name)"
    if args.smoke and not cuda:
        torch.set_num_threads(1)   # toy matmuls: a second thread only spins (10x slower on a busy 2-core machine)
        if not args.peak_tflops:   # so that MFU's arithmetic runs; its value means nothing here
            args.peak_tflops, args.peak_source = 1.0, "nominal (--smoke on CPU)"
    budget = Budget(args.budget)

    from sparse_pretrain.zero.runtime import init_distributed
    init_distributed()
    for name in ("DeepSpeed", "transformers"):     # after DeepSpeed's import, which sets its logger to INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    sizes = SMOKE if args.smoke else Sizes()
    peak = peak_tflops(args.peak_tflops)
    check = Check(sizes, peak, args.compile_backend)
    plan = check.plan(args.smoke)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.key for m in plan}
        if unknown:
            parser.error(f"--only: no measurement {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(m.key for m in plan)}")
        plan = [m for m in plan if m.key in wanted]
    results = ResultFile(args.out, header(args, sizes, peak))
    run_plan(plan, budget, results)
    results.data["total_s"] = round(budget.elapsed(), 1)
    results.write()
    table = render_table(results.data)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
