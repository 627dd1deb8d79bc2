"""The pre-training recipe: teacher preparation or student pruning, on DeepSpeed ZeRO.

``stage: teacher`` continues pre-training a dense model with its own objectives (MLM + NSP for
BERT, MLM otherwise). ``stage: student`` starts from the prepared teacher and trains on
``lambda_pt * L_pt + lambda_kd * L_kd`` against the frozen teacher while the gradual pruner drives
the encoder's Linear weights to the target sparsity and the LR is rewound every f steps.

Read top to bottom: setup (distributed, data, models, engine, pruner, resume), the loop, export.
A preemption request (SLURM's warning signal, forwarded as a stop file; see runtime/preemption.py)
ends the loop at the same step on every rank with a checkpoint and exit code 75, for a requeue.
Checkpoints follow the protocol both recipes share (runtime/checkpoints.py), DeepSpeed's side in
zero/checkpoint.py.
Run with ``deepspeed --num_gpus N -m sparse_pretrain --config RECIPE.yaml``, ``torchrun``, ``srun``
or ``prune-ofa pretrain --config RECIPE.yaml`` (one process).
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sparse_pretrain.core.masks import describe_selection
from sparse_pretrain.core.pruner import GradualPruner
from sparse_pretrain.pretraining_loss import heads_at, mlm_logits, pretraining_losses
from sparse_pretrain.recipe import Recipe
from sparse_pretrain.runtime import checkpoints, run_identity
from sparse_pretrain.runtime.monitor import Monitor, flops_per_token, peak_tflops
from sparse_pretrain.runtime.optimizer import optimizer_groups
from sparse_pretrain.runtime.pause_points import pause
from sparse_pretrain.runtime.precision import enable_tf32, resolve_precision
from sparse_pretrain.runtime.preemption import PreemptionWatch, max_all_reduce
from sparse_pretrain.runtime.schema import ConfigError
from sparse_pretrain.zero import checkpoint
from sparse_pretrain.zero.config import deepspeed_config
from sparse_pretrain.zero.export import export_model, gather_fp32_state_dict
from sparse_pretrain.zero.runtime import init_distributed
from sparse_pretrain.zero.shards import ZeroShards, set_full_weights

# -- setup helpers ----------------------------------------------------------------------------------

def model_class(nsp: bool):
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining
    return AutoModelForPreTraining if nsp else AutoModelForMaskedLM


def load_model(path: str, nsp: bool, attn: str, dtype=None, with_new: bool = False):
    """The model at ``path``; with ``with_new`` also the names of its parameters the checkpoint
    lacked (initialised at load, as heads a sentence-embedding checkpoint has no use for)."""
    model, info = model_class(nsp).from_pretrained(path, attn_implementation=attn, output_loading_info=True,
                                                   **({"dtype": dtype} if dtype else {}))
    if nsp and not hasattr(getattr(model, "cls", None), "seq_relationship"):
        raise ConfigError(f"data.nsp: {type(model).__name__} has no next-sentence head; set data.nsp=false")
    if not with_new:
        return model
    return model, sorted(set(info["missing_keys"]) & {name for name, _ in model.named_parameters()})


def model_inputs(batch: dict, device) -> dict:
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label")
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}


def compile_encoders(*models, backend: str = "inductor") -> None:
    """``torch.compile`` each model's encoder in place (``Module.compile``: parameter names, and so
    checkpoints, masks and exports, stay as they are). Only the encoder, whose shapes are the same
    every micro-batch: the heads see a different number of rows each time (``vocab_rows``)."""
    for model in models:
        model.base_model.compile(backend=backend)


@torch.no_grad()
def evaluate(engine, held_out, collator, batch_size: int, max_batches: int, seed: int,
             rank: int, world: int, vocab_rows: str = "needed") -> dict[str, float]:
    """Masked-LM accuracy and perplexity on held-out rows, with fixed masks. Every rank runs the same
    number of forwards (ZeRO-3 gathers parameters collectively); surplus forwards count zero. With
    ``vocab_rows="needed"`` the MLM head projects only the masked rows (the same numbers)."""
    from sparse_pretrain.data.batches import PretrainingRows, evaluation_batches
    batches = evaluation_batches(len(held_out), batch_size, seed)[:max_batches]
    rows = PretrainingRows(held_out)
    per_rank = math.ceil(len(batches) / world)
    totals = torch.zeros(3, dtype=torch.float64, device=engine.device)   # correct, masked, loss sum
    engine.module.eval()
    for i in range(per_rank):
        index = rank * per_rank + i
        batch = model_inputs(collator(rows.__getitems__(batches[min(index, len(batches) - 1)])), engine.device)
        labels = batch.pop("labels")
        batch.pop("next_sentence_label", None)
        with heads_at(engine.module, labels != -100) if vocab_rows == "needed" else contextlib.nullcontext():
            logits = mlm_logits(engine(**batch)).float()
        if index >= len(batches):
            continue
        selected = labels != -100
        picked = logits if vocab_rows == "needed" else logits[selected]
        totals[0] += (picked.argmax(-1) == labels[selected]).sum()
        totals[1] += selected.sum()
        totals[2] += torch.nn.functional.cross_entropy(picked, labels[selected], reduction="sum")
    engine.module.train()
    dist.all_reduce(totals)
    masked = max(1.0, float(totals[1]))
    return {"eval/mlm_accuracy": float(totals[0]) / masked, "eval/perplexity": math.exp(float(totals[2]) / masked)}


# -- the recipe --------------------------------------------------------------------------------

def run(recipe: Recipe) -> Path:
    import deepspeed
    from torch.utils.data import DataLoader

    from sparse_pretrain.data.batches import PretrainingBatches, PretrainingRows
    from sparse_pretrain.data.collator import MaskingCollator
    from sparse_pretrain.data.prepare import load_prepared, load_tokenizer, prepared_path, resolve_nsp

    t, student_stage = recipe.training, recipe.stage == "student"
    output_dir = Path(t.output_dir)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    any_rank = max_all_reduce()    # one int over the ranks: a stop request, a save that failed anywhere
    watch = PreemptionWatch(all_reduce=any_rank, watch_file=rank == 0)   # SIGUSR1/SIGTERM, stop file
    use_cuda = torch.cuda.is_available()
    precision = resolve_precision(t.precision, "cuda" if use_cuda else "cpu", error=ConfigError)
    use_bf16 = precision == "bf16"     # DeepSpeed's bf16: bf16 weights and activations, fp32 masters
    enable_tf32(precision)             # what stays fp32 under bf16 runs as TF32 on GPUs; fp32 stays IEEE
    ds_config = deepspeed_config(recipe, world, use_bf16)          # bad batch arithmetic fails here
    nsp = resolve_nsp(recipe)
    if student_stage:   # bad patterns or block shapes fail on the bare structure, before any loading
        from transformers import AutoConfig
        with torch.device("meta"):
            recipe.pruning.check_against_model(model_class(nsp).from_config(AutoConfig.from_pretrained(
                recipe.model.name_or_path)))

    # data: prepared once by `prune-ofa prepare-data`, memory-mapped here
    tokenizer = load_tokenizer(recipe)
    data_dir = prepared_path(recipe, tokenizer)
    train_rows, held_out = load_prepared(recipe, data_dir)

    # this run's identity: a directory holding another run's checkpoints is refused (or, asked
    # for, discarded) here, before any weights load, so nobody's run is resumed or overwritten
    identity = pretraining_identity(recipe, data_dir)
    if run_identity.check_run(output_dir, identity, t.discard_different_run):
        dist.barrier()
        if rank == 0:
            print(f"discarded the different run in {output_dir}: "
                  f"{', '.join(run_identity.discard_run(output_dir))}", flush=True)
        dist.barrier()
    batches = PretrainingBatches(len(train_rows), t.global_batch_size, t.micro_batch_size, world, rank,
                                 seed=t.seed, with_mask_seeds=True)
    collator = MaskingCollator(tokenizer, seed=t.seed)

    # models: the student (or the teacher being prepared), and the frozen teacher; heads missing
    # from a checkpoint are initialised alike on every rank
    torch.manual_seed(t.seed)
    model, new_parameters = load_model(recipe.model.name_or_path, nsp, recipe.model.attn_implementation,
                                       with_new=True)
    pruned = recipe.pruning.check_against_model(model) if student_stage else []
    pruned_names = [name for name, _ in pruned]
    teacher = None
    if student_stage:
        teacher_path = recipe.model.teacher_name_or_path or recipe.model.name_or_path
        teacher = load_model(teacher_path, nsp, recipe.model.attn_implementation,
                             torch.bfloat16 if use_bf16 else None)
        teacher.eval().requires_grad_(False)

    if new_parameters and rank == 0:
        print(f"{len(new_parameters)} parameters not in {recipe.model.name_or_path}, initialised at load, train at lr "
              f"{t.new_parameters_learning_rate or t.learning_rate}: {', '.join(new_parameters)}", flush=True)
    optimizer = torch.optim.AdamW(optimizer_groups(model, t.weight_decay, new_parameters,
                                                   t.new_parameters_learning_rate), lr=t.learning_rate,
                                  betas=tuple(t.adam_betas), eps=t.adam_epsilon)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_factor())
    engine, _, _, lr_scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                      lr_scheduler=lr_scheduler, config=ds_config)
    if teacher is not None:
        if recipe.model.teacher_zero3:   # partitioned like the student; forward gathers layer by layer
            teacher_config = {"train_micro_batch_size_per_gpu": t.micro_batch_size, "bf16": {"enabled": use_bf16},
                              "zero_optimization": {"stage": 3}}
            teacher = deepspeed.initialize(model=teacher, config=teacher_config)[0].module
        else:
            teacher.to(engine.device)
        teacher.eval()

    if t.compile:
        compile_encoders(engine.module, *([teacher] if teacher is not None else []))
    pruner = shards = None
    if student_stage:
        shards = ZeroShards.for_parameters(engine, pruned)
        shard_rank, shard_world = shards.shard_world()
        pruner = GradualPruner(shards.params, recipe.pruning_method(), recipe.gmp_schedule(), recipe.pruning.scope,
                               all_reduce=shards.all_reduce(), rank=shard_rank, world_size=shard_world)
        shards.install(pruner)
    torch.manual_seed(t.seed + rank)   # dropout differs across ranks (and is restored on resume)

    # resume from the newest complete checkpoint in the output directory, if any (what a run killed
    # while saving left is removed first)
    ckpt_root = output_dir / "checkpoints"
    if rank == 0:
        checkpoints.remove_unfinished(ckpt_root, t.keep_checkpoints)
    dist.barrier()
    step, resumed_rng = resume(engine, ckpt_root, pruner, shards, batches, collator, lr_scheduler, rank, world)

    loader = DataLoader(PretrainingRows(train_rows), batch_sampler=batches, collate_fn=collator,
                        num_workers=t.dataloader_workers, pin_memory=use_cuda,
                        persistent_workers=t.dataloader_workers > 0,
                        prefetch_factor=4 if t.dataloader_workers > 0 else None)
    micro_batches = iter(loader)   # draws from the global generator (the workers' base seed)...
    if resumed_rng is not None:      # ...so the saved RNG state goes back only now: dropout continues
        checkpoints.set_rng_states(resumed_rng)  # exactly where the uninterrupted run's is
    # from_pretrained returns a model in eval mode and DeepSpeed keeps it: without this, dropout would
    # be off until the first evaluation (which ends in train())
    engine.module.train()
    accumulation = batches.accumulation_steps
    weights = recipe.distillation_weights() if teacher is not None else None
    monitor = Monitor(output_dir, rank, t.total_steps, step)
    peak = peak_tflops(t.peak_tflops)
    if rank == 0:
        print(f"{recipe.stage}: {t.total_steps} steps, global batch {t.global_batch_size} = {t.micro_batch_size} "
              f"x {accumulation} accumulation x {world} ranks, ZeRO-{engine.zero_optimization_stage()}, "
              f"{'bf16' if use_bf16 else 'fp32'}, starting at step {step}")
        if pruner is not None:
            held = sum(m.numel() for m in pruner.masks.values())
            print(f"pruning {len(pruned_names)} weights; this rank's masks: {held:,} bytes "
                  f"for {sum(p.shape.numel() for p in pruner.params):,} pruned weights")
            print("pruned: " + describe_selection([p.name for p in pruner.params],
                                                  [p.shape.numel() for p in pruner.params]))

    # loss, loss_pt, loss_kd, kd_kl (logged, not optimized), tokens, rows
    sums = torch.zeros(6, dtype=torch.float64, device=engine.device)
    window_start, window_steps = time.perf_counter(), 0
    while step < t.total_steps:
        # -- one optimizer step: `accumulation` micro-batches, DeepSpeed steps at the boundary --
        for _ in range(accumulation):
            batch = model_inputs(next(micro_batches), engine.device)
            lr = lr_scheduler.get_last_lr()[0]
            terms = pretraining_losses(engine, teacher, batch, weights, nsp, vocab_rows=t.vocab_rows)
            loss = terms["loss"]
            engine.backward(loss)
            pause("mid-step", step, output_dir, rank)      # tests: a kill between backward and step
            engine.step()              # the pruner's hooks keep pruned weights and gradients at zero
            sums += torch.stack([loss.detach(), terms["pretraining"].detach(), terms["kd"].detach(), terms["kd_kl"],
                                 batch["attention_mask"].sum(), terms["rows"]]).double()
        batches.step()
        target = shards.after_step(pruner) if pruner is not None else None   # masks every f steps (collective)
        step += 1
        window_steps += 1

        # -- monitoring: host syncs only here, every log_interval steps --
        if pruner is not None and target is not None:
            report = pruner.sparsity()
            monitor.scalars(step - 1, {"sparsity/target": target, "sparsity/global": report.pop("global"),
                                       "sparsity/mask_changes": pruner.last_mask_changes,
                                       **{f"sparsity/{name}": v for name, v in report.items()}})
        monitor.scalars(step - 1, {"train/lr": lr})
        if step % t.log_interval == 0 or step == t.total_steps:
            dist.all_reduce(sums)
            elapsed = time.perf_counter() - window_start
            micro_steps = window_steps * accumulation * world
            values = (sums[:4] / micro_steps).tolist()     # mean loss (and terms) per micro-batch
            tokens_per_s = float(sums[4]) / elapsed        # non-padding tokens, all ranks
            grad_norm = engine.get_global_grad_norm()
            scalars = {"train/loss": values[0], "train/loss_pt": values[1], "train/grad_norm":
                       float(grad_norm) if grad_norm is not None else None,
                       "perf/tokens_per_s": tokens_per_s, "perf/step_time": elapsed / window_steps}
            kd = ""
            if teacher is not None:   # the soft cross-entropy optimized, and its KL (0 when the student matches)
                scalars.update({"train/loss_kd": values[2], "train/kd_kl": values[3]})
                kd = f" loss_kd {values[2]:.4f} kd_kl {values[3]:.4f}"
            if peak:   # the vocabulary projection counted on the rows projected
                flops = flops_per_token(engine.module.config, recipe.data.max_seq_length, teacher is not None,
                                        float(sums[5]) / max(1.0, float(sums[4])))
                scalars["perf/mfu"] = tokens_per_s * flops / (peak * 1e12 * world)
            monitor.scalars(step - 1, scalars)
            sparsity = pruner.clock.current_sparsity if pruner is not None else 0.0
            monitor.line(f"step {step}/{t.total_steps} loss {values[0]:.4f}{kd} lr {lr:.3e} "
                         f"sparsity {sparsity:.3f} {tokens_per_s:,.0f} tok/s")
            monitor.advance(window_steps, loss=f"{values[0]:.3f}",
                            **({"kd_kl": f"{values[3]:.3f}"} if teacher is not None else {}))
            sums.zero_()
            window_start, window_steps = time.perf_counter(), 0
        if step % t.eval_interval == 0 or step == t.total_steps:
            results = evaluate(engine, held_out, collator, t.micro_batch_size, t.eval_batches, t.seed, rank, world,
                               t.vocab_rows)
            monitor.scalars(step - 1, results)
            monitor.line(f"eval at step {step}: masked-LM accuracy {results['eval/mlm_accuracy']:.4f}, "
                         f"perplexity {results['eval/perplexity']:.2f}")
        # preemption (SLURM's warning signal, or the stop file): checkpoint this step, then stop
        stop = step < t.total_steps and watch.should_stop()     # one all-reduce of one int, every rank
        if step % t.save_interval == 0 or step == t.total_steps or stop:
            checkpoint.save(engine, ckpt_root, step, trainer_state(step, engine, batches, collator, lr_scheduler,
                                                                   pruner, world), t.keep_checkpoints, rank,
                            any_rank, run=(output_dir, identity))
        if stop:
            monitor.close()
            watch.requeue(output_dir, step, main=rank == 0, say=monitor.line)
    monitor.close()
    watch.finish(output_dir, main=rank == 0)

    # -- export: a Hugging Face directory with real zeros, and sparsity.json --
    state = gather_fp32_state_dict(engine)
    extra = {"stage": recipe.stage, "step": step}
    if pruner is not None:
        extra["mask_sparsity"] = pruner.sparsity()["global"]    # collective: every rank
    out = output_dir / "model"
    if rank == 0:
        export_model(type(engine.module), engine.module.config, state, tokenizer, out, pruned_names,
                     pruner.clock.current_sparsity if pruner is not None else None, extra)
        print(f"exported {out}")
    dist.barrier()
    return out


#: recipe keys that say only where or how often to write, how to place the work on the machines
#: (a run may resume on another world size or ZeRO stage) or how to log; the model, teacher and
#: data paths are replaced by digests of what they hold (a moved directory is the same run)
NOT_IN_IDENTITY = ("training.output_dir", "training.save_interval", "training.keep_checkpoints",
                   "training.log_interval", "training.eval_interval", "training.eval_batches",
                   "training.dataloader_workers", "training.peak_tflops", "training.micro_batch_size",
                   "training.deepspeed_config", "training.zero_stage", "training.zero3_persistence_threshold",
                   "model.attn_implementation", "model.teacher_zero3", "model.name_or_path",
                   "model.teacher_name_or_path", "data.num_proc", "data.cache_dir", "data.data_files",
                   "data.tokenizer_name_or_path")


def pretraining_identity(recipe: Recipe, data_dir: Path) -> dict:
    """What defines this run (:mod:`.run_identity`): the recipe's keys that change results, the
    model and teacher (digests of their files), and the prepared data (its settings hash, which
    covers the tokenizer and the source files' contents)."""
    teacher = (recipe.model.teacher_name_or_path or recipe.model.name_or_path) if recipe.stage == "student" else None
    inputs = {"model": run_identity.model_identity(recipe.model.name_or_path),
              "teacher": run_identity.model_identity(teacher), "data": data_dir.name}
    return run_identity.run_identity(recipe.to_dict(), NOT_IN_IDENTITY, inputs)


def trainer_state(step: int, engine, batches, collator, lr_scheduler, pruner, world: int) -> dict:
    """What a checkpoint holds besides DeepSpeed's own state (this rank's; see zero/checkpoint.py)."""
    return {"step": step, "batches": batches.state_dict(), "collator": collator.state_dict(),
            "rng": checkpoints.rng_states(), "lr_scheduler": lr_scheduler.state_dict(),
            "world_size": world, "zero_stage": engine.zero_optimization_stage(),
            "pruner": pruner.state_dict() if pruner is not None else None}


def resume(engine, root: Path, pruner, shards, batches, collator, lr_scheduler, rank: int,
           world: int) -> tuple[int, dict | None]:
    """Load the newest complete checkpoint under ``root``; returns the step to start at (0 if none)
    and this rank's saved RNG states, which the caller sets once nothing else will draw before
    the first step (None on another layout, or without a checkpoint).

    Same world size and ZeRO stage: DeepSpeed's own load, every state bit-for-bit. Otherwise the
    fp32 weights are consolidated from the ZeRO files and set into the new partitions, the masks
    are rebuilt from all ranks' pieces and the LR schedule and data position carry over; the
    optimizer's moments start afresh (DeepSpeed cannot re-partition them without a universal
    checkpoint conversion), which the log says."""
    path = checkpoints.latest(root)
    if path is None:
        return 0, None
    rng = None     # RNG states are per rank: they carry over on the same layout only
    states = checkpoint.trainer_states(path)
    same_layout = len(states) == world and states[0]["zero_stage"] == engine.zero_optimization_stage()
    if same_layout:
        checkpoint.load(engine, path)
        mine = states[rank]
        if pruner is not None:
            pruner.load_state_dict(mine["pruner"])
        rng = mine["rng"]
    else:
        set_full_weights(engine, checkpoint.fp32_weights(path))
        lr_scheduler.load_state_dict(states[0]["lr_scheduler"])
        mine = states[min(rank, len(states) - 1)]
        if pruner is not None:
            pruner.load_mask_pieces([s["pruner"]["masks"] for s in states])
            pruner.clock.load_state_dict(states[0]["pruner"]["clock"])
            shards.apply_masks(pruner)
        if rank == 0:
            print(f"resumed {path.name} saved by {len(states)} ranks (ZeRO-{states[0]['zero_stage']}) on {world} ranks "
                  f"(ZeRO-{engine.zero_optimization_stage()}): weights, masks, LR schedule and data position "
                  f"carried over; optimizer moments restart")
    batches.load_state_dict(states[0]["batches"])
    collator.load_state_dict(mine["collator"])
    if rank == 0:
        print(f"resumed from {path} at step {states[0]['step']}")
    return int(states[0]["step"]), rng
