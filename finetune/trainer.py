"""Transfer: fine-tune a (sparse) pre-trained model on a task with its zeros locked, distilling from
a dense task teacher, on Accelerate (plain DDP or its DeepSpeed plugin).

Sentence (pair) classification and SQuAD share the loop; `heads.py` holds what differs. The same
recipe trains the dense task teacher (``model.pattern_lock: false``, no
``distillation.teacher``, ``lambda_task: 1``), and, with a ``pruning`` section, prunes a dense model
while fine-tuning it (the paper's fine-tune pruning baseline: the pre-training recipe's gradual
pruner and schedule, on fine-tuning steps). Read top to bottom: setup, loop, checks, export.
Where the masks live and how the state is saved is the engine adapter's (``engine.py``: DDP or the
DeepSpeed plugin); the state follows the checkpoint protocol both recipes share.
Precision (``training.precision``, :func:`run_precision`): the student's forward, the teacher's and
every evaluation run under the same autocast (bf16 or fp16) or none (fp32); the weights stay fp32.
Run: ``accelerate launch -m finetune --config RECIPE.yaml`` or ``prune-ofa finetune --config ...``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from finetune.engine import adapter_for
from finetune.heads import head_for
from finetune.monitoring import LOG_EVERY, TrainingWindow, eval_scalars, evaluation_due
from finetune.recipe import FinetuneRecipe
from sparse_pretrain.core.distill import KDTerms, distillation_terms
from sparse_pretrain.core.masks import describe_selection, whole_parameters
from sparse_pretrain.core.pruner import GradualPruner
from sparse_pretrain.runtime import checkpoints
from sparse_pretrain.runtime.atomic import replacing_dir, write_text
from sparse_pretrain.runtime.optimizer import optimizer_groups
from sparse_pretrain.runtime.precision import autocast, enable_tf32, resolve_precision
from sparse_pretrain.runtime.preemption import PreemptionWatch, max_all_reduce
from sparse_pretrain.runtime.run_identity import check_run, discard_run, files_identity, model_identity, run_identity
from sparse_pretrain.runtime.schema import ConfigError

LABEL_COLUMNS = ("labels", "start_positions", "end_positions")

#: Recipe keys left out of the run's identity (``sparse_pretrain/runtime/run_identity.py``): a run that differs
#: only in these trains exactly the same weights, so it may resume the recorded one.
NOT_IN_IDENTITY = (
    "training.output_dir",         # where the run writes (the directory the record is in)
    "training.eval_batch_size",     # evaluation only: how many held-out rows per forward; nothing trains on it
    "training.eval_every",         # when to evaluate: evaluation changes no weight and no RNG (see evaluate)
    # when to save a state: a save draws no random number, and a resume from any saved step is bitwise
    # the uninterrupted run (tests/recipes/test_finetune_resume.py)
    "training.save_every",
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
    from finetune.tasks.classification import OFFLINE_FILES, offline_task_files
    if task.name in OFFLINE_FILES:
        return {"data": files_identity(offline_task_files(task.name))}
    return {"data": f"hub:{task.name}"}


def finetune_identity(recipe: FinetuneRecipe, precision: str | None = None) -> dict:
    """What defines this fine-tuning (or QAT) run: every recipe key that changes results (all but
    :data:`NOT_IN_IDENTITY`), and the contents of the model, the teacher and the data. Cheap: a
    large weight file is read at both ends only. ``precision``: the one ``training.precision``
    resolved to (:func:`run_precision`), recorded instead of the request, so that ``auto`` on a GPU
    (bf16) and on a CPU (fp32) are different runs and ``auto`` and ``fp32`` on a CPU the same one.
    An fp32 run's identity is what it was before the key existed."""
    tree = recipe.to_dict()
    if precision is not None:
        tree["training"]["precision"] = precision
    if tree["training"]["precision"] == "fp32":   # the one precision before the key existed: those runs resume
        del tree["training"]["precision"]
    if tree["task"]["labels"] is None:   # no label map given (an inferred one is the data's): as before the key
        del tree["task"]["labels"]
    return run_identity(tree, NOT_IN_IDENTITY, {
        "model": model_identity(recipe.model.name_or_path),
        "teacher": model_identity(recipe.distillation.teacher), **data_identity(recipe.task)})


