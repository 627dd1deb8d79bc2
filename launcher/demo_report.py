"""The words and tables of ``prune-ofa demo``'s report (``report.md``, and what it prints): the one-shot
pruning table, the results table, the notes on what this scale can and cannot show, and the page
that holds them. Numbers in, Markdown out: nothing here runs or reads a stage.
"""
from __future__ import annotations


def one_shot_markdown(rows: list[dict]) -> str:
    """The one-shot pruning table (``sparse_pretrain.one_shot.one_shot_rows``) and what it shows."""
    lines = ["| method | target | sparsity reached | exact count in every layer | embedding cosine to dense |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['target']:.2f} | {r['sparsity']:.4f} | "
              f"{'yes' if r['exact_per_layer'] else 'NO'} ({r['layers']} layers) | {r['embedding_cosine']:.3f} |"
              for r in rows]
    worst = min(r["embedding_cosine"] for r in rows if r["method"] == "unstructured")
    return ("\n".join(lines) + f"\n\nOne-shot magnitude pruning barely moves the embeddings at low "
            f"sparsity but not at the paper's targets (cosine {worst:.2f} at 90%): that is why Prune Once "
            f"for All prunes gradually while distilling from the dense teacher, which part 3 does.")


def results_table(results: dict) -> str:
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    lines = ["| model | sparsity after pre-training | RT accuracy (transfer) | sparsity after transfer | "
             "RT accuracy (QAT fake-quant / int8 on CPU) | pruned weights nonzero in int8 | encoder compression "
             "nominal / real | whole file real |",
             "|---|---|---|---|---|---|---|---|",
             f"| dense MiniLM-L6 (task teacher) | 0 | {results['rt_teacher']['accuracy']:.4f} | - | - | - | 1x | 1x |"]
    for s in results["students"]:
        lines.append(
            f"| {round(100 * s['target'])}% Prune OFA | {pct(s['pretrain_sparsity'])} | {s['transfer_accuracy']:.4f} | "
            f"{pct(s['transfer_sparsity'])} ({'unchanged' if s['transfer_sparsity_unchanged'] else 'CHANGED'}) | "
            f"{s['qat_accuracy']:.4f} / {s['int8_accuracy']:.4f} | {s['int8_pruned_nonzero']} | "
            f"{s['nominal_encoder']:.1f}x / {s['real_encoder']:.1f}x | {s['real_whole_file']:.2f}x |")
    return "\n".join(lines)


def notes(results: dict, held: dict, sizes) -> str:
    """What the numbers stand on, and what this small scale shows and cannot show."""
    t = results["teacher"]
    students = ', '.join(f"{s['mlm_accuracy']:.3f} ({round(100 * s['target'])}%)" for s in results['students'])
    return f"""Held-out sets: RT sentiment validation {held['rt_validation']:,} sentences (train {held['rt_train']:,});
masked-LM accuracy on {held['mlm_rows']} held-out rows of {sizes.seq_length} tokens (of {held['mlm_held_out_rows']}),
fixed masks. Teacher preparation moved held-out masked-LM accuracy from {t['mlm_accuracy_first']:.3f} (first eval)
to {t['mlm_accuracy']:.3f}; the students end at {students}. The packaged MiniLM-L6 is a
sentence-embedding model shipped without a masked-LM head: teacher preparation starts that head from
random weights, so {sizes.teacher_steps} steps leave it weak, and the students distil from a weak teacher.

What this small scale shows: the mechanics, measured: exact sparsity at each stage, zeros kept through
transfer and QAT (checked per layer, and in the int8 weights), KD from the dense task teacher, the int8
export reproducing the fake-quantized accuracy on CPU, and the real bytes a sparse format saves against
the nominal ratio. What it cannot show: the paper's accuracy. Pre-training here is {sizes.teacher_steps} +
{sizes.student_steps} steps of batch 16 at sequence {sizes.seq_length} on 2 CPU cores; the paper runs 100k
steps of batch 256 at sequence 512, so the sparse students lose far more here than the paper's <1-2
points; transfer is {sizes.finetune_steps} steps, less than one epoch. The whole-file ratio stays small
because MiniLM's dense embeddings are half its parameters."""


def report_markdown(*, table_md: str, notes_md: str, recipe_name: str, recipe_text: str, schedule_table: str,
                    one_shot_md: str, stages, minutes: float, out) -> str:
    """``report.md``: results, the paper's recipe, the one-shot table, the stages and their times."""
    timings = "\n".join(f"| {s.name} | {'reused' if s.reused else f'{s.seconds:.0f} s'} |" for s in stages)
    return f"""# prune-ofa demo

## Results: Prune Once for All on MiniLM-L6 and RT sentiment

{table_md}

{notes_md}

![training](training.png)

## The paper's recipe ({recipe_name})

{recipe_text}

```
{schedule_table}
```

![schedule](schedule.png)

## One-shot pruning (why the paper prunes gradually)

{one_shot_md or "(skipped)"}

## Stages

| stage | time |
|---|---|
{timings}

Total {minutes:.1f} min. TensorBoard: `tensorboard --logdir {out}`. Logs: `{out / 'logs'}`.
"""
