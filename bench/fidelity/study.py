"""What the amortized fidelity study runs: its scales, its stages and what each costs.

The paper's claim (Zafrir et al., 2021, Tables 1 and 4): a model pruned once during pre-training
transfers to many tasks with little loss, at a lower per-task cost than pruning during fine-tuning.
Per seed, on each task of the scale, with the project's real commands:

    (c) dense              the prepared dense model fine-tuned on the task for B steps; it is also the
                           task teacher every KD run below distils from
    (a) prune-ofa          ONE student pruning run on the corpus (GMP + KD + LR rewinding, P tokens),
                           then a pattern-locked transfer with KD for B steps on each task
    (b) ft-pruning-kx      the prepared dense model pruned during fine-tuning on the task (GMP + KD + LR
                           rewinding) for k x B steps, k in the scale's multiples (1, 2, 4)
    ablations of (a)       ofa-no-lrr (student pruning without LR rewinding), ofa-no-kd-pruning (pruning
                           with L_PT only), ofa-no-kd-transfer (transfer with the task loss only)

Cost is counted in tokens through the student (non-padding, expected values: steps x batch x the
mean tokenized length of the training rows) and in measured seconds. Teacher preparation is shared by
(a) and (b) (both start from the prepared model) and run once per scale (seed 0): seeds vary
everything after it. The dense task teacher is paid by (a) and (b) alike and is left out of both.
(a) pays P once; per task it pays B, (b) pays k x B: with n tasks (a) costs P + n B, (b) n k B, so
(a) is cheaper in total from n > P / ((k - 1) B) tasks on, at the k where (b) matches (a)'s accuracy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
HERE = Path(__file__).resolve().parent
SPARSITY = 0.85
SPLIT_SEED = 42           # the fixed train/validation split of every task (the recipes' training.seed)
TEACHER_SEED = 0          # teacher preparation is shared by every seed


@dataclass(frozen=True)
class Scale:
    description: str
    tasks: tuple
    # teacher preparation and student pruning, on the corpus
    pretrain_seq: int
    pretrain_batch: int           # global batch of corpus rows
    pretrain_micro: int
    teacher_steps: int
    teacher_lr: float
    head_lr: float                # the MLM/NSP head the packaged checkpoint lacks starts from random
    student_steps: int
    student_lr: float
    # the student's schedule as fractions of its length (warmup, policy end, masks frozen, interval);
    # (b) uses the same fractions of its own length
    warmup: float
    policy_end: float
    end: float
    interval: float
    kd_positions: str             # distillation.positions of student pruning: masked | all
    # the tasks
    finetune_seq: int
    finetune_batch: int           # global batch of task rows
    task_steps: int               # B: the per-task budget in optimizer steps
    task_lr: float                # every task stage: (c), (a)'s transfers and (b)
    multiples: tuple = (1, 2, 4)  # (b) at k x B
    parallel: int = 1             # stages run at once (one GPU holds several small runs)
    threads: int = 2              # OMP threads per stage
    bundle: bool = False          # inputs from a packed bundle (bench/fidelity/bundle.py), not the installed packages
    corpus: tuple = ("data/corpus/wiki.jsonl", "data/corpus/austen.jsonl")
    settings: tuple = field(default=())   # what differs from the paper, for the table


PAPER_DIFFERENCES = ("MiniLM-L6 (22.7M parameters) instead of BERT-Base", "sequence 128 instead of 512",
                     "KD on the masked positions only (distillation.positions=masked)",
                     "85% sparsity, unstructured", "three offline single-sentence tasks instead of SQuAD and GLUE")

SCALES = {
    # 2 CPU cores, about 2 hours per seed (teacher preparation, 16-22 min, once per scale)
    "cpu-medium": Scale(
        description="2 CPU cores; about 2 hours per seed",
        tasks=("rt-sentiment", "trec", "bbc-news"), pretrain_seq=128, pretrain_batch=16, pretrain_micro=16,
        teacher_steps=400, teacher_lr=1e-4, head_lr=3e-3, student_steps=300, student_lr=3e-4,
        warmup=1 / 15, policy_end=2 / 3, end=4 / 5, interval=1 / 15, kd_positions="masked",
        finetune_seq=64, finetune_batch=16, task_steps=100, task_lr=1e-4, parallel=1, threads=2,
        settings=PAPER_DIFFERENCES + ("batch 16 on the corpus and on the tasks", "task sequences at most 64 tokens")),
    # one H200 in at most 8 minutes, inputs carried in a bundle (the device has no packages, no network)
    "gpu-window": Scale(
        description="one H200, at most 8 minutes; inputs from the bundle",
        tasks=("rt-sentiment", "trec", "bbc-news"), pretrain_seq=128, pretrain_batch=64, pretrain_micro=64,
        teacher_steps=1500, teacher_lr=1e-4, head_lr=3e-3, student_steps=2000, student_lr=2e-4,
        warmup=1 / 15, policy_end=2 / 3, end=4 / 5, interval=1 / 50, kd_positions="masked",
        finetune_seq=64, finetune_batch=32, task_steps=300, task_lr=1e-4, parallel=9, threads=1, bundle=True,
        settings=PAPER_DIFFERENCES + ("batch 64 on the corpus, 32 on the tasks", "task sequences at most 64 tokens",
                                      "bf16 autocast")),
    # the gpu-window command on CPU in a few minutes (make test): every stage of one task, from a bundle
    "smoke": Scale(
        description="the gpu-window study's logic in minutes on CPU (make test)",
        tasks=("trec",), pretrain_seq=32, pretrain_batch=4, pretrain_micro=4,
        teacher_steps=3, teacher_lr=1e-4, head_lr=3e-3, student_steps=10, student_lr=3e-4,
        warmup=0.1, policy_end=0.5, end=0.6, interval=0.2, kd_positions="masked",
        finetune_seq=32, finetune_batch=8, task_steps=5, task_lr=1e-4, parallel=2, threads=1, bundle=True,
        settings=("smoke: numbers mean nothing",)),
}

# variant -> title; the stages of a task's variant are in variant_stages()
TASK_VARIANTS = {
    "dense": "(c) dense, B",
    "prune-ofa": "(a) Prune OFA: transfer B",
    "ft-pruning-1x": "(b) fine-tune pruning, B",
    "ft-pruning-2x": "(b) fine-tune pruning, 2B",
    "ft-pruning-4x": "(b) fine-tune pruning, 4B",
    "ofa-no-lrr": "(a) without LR rewinding in pruning",
    "ofa-no-kd-pruning": "(a) without KD in pruning",
    "ofa-no-kd-transfer": "(a) without KD in transfer",
}
CORE = ("dense", "prune-ofa", "ft-pruning-1x")
STUDENTS = {"ofa": [], "no-lrr": ["training.lr_rewind=false"],
            "no-kd-pruning": ["distillation.lambda_kd=0", "distillation.lambda_pt=1"]}
# the (a) variants: the student they transfer from, and the transfer's own overrides
TRANSFERS = {"prune-ofa": ("ofa", []), "ofa-no-lrr": ("no-lrr", []), "ofa-no-kd-pruning": ("no-kd-pruning", []),
             "ofa-no-kd-transfer": ("ofa", ["distillation.lambda_kd=0", "distillation.lambda_task=1"])}


def variants_for(scale: Scale) -> list:
    return [v for v in TASK_VARIANTS if not v.startswith("ft-pruning-") or int(v[11:-1]) in scale.multiples]


def multiple(variant: str) -> int:
    """k of an (b) variant (its steps are k x B), 1 for every other."""
    return int(variant[len("ft-pruning-"):-1]) if variant.startswith("ft-pruning-") else 1


def schedule(steps: int, s: Scale) -> dict:
    """The GMP schedule (and warmup) of a run of ``steps`` optimizer steps, at the scale's fractions."""
    return {"warmup_steps": max(1, round(steps * s.warmup)), "start": 0,
            "policy_end": max(1, round(steps * s.policy_end)), "end": round(steps * s.end),
            "interval": max(1, round(steps * s.interval))}