def uses_deepspeed() -> bool:
    """Whether this process runs Accelerate's DeepSpeed plugin (``accelerate launch --use_deepspeed``)."""
    import os
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def training_device_type() -> str:
    """The device type Accelerate will train this process on, known before it starts: cuda where torch
    sees a GPU, unless ``ACCELERATE_USE_CPU`` is set (``prune-ofa launch`` sets it for CPU runs)."""
    from accelerate.utils import parse_flag_from_env
    return "cuda" if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU") else "cpu"


def run_precision(recipe: FinetuneRecipe, device_type: str) -> str:
    """The precision the run trains, evaluates and runs its teacher in (``bf16``, ``fp16`` or ``fp32``),
    or a ConfigError naming ``training.precision``, before anything loads. QAT: fp32 (the recipe
    refuses bf16/fp16 for it, saying why)."""
    if recipe.qat.enabled:
        return "fp32"
    precision = resolve_precision(recipe.training.precision, device_type, "training.precision", ConfigError)
    if precision == "fp16" and uses_deepspeed():
        raise ConfigError("training.precision: fp16 under Accelerate's DeepSpeed plugin is not supported (its loss "
                          "scaling exists only in DeepSpeed's fp16 mode, which keeps 16-bit weights); use bf16 or "
                          "fp32, or plain DDP (no ZeRO stage) for fp16")
    return precision


def make_accelerator(seed: int, logging_dir: Path | None = None, precision: str = "fp32"):
    """Under a launcher, the process group with the backend this machine has (gloo on CPU: Accelerate's
    DeepSpeed plugin needs it said); one plain process otherwise. The training order is a function of
    (seed, epoch) alone (Accelerate's seedable sampler), so a resumed run sees the same batches.

    ``precision`` (resolved) becomes ``Accelerator(mixed_precision=...)``, which Accelerate prefers to
    ``ACCELERATE_MIXED_PRECISION`` (what ``accelerate launch --mixed_precision`` and its config file
    set), so the recipe decides: under DDP, autocast around the prepared model's forward (and loss
    scaling for fp16). Under the DeepSpeed plugin Accelerate would hand bf16 to DeepSpeed's bf16 mode
    (bf16 weights, LayerNorm and softmax in bf16, a bf16 exported model): there it gets "no", and the
    loop's own autocast (:func:`~sparse_pretrain.runtime.precision.autocast`) gives the same mixed
    precision as under DDP, with fp32 weights."""
    import os

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    from sparse_pretrain.runtime.rendezvous import export_torch_env
    export_torch_env()            # srun started every rank: RANK, WORLD_SIZE, ... from SLURM's variables
    data = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)
    # the LR schedule counts optimizer steps of this loop (already per process); by default Accelerate
    # would step it once per process per optimizer step, ending the schedule early under N processes
    mixed = "no" if precision == "fp32" or uses_deepspeed() else precision
    options = {"dataloader_config": data, "step_scheduler_with_optimizer": False, "mixed_precision": mixed}
    if logging_dir is not None:   # TensorBoard through Accelerate's tracker: <logging_dir>/tensorboard, rank 0
        from accelerate.utils import ProjectConfiguration
        options.update(log_with="tensorboard",
                       project_config=ProjectConfiguration(project_dir=str(logging_dir), logging_dir=str(logging_dir)))
    if uses_deepspeed():
        from sparse_pretrain.zero.patches import skip_cpu_shm_build
        skip_cpu_shm_build()      # Accelerate's DeepSpeed plugin starts DeepSpeed's runtime: no ~60 s op build
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Accelerator(**options)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return Accelerator(**options, kwargs_handlers=[InitProcessGroupKwargs(backend=backend)])


