"""Transfer: fine-tune a (sparse) pre-trained model on a task with its zeros locked, distilling from
a dense task teacher, on Accelerate (plain DDP or its DeepSpeed plugin).

Sentence (pair) classification and SQuAD share the loop; `heads.py` holds what differs. The same
recipe trains the dense task teacher (``model.pattern_lock: false``, no
``distillation.teacher``, ``lambda_task: 1``). Read top to bottom: setup, loop, checks, export.
Run: ``accelerate launch -m finetune --config RECIPE.yaml`` or ``prune-ofa finetune --config ...``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sparse_pretrain.atomic import write_text
from sparse_pretrain.distill import soft_cross_entropy
from sparse_pretrain.masks import find_prunable
from sparse_pretrain.pattern_lock import PatternLock
from sparse_pretrain.preemption import PREEMPTED_MARKER, REQUEUE_EXIT_CODE, PreemptionWatch, max_all_reduce

from .config import FinetuneRecipe
from .heads import head_for

LABEL_COLUMNS = ("labels", "start_positions", "end_positions")


def make_accelerator(seed: int):
    """Under a launcher, the process group with the backend this machine has (gloo on CPU: Accelerate's
    DeepSpeed plugin needs it said); one plain process otherwise. The training order is a function of
    (seed, epoch) alone (Accelerate's seedable sampler), so a resumed run sees the same batches."""
    import os

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    from launcher.rendezvous import export_torch_env
    export_torch_env()            # srun started every rank: RANK, WORLD_SIZE, ... from SLURM's variables
    data = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Accelerator(dataloader_config=data)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return Accelerator(dataloader_config=data, kwargs_handlers=[InitProcessGroupKwargs(backend=backend)])


def pattern_lock_for(accelerator, model, prepared_model, min_sparsity: float):
    """Masks from the zeros of the loaded weights, kept where this engine keeps its weights: in the
    module (DDP), or in DeepSpeed's fp32 partitions through the optimizer's step hooks."""
    named = find_prunable(model)
    if accelerator.state.deepspeed_plugin is not None:
        from sparse_pretrain.zero_shards import ZeroShards
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


def evaluate(accelerator, model, head, loaders: dict) -> dict:
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
    head = head_for(recipe.task)
    data = head.load(recipe.task.data_files, seed=t.seed)           # bad columns/labels fail here
    if d.teacher:
        head.check_teacher(AutoConfig.from_pretrained(d.teacher))   # before any weights load
    accelerator = make_accelerator(t.seed)
    watch = PreemptionWatch(all_reduce=max_all_reduce(), watch_file=accelerator.is_main_process)
    torch.manual_seed(t.seed)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    model = head.model_class().from_pretrained(recipe.model.name_or_path, **head.model_kwargs())
    if recipe.qat.enabled:   # fake-quantized encoder Linears, weights still the same Parameters
        from .quantization import prepare_qat
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
    scheduler = get_linear_schedule_with_warmup(optimizer, int(t.warmup_ratio * total), total)
    unwrapped = model
    model, optimizer, train_loader, scheduler, *eval_list = accelerator.prepare(
        model, optimizer, train_loader, scheduler, *eval_loaders.values())
    eval_loaders = dict(zip(eval_loaders, eval_list))
    if teacher is not None:
        teacher.to(accelerator.device)
    lock, hooked = (pattern_lock_for(accelerator, unwrapped, model, recipe.model.min_sparsity)
                    if recipe.model.pattern_lock else (None, False))
    sparsity_before = lock.sparsity() if lock else None

    output_dir = Path(t.output_dir)
    state_dir = output_dir / "state"
    step = resumed_from = 0
    latest = latest_state(state_dir)
    if latest is not None:                            # resume: weights, optimizer, scheduler, RNG, masks
        accelerator.load_state(str(latest))
        step = resumed_from = json.loads((latest / "step.json").read_text())["step"]
        if lock is not None:
            lock.load_state_dict(torch.load(latest / f"masks_rank{accelerator.process_index}.pt"))
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
            if lock is not None and not hooked:
                lock.mask_gradients()
            if t.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if lock is not None and not hooked:
                lock.apply_masks()
            step += 1
            bar.update(1)
            if step % 10 == 0 and accelerator.is_main_process:   # a host sync only every 10 steps
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            # preemption (SLURM's warning signal, or the stop file): save this step, then stop for a requeue
            stop = step < total and watch.should_stop()          # one all-reduce of one int, every rank
            periodic = step % t.save_every == 0 if t.save_every else step % len(train_loader) == 0
            if periodic or step == total or stop:
                save_state(accelerator, state_dir, step, lock)
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
    bar.close()
    watch.close()
    if accelerator.is_main_process:   # a finished run is not a preempted one, whatever an earlier attempt left
        (output_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        watch.clear_stop_file()

    # the pattern must be exactly what was loaded: a violation is an error
    if lock is not None:
        lock.verify()
    results = evaluate(accelerator, model, head, eval_loaders)
    sparsity_after = lock.sparsity() if lock else None
    summary = {"task": recipe.task.name, "steps": step, "resumed_from_step": resumed_from, "metrics": results, "history": history,
               "sparsity": sparsity_after["global"] if lock else None,
               "sparsity_unchanged": (sparsity_after == sparsity_before) if lock else None,
               "distilled_from": d.teacher, "lambda_kd": d.lambda_kd if teacher is not None else 0.0,
               "lambda_task": d.lambda_task if teacher is not None else 1.0}
    accelerator.wait_for_everyone()
    model_dir = output_dir / "model"
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process and recipe.qat.enabled:
        summary.update(export_int8(accelerator.unwrap_model(model), lock, tokenizer, output_dir / "model-int8",
                                   head, features, t.eval_batch_size))
    elif accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(model_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
    if accelerator.is_main_process:
        write_text(output_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
        print(json.dumps({"metrics": results, "sparsity": summary["sparsity"]}))
    accelerator.wait_for_everyone()
    return summary


def export_int8(qat_model, lock, tokenizer, out_dir: Path, head, features, batch_size: int) -> dict:
    """Convert the fake-quantized model to real int8 weights, export it, reload the export and
    evaluate it on CPU; check that its int8 weights are zero exactly where the masks say."""
    from torch.utils.data import DataLoader

    from .quantization import convert_to_int8, int8_modules, load_quantized, save_quantized
    int8 = convert_to_int8(qat_model.cpu())
    save_quantized(int8, out_dir)
    tokenizer.save_pretrained(out_dir)
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


def save_state(accelerator, state_dir: Path, step: int, lock) -> None:
    """Accelerate's own state (model, optimizer, scheduler, RNG) plus this rank's masks, in a new
    directory per step; ``latest`` names it only once every rank has written, and older states go
    then. A run killed while saving resumes from the previous complete state."""
    import shutil
    target = state_dir / f"step_{step:08d}"
    accelerator.save_state(str(target))
    if lock is not None:
        from sparse_pretrain.atomic import torch_save
        torch_save(lock.state_dict(), target / f"masks_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text(target / "step.json", json.dumps({"step": step}) + "\n")
        write_text(state_dir / "latest", target.name + "\n")
        for old in state_dir.glob("step_*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def latest_state(state_dir: Path) -> Path | None:
    """The newest complete state saved by :func:`save_state`, or None."""
    latest = state_dir / "latest"
    if not latest.is_file():
        return None
    target = state_dir / latest.read_text().strip()
    return target if (target / "step.json").is_file() else None