@dataclass
class Stage:
    """One run of a project command: what it needs first, where it writes, which file says it finished."""
    key: str                      # "teacher", "seed0/student-ofa", "seed0/trec/dense"
    command: str                  # pretrain | finetune
    config: Path
    overrides: list
    needs: tuple                  # keys of stages that must finish first
    out: Path
    done_marker: Path
    seed: int
    task: str | None = None
    tokens: float = 0.0           # expected tokens through the student


@dataclass(frozen=True)
class Inputs:
    """Where the model, the corpus and the task splits come from (the installed packages, or a bundle)."""
    model: str                    # packaged:minilm-l6 or a directory
    corpus: tuple                 # jsonl files
    task_files: dict              # task -> {"train": path, "validation": path}
    task_tokens: dict             # task -> mean tokens per training row at the scale's finetune_seq
    corpus_tokens_per_row: float  # of the prepared rows at pretrain_seq


def pretrain_common(s: Scale, inputs: Inputs, out: Path, seed: int, steps: int) -> list:
    return [f"training.output_dir={out}", f"training.seed={seed}", "data.seed=42",
            f"data.data_files=[{', '.join(inputs.corpus)}]", f"data.max_seq_length={s.pretrain_seq}",
            f"training.global_batch_size={s.pretrain_batch}", f"training.micro_batch_size={s.pretrain_micro}",
            f"training.total_steps={steps}", "training.save_interval=100000000", "training.dataloader_workers=0",
            "training.eval_batches=100000", f"training.eval_interval={steps}",
            f"training.log_interval={max(1, steps // 10)}"]