def pruner_for(accelerator, model, prepared_model, pruning):
    """The gradual pruner over the weights the ``pruning`` section selects, with masks where this engine
    keeps its weights, as ``DDPAdapter.lock_pattern`` does: whole tensors (DDP, one process), or this
    rank's ZeRO partitions, kept zero inside the optimizer step (DeepSpeed plugin). Returns the
    pruner and the ZeRO adapter (None under DDP)."""
    named = pruning.check_against_model(model)                  # bad include/block shape: ConfigError
    method, schedule, scope = pruning.pruning_method(), pruning.gmp_schedule(), pruning.scope
    if accelerator.state.deepspeed_plugin is None:
        return GradualPruner(whole_parameters(named), method, schedule, scope), None
    from sparse_pretrain.zero.shards import ZeroShards
    shards = ZeroShards.for_parameters(prepared_model, named)
    rank, world = shards.shard_world()
    pruner = GradualPruner(shards.params, method, schedule, scope, all_reduce=shards.all_reduce(), rank=rank,
                           world_size=world)
    shards.install(pruner)
    return pruner, shards


def mask_update_record(step: int, target: float, pruner) -> dict:
    """What metrics.json records at a mask update: the schedule's target and the masks' sparsity,
    over all pruned weights and its lowest and highest layer (collective under DeepSpeed)."""
    report = pruner.sparsity()
    overall = report.pop("global")
    return {"step": step, "target": target, "sparsity": overall,
            "layer_min": min(report.values()), "layer_max": max(report.values())}


def evaluate(accelerator, model, head, loaders: dict, precision: str = "fp32") -> dict:
    """Metrics on every evaluation split, with dropout off, in the training's ``precision``, then back
    to train mode. The random number generators come out as they went in: an evaluation DataLoader's
    iterator draws its seed from the global generator, which would shift every later dropout mask, so
    the trained weights would depend on ``eval_every``, and a run resumed from a state saved just
    before an evaluation (its RNG saved before the draw) would leave the uninterrupted run's path."""
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), autocast(precision, accelerator.device):
        model.eval()
        results = {split: head.evaluate(model, loader, split, accelerator.gather_for_metrics)
                   for split, loader in loaders.items()}
    model.train()
    return results


def distillation_loss(student_out, teacher_out, head, temperature: float) -> KDTerms:
    """Soft cross-entropy at temperature T (times T^2), averaged over the head's logits (the class
    logits; or the start and end logits of SQuAD), in fp32 whatever the logits' precision (a copy of
    the teacher's: they were made under inference mode); with its KL divergence, for logging."""
    pairs = [distillation_terms(s.float(), t.to(torch.float32, copy=True), temperature)
             for s, t in zip(head.distilled_logits(student_out), head.distilled_logits(teacher_out))]
    return KDTerms(sum(p.loss for p in pairs) / len(pairs), sum(p.kl for p in pairs) / len(pairs))


