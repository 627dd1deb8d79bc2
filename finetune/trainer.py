"""Transfer: fine-tune a (sparse) pre-trained model on a task with its zeros locked, distilling from
a dense task teacher, on Accelerate (plain DDP or its DeepSpeed plugin).

The same recipe trains the dense task teacher (``model.pattern_lock: false``, no
``distillation.teacher``, ``lambda_task: 1``). Read top to bottom: setup, loop, checks, export.
Run: ``accelerate launch -m finetune --config RECIPE.yaml`` or ``prune-ofa finetune --config ...``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from sparse_pretrain.atomic import write_text
from sparse_pretrain.distill import soft_cross_entropy
from sparse_pretrain.masks import find_prunable
from sparse_pretrain.pattern_lock import PatternLock

from .config import FinetuneRecipe
from .tasks import (check_teacher_labels, classification_metrics, load_task, task_spec,
                    tokenize_classification)


def make_accelerator():
    """Under a launcher, the process group with the backend this machine has (gloo on CPU: Accelerate's
    DeepSpeed plugin needs it said); one plain process otherwise."""
    import os

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Accelerator()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend=backend)])


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


@torch.no_grad()
def evaluate(accelerator, model, loader, metrics) -> dict:
    model.eval()
    predictions, labels = [], []
    for batch in loader:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        preds, refs = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        predictions.append(preds.cpu().numpy())
        labels.append(refs.cpu().numpy())
    model.train()
    return classification_metrics(np.concatenate(predictions), np.concatenate(labels), metrics)


def run(recipe: FinetuneRecipe) -> dict:
    from torch.utils.data import DataLoader
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, get_linear_schedule_with_warmup)

    t, d = recipe.training, recipe.distillation
    spec = task_spec(recipe.task.name, recipe.task.text_columns, recipe.task.label_column, recipe.task.num_labels)
    data = load_task(spec, recipe.task.data_files, seed=t.seed)           # bad columns/labels fail here
    if d.teacher:
        check_teacher_labels(spec, AutoConfig.from_pretrained(d.teacher))   # before any weights load
    accelerator = make_accelerator()
    torch.manual_seed(t.seed)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    id2label = dict(enumerate(spec.label_names)) if spec.label_names else None
    model = AutoModelForSequenceClassification.from_pretrained(
        recipe.model.name_or_path, num_labels=spec.num_labels,
        **({"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}))
    if recipe.qat.enabled:   # fake-quantized encoder Linears, weights still the same Parameters
        from .quantization import prepare_qat
        prepare_qat(model, per_channel=recipe.qat.per_channel, reduce_range=recipe.qat.reduce_range)
    teacher = None
    if d.teacher:
        teacher = AutoModelForSequenceClassification.from_pretrained(d.teacher).eval().requires_grad_(False)

    with accelerator.main_process_first():
        tokenized = tokenize_classification(data, tokenizer, spec, recipe.task.max_seq_length)
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    train_loader = DataLoader(tokenized[spec.train_split], batch_size=t.batch_size, shuffle=True,
                              collate_fn=collate, generator=torch.Generator().manual_seed(t.seed))
    eval_loaders = {s: DataLoader(tokenized[s], batch_size=t.eval_batch_size, collate_fn=collate)
                    for s in spec.eval_splits}
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
    step = 0
    if (state_dir / "step.json").is_file():           # resume: weights, optimizer, scheduler, RNG, masks
        accelerator.load_state(str(state_dir))
        step = json.loads((state_dir / "step.json").read_text())["step"]
        if lock is not None:
            lock.load_state_dict(torch.load(state_dir / f"masks_rank{accelerator.process_index}.pt"))
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, disable=not accelerator.is_main_process, desc=f"finetune {spec.name}")
    history = []
    model.train()
    while step < total:
        for batch in train_loader:
            if step >= total:
                break
            out = model(**batch)
            loss = d.lambda_task * out.loss if teacher is not None else out.loss
            if teacher is not None:
                with torch.inference_mode():
                    teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
                loss = loss + d.lambda_kd * soft_cross_entropy(out.logits, teacher_logits.clone(), d.temperature)
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
            if (t.save_every and step % t.save_every == 0) or step == total:
                save_state(accelerator, state_dir, step, lock)
            if t.eval_every and step % t.eval_every == 0:
                history.append({"step": step, **{s: evaluate(accelerator, model, l, spec.metrics)
                                                 for s, l in eval_loaders.items()}})
    bar.close()

    # the pattern must be exactly what was loaded: a violation is an error
    if lock is not None:
        lock.verify()
    results = {s: evaluate(accelerator, model, loader, spec.metrics) for s, loader in eval_loaders.items()}
    sparsity_after = lock.sparsity() if lock else None
    summary = {"task": spec.name, "steps": step, "metrics": results, "history": history,
               "sparsity": sparsity_after["global"] if lock else None,
               "sparsity_unchanged": (sparsity_after == sparsity_before) if lock else None,
               "distilled_from": d.teacher, "lambda_kd": d.lambda_kd if teacher is not None else 0.0,
               "lambda_task": d.lambda_task if teacher is not None else 1.0}
    accelerator.wait_for_everyone()
    model_dir = output_dir / "model"
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process and recipe.qat.enabled:
        summary.update(export_int8(accelerator.unwrap_model(model), lock, tokenizer, output_dir / "model-int8",
                                   tokenized, spec, collate, t.eval_batch_size))
    elif accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(model_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
    if accelerator.is_main_process:
        write_text(output_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
        print(json.dumps({"metrics": results, "sparsity": summary["sparsity"]}))
    accelerator.wait_for_everyone()
    return summary


def export_int8(qat_model, lock, tokenizer, out_dir: Path, tokenized, spec, collate, batch_size: int) -> dict:
    """Convert the fake-quantized model to real int8 weights, export it, reload the export and
    evaluate it on CPU; check that its int8 weights are zero exactly where the masks say."""
    from torch.utils.data import DataLoader

    from .quantization import convert_to_int8, int8_modules, load_quantized, save_quantized
    int8 = convert_to_int8(qat_model.cpu())
    save_quantized(int8, out_dir)
    tokenizer.save_pretrained(out_dir)
    reloaded = load_quantized(out_dir).eval()
    metrics = {}
    for split in spec.eval_splits:
        predictions, labels = [], []
        for batch in DataLoader(tokenized[split], batch_size=batch_size, collate_fn=collate):
            with torch.no_grad():
                logits = reloaded(**{k: v for k, v in batch.items() if k != "labels"}).logits
            predictions.append(logits.argmax(-1).numpy())
            labels.append(batch["labels"].numpy())
        metrics[split] = classification_metrics(np.concatenate(predictions), np.concatenate(labels), spec.metrics)
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
    """Accelerate's own state (model, optimizer, scheduler, RNG) plus this rank's masks; the step file
    that marks the state complete is written last."""
    accelerator.save_state(str(state_dir))
    if lock is not None:
        from sparse_pretrain.atomic import torch_save
        torch_save(lock.state_dict(), state_dir / f"masks_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text(state_dir / "step.json", json.dumps({"step": step}) + "\n")
    accelerator.wait_for_everyone()