def finetune_common(s: Scale, inputs: Inputs, out: Path, seed: int, task: str, steps: int) -> list:
    files = inputs.task_files[task]
    return [f"task.name={task}", f"task.max_seq_length={s.finetune_seq}", f"training.output_dir={out}",
            f"training.seed={seed}", f"training.batch_size={s.finetune_batch}", "training.eval_batch_size=128",
            f"training.max_steps={steps}", f"training.learning_rate={s.task_lr}", "training.eval_every=100000000",
            "training.save_every=100000000",
            f"task.data_files={{train: {files['train']}, validation: {files['validation']}}}"]


def plan(s: Scale, inputs: Inputs, runs: Path, seeds: list, variants: list, tasks: list) -> list:
    """Every stage the requested (seed, task, variant)s need, in the order one at a time should run them:
    seed by seed; within a seed the core comparison first, then (b)'s larger budgets, then the ablations."""
    stages: dict = {}
    teacher_dir = runs / "teacher"
    stages["teacher"] = Stage(
        "teacher", "pretrain", CONFIGS / "minilm-l6-teacher.yaml",
        pretrain_common(s, inputs, teacher_dir, TEACHER_SEED, s.teacher_steps) + [
            f"model.name_or_path={inputs.model}", f"training.learning_rate={s.teacher_lr}",
            f"training.new_parameters_learning_rate={s.head_lr}",
            f"training.warmup_steps={schedule(s.teacher_steps, s)['warmup_steps']}"],
        (), teacher_dir, teacher_dir / "model" / "sparsity.json", TEACHER_SEED,
        tokens=s.teacher_steps * s.pretrain_batch * inputs.corpus_tokens_per_row)
    teacher_model = teacher_dir / "model"
    order = sorted(variants, key=lambda v: (v not in CORE, v.startswith("ofa-"), list(TASK_VARIANTS).index(v)))
    for seed in seeds:
        seed_dir = runs / f"seed{seed}"
        for variant in order:
            for task in tasks:
                for stage in variant_stages(variant, task, s, inputs, seed, seed_dir, teacher_model):
                    stages.setdefault(stage.key, stage)
    return list(stages.values())