def run(recipe: FinetuneRecipe) -> dict:
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoTokenizer, get_linear_schedule_with_warmup

    t, d = recipe.training, recipe.distillation
    output_dir = Path(t.output_dir)
    state_dir = output_dir / "state"
    precision = run_precision(recipe, training_device_type())   # fp16 on a CPU: ConfigError, nothing loaded
    # another run's state or model in output_dir: refused here (ConfigError), before anything loads,
    # on every process alike (each reads the same record); or marked for discarding
    identity = finetune_identity(recipe, precision)
    discard = check_run(output_dir, identity, t.discard_different_run)
    head = head_for(recipe.task)
    data = head.load(recipe.task.data_files, seed=t.seed)           # bad columns/labels fail here
    if d.teacher:
        head.check_teacher(AutoConfig.from_pretrained(d.teacher))   # before any weights load
    accelerator = make_accelerator(t.seed, output_dir, precision)
    tf32 = enable_tf32(precision) and accelerator.device.type == "cuda"
    accelerator.print(f"precision: {precision} (training.precision={t.precision}, on {accelerator.device}; TF32 "
                      f"{'on' if tf32 else 'off'})", flush=True)
    if accelerator.is_main_process:   # one process changes the directory, the others wait for it
        if discard:
            removed = discard_run(output_dir)
            print(f"training.discard_different_run: removed the different run's {', '.join(removed)} "
                  f"from {output_dir}", flush=True)
        checkpoints.remove_unfinished(state_dir)     # what a run killed while saving left
    accelerator.wait_for_everyone()
    accelerator.init_trackers("tensorboard")     # the run's curves: tensorboard --logdir <output_dir>
    any_rank = max_all_reduce()                  # one int over the ranks: a stop request, a save that failed anywhere
    watch = PreemptionWatch(all_reduce=any_rank, watch_file=accelerator.is_main_process)
    torch.manual_seed(t.seed)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    # fp32 weights whatever the checkpoint's dtype (transformers loads a bf16 one as bf16): mixed
    # precision trains fp32 weights under autocast
    model = head.model_class().from_pretrained(recipe.model.name_or_path, dtype=torch.float32, **head.model_kwargs())
    if recipe.qat.enabled:   # fake-quantized encoder Linears, weights still the same Parameters
        from finetune.quantization import prepare_qat
        prepare_qat(model, per_channel=recipe.qat.per_channel, reduce_range=recipe.qat.reduce_range)
    teacher = None
    if d.teacher:
        teacher = head.model_class().from_pretrained(d.teacher, dtype=torch.float32).eval().requires_grad_(False)

    with accelerator.main_process_first():
        features = head.features(data, tokenizer)
    train_loader = DataLoader(features.train, batch_size=t.batch_size, shuffle=True,
                              collate_fn=features.collate, generator=torch.Generator().manual_seed(t.seed))
    eval_loaders = {s: DataLoader(f, batch_size=t.eval_batch_size, collate_fn=features.collate)
                    for s, f in features.eval.items()}
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes)
    total = t.max_steps or int(math.ceil(t.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(optimizer_groups(model, t.weight_decay), lr=t.learning_rate)
    warmup = int(t.warmup_ratio * total)
    # fine-tune pruning: the pre-training recipe's schedule, method and (rewound) LR over these steps
    pruning = recipe.pruning
    if pruning is not None:
        pruning.check_length(total, warmup)           # the length is known now (epochs x data)
    if pruning is not None and pruning.lr_rewind:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, pruning.lr_factor(total, warmup, rewind=True))
    else:
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    unwrapped = model
    model, optimizer, train_loader, scheduler, *eval_list = accelerator.prepare(
        model, optimizer, train_loader, scheduler, *eval_loaders.values())
    eval_loaders = dict(zip(eval_loaders, eval_list))
    if teacher is not None:
        teacher.to(accelerator.device)
    engine = adapter_for(accelerator, model, any_rank)     # DDP (or one process), or the DeepSpeed plugin
    lock = engine.lock_pattern(unwrapped, recipe.model.min_sparsity) if recipe.model.pattern_lock else None
    sparsity_before = lock.sparsity() if lock else None
    pruner, shards = pruner_for(accelerator, unwrapped, model, pruning) if pruning else (None, None)
    if pruner is not None:
        engine.prune_with(pruner, shards)
    if engine.masks is not None:                         # what is locked or pruned, before any step
        accelerator.print(f"{'pattern-lock' if lock else 'fine-tune pruning'}: "
                          + describe_selection([p.name for p in engine.masks.params]))
    mask_updates = []                                    # (fine-tune pruning) the masks at each update
    history = []                                         # the evaluations during training
    window = TrainingWindow(accelerator.device, distilled=teacher is not None)   # the scalars' window

    step = resumed_from = 0
    latest = checkpoints.latest(state_dir)
    if latest is not None:                            # resume: weights, optimizer, scheduler, RNG, masks
        saved = engine.load(latest)
        step = resumed_from = saved["step"]
        if pruner is not None:                        # the updates so far
            mask_updates = saved["mask_updates"]
        history = saved.get("history", [])           # (a state saved before they were kept: none)
        window.load_state_dict(saved.get("log_window"), accelerator.is_main_process)
        accelerator.print(f"resumed from {latest} at step {step}")
    # the masks' sparsity, a TensorBoard scalar: read once (collective under DeepSpeed), then at mask updates
    sparsity_now = engine.masks.sparsity()["global"] if engine.masks is not None else None

    def reduce_sum(tensor):                           # over the processes (collective)
        return accelerator.reduce(tensor, "sum")

    def evaluate_now():                               # this step's evaluation: into history and TensorBoard
        with window.paused():
            history.append({"step": step, **evaluate(accelerator, model, head, eval_loaders, precision)})
        accelerator.log(eval_scalars(history[-1]), step=step)

    if step and evaluation_due(step, t.eval_every, len(train_loader)) and all(h["step"] != step for h in history):
        evaluate_now()       # the state was saved just before an evaluation it does not hold: make it now
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, disable=not accelerator.is_main_process,
               desc=f"{'qat' if recipe.qat.enabled else 'finetune'} {recipe.task.name}")
    model.train()
    while step < total:
        epoch, done_in_epoch = divmod(step, len(train_loader))
        train_loader.set_epoch(epoch)            # this epoch's order; on resume, skip what was trained
        for batch in accelerator.skip_first_batches(train_loader, done_in_epoch) if done_in_epoch else train_loader:
            if step >= total:
                break
            with autocast(precision, accelerator.device):   # under DDP Accelerate's own, here for DeepSpeed
                out = model(**batch)
            loss = d.lambda_task * out.loss if teacher is not None else out.loss
            terms = {"loss_task": out.loss}
            if teacher is not None:                   # the teacher in the student's precision
                with torch.inference_mode(), autocast(precision, accelerator.device):
                    teacher_out = teacher(**{k: v for k, v in batch.items() if k not in LABEL_COLUMNS})
                terms["loss_kd"], terms["kd_kl"] = distillation_loss(out, teacher_out, head, d.temperature)
                loss = loss + d.lambda_kd * terms["loss_kd"]
            window.add({"loss": loss, **terms}, batch)   # summed on the device: no host sync
            accelerator.backward(loss)
            engine.before_step()                      # pruned gradients zeroed
            if t.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            target = engine.after_step()              # zeros kept; a pruner's masks recomputed every f steps
            if target is not None:
                mask_updates.append(mask_update_record(step, target, pruner))
                sparsity_now = mask_updates[-1]["sparsity"]
            step += 1
            bar.update(1)
            if step % LOG_EVERY == 0 or step == total:   # a host sync and an all-reduce only every 10 steps
                scalars = window.scalars(reduce_sum, accelerator.num_processes)
                scalars["train/lr"] = scheduler.get_last_lr()[0]
                if sparsity_now is not None:
                    scalars["sparsity/global"] = sparsity_now
                bar.set_postfix({k.split("/")[1]: f"{scalars[k]:.4f}" for k in ("train/loss", "train/kd_kl")
                                 if k in scalars}, refresh=False)
                accelerator.log(scalars, step=step)
            if target is not None:                    # the masks were recomputed at this step
                accelerator.log({f"pruning/{k}": v for k, v in mask_updates[-1].items() if k != "step"}, step=step)
            # preemption (SLURM's warning signal, or the stop file): save this step, then stop for a requeue
            stop = step < total and watch.should_stop()          # one all-reduce of one int, every rank
            periodic = step % t.save_every == 0 if t.save_every else step % len(train_loader) == 0
            if periodic or step == total or stop:      # the state holds the evaluations and the scalars' window
                with window.paused():
                    record = {"history": history, **({"mask_updates": mask_updates} if pruner else {}),
                              "log_window": window.state_dict(reduce_sum, accelerator.is_main_process)}
                    engine.save(state_dir, step, record, run=(output_dir, identity))
            if stop:
                bar.close()
                watch.requeue(output_dir, step, main=accelerator.is_main_process, say=accelerator.print)
            # training.eval_every steps, or at the end of every epoch; after the save (the resumed run makes
            # an evaluation its state does not hold, above)
            if evaluation_due(step, t.eval_every, len(train_loader)):
                evaluate_now()
    bar.close()
    watch.finish(output_dir, main=accelerator.is_main_process)

    # no pruned weight may be nonzero (pattern-lock: exactly the loaded pattern): a violation is an error
    masked = engine.masks                             # the pattern-lock or the pruner, if any
    if masked is not None:
        masked.verify()
    if history and history[-1]["step"] == step:       # the last step's evaluation: the same weights
        results = {split: metrics for split, metrics in history[-1].items() if split != "step"}
    else:
        results = evaluate(accelerator, model, head, eval_loaders, precision)
        accelerator.log(eval_scalars(results), step=step)
    sparsity_after = masked.sparsity() if masked is not None else None
    summary = {"task": recipe.task.name, "labels": head.label_names,   # class names in id order (None: unnamed)
               "steps": step, "resumed_from_step": resumed_from, "precision": precision,
               "metrics": results,
               "history": history,
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
