"""Transfer: fine-tune a (sparse) pre-trained model on a task with its zeros locked, distilling from
a dense task teacher, on Accelerate (plain DDP or its DeepSpeed plugin).

Sentence (pair) classification and SQuAD share the loop; `heads.py` holds what differs. The same
recipe trains the dense task teacher (``model.pattern_lock: false``, no
``distillation.teacher``, ``lambda_task: 1``), and, with a ``pruning`` section, prunes a dense model
while fine-tuning it (the paper's fine-tune pruning baseline: the pre-training recipe's gradual
pruner and schedule, on fine-tuning steps). Read top to bottom: setup, loop, checks, export.
Run: ``accelerate launch -m finetune --config RECIPE.yaml`` or ``prune-ofa finetune --config ...``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import torch

from sparse_pretrain.runtime.atomic import replacing_dir, write_text
from sparse_pretrain.recipe import check_against_model
from sparse_pretrain.core.distill import soft_cross_entropy
from sparse_pretrain.core.masks import find_prunable, whole_parameters
from sparse_pretrain.core.pattern_lock import PatternLock
from sparse_pretrain.runtime.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE, PreemptionWatch, max_all_reduce
from sparse_pretrain.core.pruner import GradualPruner
from sparse_pretrain.runtime.run_identity import (check_run, discard_run, files_identity, model_identity, record_run,
                                          run_identity)

from finetune.recipe import FinetuneRecipe
from finetune.heads import head_for

LABEL_COLUMNS = ("labels", "start_positions", "end_positions")

#: Recipe keys left out of the run's identity (``sparse_pretrain/runtime/run_identity.py``): a run that differs
#: only in these trains exactly the same weights, so it may resume the recorded one.
NOT_IN_IDENTITY = (
    "training.output_dir",         # where the run writes (the directory the record is in)
    "training.eval_batch_size",     # evaluation only: how many held-out rows per forward; nothing trains on it
    "training.eval_every",         # when to evaluate: evaluation changes no weight and no RNG (see evaluate)
    "training.save_every",         # when to save a state: a save draws no random number, and a resume from
                                   # any saved step is bitwise the uninterrupted run (tests/test_finetune_resume.py)
    "model.min_sparsity",          # a check of the loaded model: the run stops before training or is unchanged
    # paths of inputs: identified by their contents instead (``inputs.*``; data files by name and bytes),
    # so a moved copy is the same run and a model or data file rewritten in place is another one
    "model.name_or_path", "distillation.teacher", "task.data_files", "task.data_files.",
)


def data_identity(task) -> dict:
    """The task data's identity: a digest of each local split file; the packaged RT file; else
    the hub task's name (its data is the hub's, named by ``task.name``)."""
    if task.data_files:
        return {f"data.{split}": files_identity([paths] if isinstance(paths, (str, Path)) else list(paths))
                for split, paths in sorted(task.data_files.items())}
    if task.name == "rt-sentiment":
        from finetune.tasks.classification import rt_sentiment_path
        return {"data": files_identity([rt_sentiment_path()])}
    return {"data": f"hub:{task.name}"}


def finetune_identity(recipe: FinetuneRecipe) -> dict:
    """What defines this fine-tuning (or QAT) run: every recipe key that changes results (all but
    :data:`NOT_IN_IDENTITY`), and the contents of the model, the teacher and the data. Cheap: a
    large weight file is read at both ends only."""
    return run_identity(recipe.to_dict(), NOT_IN_IDENTITY, {
        "model": model_identity(recipe.model.name_or_path),
        "teacher": model_identity(recipe.distillation.teacher), **data_identity(recipe.task)})


def make_accelerator(seed: int, logging_dir: Path | None = None):
    """Under a launcher, the process group with the backend this machine has (gloo on CPU: Accelerate's
    DeepSpeed plugin needs it said); one plain process otherwise. The training order is a function of
    (seed, epoch) alone (Accelerate's seedable sampler), so a resumed run sees the same batches."""
    import os

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    from sparse_pretrain.runtime.rendezvous import export_torch_env
    export_torch_env()            # srun started every rank: RANK, WORLD_SIZE, ... from SLURM's variables
    data = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)
    # the LR schedule counts optimizer steps of this loop (already per process); by default Accelerate
    # would step it once per process per optimizer step, ending the schedule early under N processes
    options = {"dataloader_config": data, "step_scheduler_with_optimizer": False}
    if logging_dir is not None:   # TensorBoard through Accelerate's tracker: <logging_dir>/tensorboard, rank 0
        from accelerate.utils import ProjectConfiguration
        options.update(log_with="tensorboard",
                       project_config=ProjectConfiguration(project_dir=str(logging_dir), logging_dir=str(logging_dir)))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from sparse_pretrain.zero.runtime import skip_cpu_shm_build
        skip_cpu_shm_build()      # Accelerate's DeepSpeed plugin starts DeepSpeed's runtime: no ~60 s op build
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Accelerator(**options)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return Accelerator(**options, kwargs_handlers=[InitProcessGroupKwargs(backend=backend)])