def student_stage(name: str, s: Scale, inputs: Inputs, seed: int, seed_dir: Path, teacher_model: Path) -> Stage:
    out = seed_dir / f"student-{name}"
    sched = schedule(s.student_steps, s)
    overrides = pretrain_common(s, inputs, out, seed, s.student_steps) + [
        f"model.name_or_path={teacher_model}", f"model.teacher_name_or_path={teacher_model}",
        f"pruning.final_sparsity={SPARSITY}", f"training.learning_rate={s.student_lr}",
        f"training.warmup_steps={sched['warmup_steps']}", f"distillation.positions={s.kd_positions}",
        *(f"pruning.{k}={sched[k]}" for k in ("start", "policy_end", "end", "interval")), *STUDENTS[name]]
    return Stage(f"seed{seed}/student-{name}", "pretrain", CONFIGS / "minilm-l6-85.yaml", overrides, ("teacher",),
                 out, out / "model" / "sparsity.json", seed,
                 tokens=s.student_steps * s.pretrain_batch * inputs.corpus_tokens_per_row)


def variant_stages(variant: str, task: str, s: Scale, inputs: Inputs, seed: int, seed_dir: Path,
                   teacher_model: Path) -> list:
    """The stages of one (task, variant), those it depends on first; the last one's metrics are its result."""
    dense_out = seed_dir / task / "dense"
    task_tokens = s.finetune_batch * inputs.task_tokens[task]
    dense = Stage(f"seed{seed}/{task}/dense", "finetune", CONFIGS / "finetune" / "rt-teacher.yaml",
                  finetune_common(s, inputs, dense_out, seed, task, s.task_steps) + [
                      f"model.name_or_path={teacher_model}"],
                  ("teacher",), dense_out, dense_out / "metrics.json", seed, task, s.task_steps * task_tokens)
    if variant == "dense":
        return [dense]
    if variant.startswith("ft-pruning-"):
        steps = multiple(variant) * s.task_steps
        sched = schedule(steps, s)
        out = seed_dir / task / variant
        stage = Stage(f"seed{seed}/{task}/{variant}", "finetune", HERE / "finetune-pruning-85.yaml",
                      finetune_common(s, inputs, out, seed, task, steps) + [
                          f"model.name_or_path={teacher_model}", f"distillation.teacher={dense_out / 'model'}",
                          f"pruning.final_sparsity={SPARSITY}",
                          *(f"pruning.{k}={sched[k]}" for k in ("start", "policy_end", "end", "interval"))],
                      ("teacher", dense.key), out, out / "metrics.json", seed, task, steps * task_tokens)
        return [dense, stage]
    student_name, extra = TRANSFERS[variant]
    student = student_stage(student_name, s, inputs, seed, seed_dir, teacher_model)
    out = seed_dir / task / variant
    transfer = Stage(f"seed{seed}/{task}/{variant}", "finetune", CONFIGS / "finetune" / "rt-transfer.yaml",
                     finetune_common(s, inputs, out, seed, task, s.task_steps) + [
                         f"model.name_or_path={student.out / 'model'}", f"distillation.teacher={dense_out / 'model'}",
                         *extra],
                     (student.key, dense.key), out, out / "metrics.json", seed, task, s.task_steps * task_tokens)
    return [dense, student, transfer]


def break_even_tasks(pruning_tokens: float, per_task_tokens: float, k: int) -> float:
    """The number of tasks from which (a) (P once, then B per task) costs less in all than (b) at k x B
    per task: n > P / ((k - 1) B); infinite at k = 1 (then (a) always costs P more)."""
    return math.inf if k <= 1 else pruning_tokens / ((k - 1) * per_task_tokens)