def pattern_lock_for(accelerator, model, prepared_model, min_sparsity: float):
    """Masks from the zeros of the loaded weights, kept where this engine keeps its weights: in the
    module (DDP), or in DeepSpeed's fp32 partitions through the optimizer's step hooks."""
    named = find_prunable(model)
    if accelerator.state.deepspeed_plugin is not None:
        from sparse_pretrain.zero.shards import ZeroShards
        engine = prepared_model
        names = {id(p): n for n, p in engine.module.named_parameters()}
        shards = ZeroShards(engine, [(names[id(p)], p) for _, p in named])
        lock = PatternLock(shards.params, all_reduce=shards.all_reduce())
        shards.install(lock)
        hooked = True
    else:
        lock = PatternLock.from_model(model)
        hooked = False
    sparsity = lock.sparsity()["global"]
    if sparsity < min_sparsity:
        raise ValueError(f"model.pattern_lock: the model is {sparsity:.1%} sparse, below model.min_sparsity "
                         f"({min_sparsity:.0%}); pattern-lock needs a sparse pre-trained model (or set "
                         f"model.pattern_lock=false to fine-tune a dense one)")
    return lock, hooked


def pruner_for(accelerator, model, prepared_model, prune_recipe):
    """The gradual pruner over the weights ``prune_recipe`` selects, with masks where this engine
    keeps its weights, as ``pattern_lock_for`` does: whole tensors (DDP, one process), or this
    rank's ZeRO partitions, kept zero inside the optimizer step (DeepSpeed plugin). Returns the
    pruner and the ZeRO adapter (None under DDP)."""
    named = check_against_model(prune_recipe, model)            # bad include/block shape: ConfigError
    method, schedule, scope = prune_recipe.pruning_method(), prune_recipe.gmp_schedule(), prune_recipe.pruning.scope
    if accelerator.state.deepspeed_plugin is None:
        return GradualPruner(whole_parameters(named), method, schedule, scope), None
    from sparse_pretrain.zero.shards import ZeroShards
    engine = prepared_model
    names = {id(p): n for n, p in engine.module.named_parameters()}
    shards = ZeroShards(engine, [(names[id(p)], p) for _, p in named])
    rank, world = shards.shard_world()
    pruner = GradualPruner(shards.params, method, schedule, scope, all_reduce=shards.all_reduce(), rank=rank,
                           world_size=world)
    shards.install(pruner)
    return pruner, shards


def prune_after_step(pruner, shards):
    """After optimizer step t: recompute the masks when the schedule says so, and keep pruned weights
    zero (under DeepSpeed the step hooks keep the fp32 masters zero; after a mask update the working
    copies are refreshed). Returns the new target sparsity when the masks were recomputed."""
    if shards is None:
        return pruner.step()
    target = pruner.advance()
    if target is not None:
        pruner.apply_masks()
        shards.sync_working_copies()
    return target


def mask_update_record(step: int, target: float, pruner) -> dict:
    """What metrics.json records at a mask update: the schedule's target and the masks' sparsity,
    over all pruned weights and its lowest and highest layer (collective under DeepSpeed)."""
    report = pruner.sparsity()
    overall = report.pop("global")
    return {"step": step, "target": target, "sparsity": overall,
            "layer_min": min(report.values()), "layer_max": max(report.values())}


def evaluate(accelerator, model, head, loaders: dict) -> dict:
    """Metrics on every evaluation split, with dropout off, then back to train mode. The random
    number generators come out as they went in: an evaluation DataLoader's iterator draws its seed
    from the global generator, which would shift every later dropout mask, so the trained weights
    would depend on ``eval_every``, and a run resumed from a state saved just before an evaluation
    (its RNG saved before the draw) would leave the uninterrupted run's path."""
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        results = {split: head.evaluate(model, loader, split, accelerator.gather_for_metrics)
                   for split, loader in loaders.items()}
    model.train()
    return results


def distillation_loss(student_out, teacher_out, head, temperature: float) -> torch.Tensor:
    """Soft cross-entropy at temperature T, averaged over the head's logits (the class logits; or
    the start and end logits of SQuAD)."""
    pairs = list(zip(head.distilled_logits(student_out), head.distilled_logits(teacher_out)))
    return sum(soft_cross_entropy(s, t.clone(), temperature) for s, t in pairs) / len(pairs)


def run(recipe: FinetuneRecipe) -> dict:
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoTokenizer, get_linear_schedule_with_warmup

    t, d = recipe.training, recipe.distillation
    output_dir = Path(t.output_dir)
    state_dir = output_dir / "state"
    # another run's state or model in output_dir: refused here (ConfigError), before anything loads,
    # on every process alike (each reads the same record); or marked for discarding
    identity = finetune_identity(recipe)
    discard = check_run(output_dir, identity, t.discard_different_run)
    head = head_for(recipe.task)
    data = head.load(recipe.task.data_files, seed=t.seed)           # bad columns/labels fail here
    if d.teacher:
        head.check_teacher(AutoConfig.from_pretrained(d.teacher))   # before any weights load
    accelerator = make_accelerator(t.seed, output_dir)
    if accelerator.is_main_process:   # one process changes the directory, the others wait for it
        if discard:
            removed = discard_run(output_dir)
            print(f"training.discard_different_run: removed the different run's {', '.join(removed)} "
                  f"from {output_dir}", flush=True)
        remove_unfinished_states(state_dir)
    accelerator.wait_for_everyone()
    accelerator.init_trackers("tensorboard")     # the run's curves: tensorboard --logdir <output_dir>
    any_rank = max_all_reduce()                  # one int over the ranks: a save that failed anywhere
    watch = PreemptionWatch(all_reduce=max_all_reduce(), watch_file=accelerator.is_main_process)
    torch.manual_seed(t.seed)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    model = head.model_class().from_pretrained(recipe.model.name_or_path, **head.model_kwargs())
    if recipe.qat.enabled:   # fake-quantized encoder Linears, weights still the same Parameters
        from finetune.quantization import prepare_qat
        prepare_qat(model, per_channel=recipe.qat.per_channel, reduce_range=recipe.qat.reduce_range)
    teacher = None
    if d.teacher:
        teacher = head.model_class().from_pretrained(d.teacher).eval().requires_grad_(False)

    with accelerator.main_process_first():
        features = head.features(data, tokenizer)
    train_loader = DataLoader(features.train, batch_size=t.batch_size, shuffle=True,
                              collate_fn=features.collate, generator=torch.Generator().manual_seed(t.seed))
    eval_loaders = {s: DataLoader(f, batch_size=t.eval_batch_size, collate_fn=features.collate)
                    for s, f in features.eval.items()}
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes)
    total = t.max_steps or int(math.ceil(t.epochs * steps_per_epoch))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.learning_rate)
    warmup = int(t.warmup_ratio * total)
    # fine-tune pruning: the pre-training recipe's schedule, method and (rewound) LR over these steps
    prune_recipe = recipe.pruning.pretrain_recipe(total, warmup) if recipe.pruning else None
    if prune_recipe is not None and recipe.pruning.lr_rewind:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, prune_recipe.lr_factor())
    else:
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    unwrapped = model
    model, optimizer, train_loader, scheduler, *eval_list = accelerator.prepare(
        model, optimizer, train_loader, scheduler, *eval_loaders.values())
    eval_loaders = dict(zip(eval_loaders, eval_list))
    if teacher is not None:
        teacher.to(accelerator.device)
    lock, hooked = (pattern_lock_for(accelerator, unwrapped, model, recipe.model.min_sparsity)
                    if recipe.model.pattern_lock else (None, False))
    sparsity_before = lock.sparsity() if lock else None
    pruner, shards = pruner_for(accelerator, unwrapped, model, prune_recipe) if prune_recipe else (None, None)
    masked = lock if lock is not None else pruner        # whichever keeps zeros: gradients and weights
    hooked = hooked or shards is not None               # DeepSpeed: the optimizer's step hooks keep zeros
    mask_updates = []                                    # (fine-tune pruning) the masks at each update

    step = resumed_from = 0
    latest = latest_state(state_dir)
    if latest is not None:                            # resume: weights, optimizer, scheduler, RNG, masks
        accelerator.load_state(str(latest))
        saved = json.loads((latest / "step.json").read_text())
        step = resumed_from = saved["step"]
        if lock is not None:
            lock.load_state_dict(torch.load(latest / f"masks_rank{accelerator.process_index}.pt"))
        if pruner is not None:                        # masks, the schedule's clock, the updates so far
            pruner.load_state_dict(torch.load(latest / f"pruner_rank{accelerator.process_index}.pt"))
            mask_updates = saved["mask_updates"]
        accelerator.print(f"resumed from {latest} at step {step}")
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, disable=not accelerator.is_main_process,
               desc=f"{'qat' if recipe.qat.enabled else 'finetune'} {recipe.task.name}")
    history = []
    model.train()
    while step < total:
        epoch, done_in_epoch = divmod(step, len(train_loader))
        train_loader.set_epoch(epoch)            # this epoch's order; on resume, skip what was trained
        for batch in accelerator.skip_first_batches(train_loader, done_in_epoch) if done_in_epoch else train_loader:
            if step >= total:
                break
            out = model(**batch)
            loss = d.lambda_task * out.loss if teacher is not None else out.loss
            if teacher is not None:
                with torch.inference_mode():
                    teacher_out = teacher(**{k: v for k, v in batch.items() if k not in LABEL_COLUMNS})
                loss = loss + d.lambda_kd * distillation_loss(out, teacher_out, head, d.temperature)
            accelerator.backward(loss)
            if masked is not None and not hooked:
                masked.mask_gradients()
            if t.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if lock is not None and not hooked:
                lock.apply_masks()
            target = None
            if pruner is not None:                    # masks recomputed every f steps, zeros kept
                target = prune_after_step(pruner, shards)
                if target is not None:
                    mask_updates.append(mask_update_record(step, target, pruner))
            step += 1
            bar.update(1)
            if step % 10 == 0 and accelerator.is_main_process:   # a host sync only every 10 steps
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                accelerator.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0]}, step=step)
            if target is not None:                    # the masks were recomputed at this step
                accelerator.log({f"pruning/{k}": v for k, v in mask_updates[-1].items() if k != "step"}, step=step)
            # preemption (SLURM's warning signal, or the stop file): save this step, then stop for a requeue
            stop = step < total and watch.should_stop()          # one all-reduce of one int, every rank
            periodic = step % t.save_every == 0 if t.save_every else step % len(train_loader) == 0
            if periodic or step == total or stop:
                save_state(accelerator, state_dir, step, lock, pruner,
                           {"mask_updates": mask_updates} if pruner else None, run=(output_dir, identity),
                           any_rank=any_rank)
            if stop:
                bar.close()
                accelerator.print(f"preempted ({watch.reason()}) after step {step}: state saved, exiting with "
                                  f"{REQUEUE_EXIT_CODE} for a requeue")
                if accelerator.is_main_process:
                    write_text(output_dir / PREEMPTED_MARKER, f"{step}\n")
                    watch.clear_stop_file()
                accelerator.wait_for_everyone()
                raise SystemExit(REQUEUE_EXIT_CODE)
            if t.eval_every and step % t.eval_every == 0:
                history.append({"step": step, **evaluate(accelerator, model, head, eval_loaders)})
                accelerator.log(eval_scalars(history[-1]), step=step)
    bar.close()
    watch.close()
    if accelerator.is_main_process:   # a finished run is not a preempted one, whatever an earlier attempt left
        (output_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        watch.clear_stop_file()

    # no pruned weight may be nonzero (pattern-lock: exactly the loaded pattern): a violation is an error
    if masked is not None:
        masked.verify()
    results = evaluate(accelerator, model, head, eval_loaders)
    accelerator.log(eval_scalars(results), step=step)
    sparsity_after = masked.sparsity() if masked is not None else None
    summary = {"task": recipe.task.name, "steps": step, "resumed_from_step": resumed_from, "metrics": results, "history": history,
               "sparsity": sparsity_after["global"] if masked is not None else None,
               "sparsity_unchanged": (sparsity_after == sparsity_before) if lock else None,
               "distilled_from": d.teacher, "lambda_kd": d.lambda_kd if teacher is not None else 0.0,
               "lambda_task": d.lambda_task if teacher is not None else 1.0}
    if pruner is not None:                            # fine-tune pruning: how the masks got there, per layer
        layers = {name: s for name, s in sparsity_after.items() if name != "global"}
        summary["pruning"] = {"method": pruner.method.name, **pruner.method.options(), "scope": pruner.scope,
                              "schedule": dataclasses.asdict(pruner.schedule), "lr_rewind": recipe.pruning.lr_rewind,
                              "updates": mask_updates, "layers": layers}
    accelerator.wait_for_everyone()
    model_dir = output_dir / "model"
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process and recipe.qat.enabled:
        summary.update(export_int8(accelerator.unwrap_model(model), lock, tokenizer, output_dir / "model-int8",
                                   head, features, t.eval_batch_size))
    elif accelerator.is_main_process:
        with replacing_dir(model_dir) as tmp:    # complete or absent, never half-written
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    if accelerator.is_main_process:
        write_text(output_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
        print(json.dumps({"metrics": results, "sparsity": summary["sparsity"]}))
    for tracker in accelerator.trackers:         # flush and close TensorBoard (end_training would also
        tracker.finish()                         # destroy the process group, which the caller may still use)
    accelerator.wait_for_everyone()
    return summary


def eval_scalars(results: dict) -> dict:
    """``{split: {metric: value}}`` as TensorBoard scalars ``eval/<split>/<metric>`` (numbers only)."""
    return {f"eval/{split}/{name}": value for split, metrics in results.items() if isinstance(metrics, dict)
            for name, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def export_int8(qat_model, lock, tokenizer, out_dir: Path, head, features, batch_size: int) -> dict:
    """Convert the fake-quantized model to real int8 weights, export it, reload the export and
    evaluate it on CPU; check that its int8 weights are zero exactly where the masks say."""
    from torch.utils.data import DataLoader

    from finetune.quantization import convert_to_int8, int8_modules, load_quantized, save_quantized
    int8 = convert_to_int8(qat_model.cpu())
    save_quantized(int8, out_dir, tokenizer)
    reloaded = load_quantized(out_dir).eval()
    metrics = {split: head.evaluate(reloaded, DataLoader(f, batch_size=batch_size, collate_fn=features.collate), split)
               for split, f in features.eval.items()}
    violations = 0
    if lock is not None:
        masks = lock.full_masks()
        for name, module in int8_modules(reloaded).items():
            mask = masks.get(f"{name}.weight")
            if mask is not None:
                violations += int((module.weight().int_repr() != 0)[~mask].sum())
        if violations:
            raise RuntimeError(f"int8 export: {violations} pruned weights are nonzero after quantization")
    return {"int8_model": str(out_dir), "int8_metrics": metrics,
            "int8_pruned_nonzero": violations if lock is not None else None}


PARTIAL = ".partial-"   # the name a state is written under until every rank has written its part


def save_state(accelerator, state_dir: Path, step: int, lock, pruner=None, record: dict | None = None,
               run: tuple | None = None, any_rank=lambda failed: failed) -> None:
    """Accelerate's own state (model, optimizer, scheduler, RNG) plus this rank's masks (pattern-lock)
    or pruner state (masks, the schedule's clock), with ``record`` in its step.json, written under a
    temporary name (``.partial-step_N``) that becomes ``step_N`` only once every rank has written;
    then ``latest`` names it and older states go. A run killed while saving, or a save that fails
    (a full disk, on any rank: ``any_rank`` tells them all), leaves the previous state complete and
    named by ``latest``: the failed part is removed at once, or by the next start.
    ``run``: ``(output_dir, identity)``, the run's record, written before its first state."""
    from sparse_pretrain.runtime.atomic import torch_save
    from sparse_pretrain.runtime.pause_points import pause
    name = f"step_{step:08d}"
    partial, target = state_dir / f"{PARTIAL}{name}", state_dir / name
    failure = None
    try:
        if run is not None and accelerator.is_main_process:
            record_run(*run)           # no state without the record of the run it belongs to
        accelerator.save_state(str(partial))
        if lock is not None:
            torch_save(lock.state_dict(), partial / f"masks_rank{accelerator.process_index}.pt")
        if pruner is not None:
            torch_save(pruner.state_dict(), partial / f"pruner_rank{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            write_text(partial / "step.json", json.dumps({"step": step, **(record or {})}) + "\n")
    except Exception as err:           # a full disk (OSError; torch.save: RuntimeError), on any rank: all
        failure = err                  # must learn of it, or the others wait for this one forever
    if any_rank(int(failure is not None)):    # (also the barrier: every rank's part is written)
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        error = save_failure(state_dir, step, failure)
        if error is failure:
            raise failure
        raise error from failure
    pause("save_state", step, partial, accelerator.process_index)  # tests: killed with every part written
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if target.exists():            # a complete state a kill left unnamed by latest: this one replaces it
            shutil.rmtree(target)
        partial.rename(target)         # atomic: the state is there whole or not at all
        write_text(state_dir / "latest", name + "\n")
        for old in state_dir.glob("step_*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_failure(state_dir: Path, step: int, failure: Exception | None) -> Exception:
    """The error of a failed save: an OSError (a user error) saying what failed, what is left and
    the space a state takes, when the files could not be written here (``OSError``, or torch.save's
    RuntimeError for a short write) or on another rank; any other exception is a bug, raised as it is."""
    writing = isinstance(failure, OSError) or (isinstance(failure, RuntimeError) and any(
        words in str(failure) for words in ("write failed", "unexpected pos")))   # torch.save on a full disk
    if failure is not None and not writing:
        return failure
    previous = latest_state(state_dir)
    if failure is None:
        cause = "on another rank, whose message says why"
    elif isinstance(failure, OSError) and failure.strerror:
        cause = failure.strerror + (f": {failure.filename}" if failure.filename else "")
    else:
        cause = str(failure).strip().splitlines()[-1]
    space = ""
    if previous is not None:
        needed = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file())
        space = (f" (a state takes about {needed / 2**20:.0f} MiB; {shutil.disk_usage(state_dir).free / 2**20:.0f} "
                 f"MiB are free)")
    left = (f"{previous} is intact and a rerun resumes from it" if previous is not None
            else "no earlier state exists: a rerun starts afresh")
    message = (f"training.output_dir: saving the training state at step {step} into {state_dir} failed ({cause}); "
               f"the partial state was removed, {left}. Free space{space} and rerun")
    return OSError(failure.errno, message) if isinstance(failure, OSError) and failure.errno else OSError(message)


def remove_unfinished_states(state_dir: Path) -> None:
    """What a run killed while saving left in ``state_dir``: states still under their temporary
    name, and complete ones ``latest`` does not name (killed before it moved). Main process, at start."""
    if not state_dir.is_dir():
        return
    latest = latest_state(state_dir)
    for path in list(state_dir.glob(f"{PARTIAL}*")) + list(state_dir.glob("step_*")):
        if path.is_dir() and path != latest:
            shutil.rmtree(path)


def latest_state(state_dir: Path) -> Path | None:
    """The newest complete state saved by :func:`save_state`, or None."""
    latest = state_dir / "latest"
    if not latest.is_file():
        return None
    target = state_dir / latest.read_text().strip()
    return target if (target / "step.json").is_file() else None
