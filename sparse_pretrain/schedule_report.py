"""The sparsity and learning-rate curves of a recipe, as a table and as a plot, so a recipe can
be checked before GPU hours are spent on it (``prune-ofa schedule``)."""
from __future__ import annotations

from pathlib import Path

from sparse_pretrain.recipe import Recipe
from sparse_pretrain.runtime.atomic import replacing


def table_steps(recipe: Recipe) -> list[int]:
    """Steps worth a row: the key points of the schedule, both sides of the first rewinds and of
    policy_end, and a tenth of the run apart in between."""
    t, p = recipe.training, recipe.pruning
    total = t.total_steps
    steps = {0, t.warmup_steps // 2, t.warmup_steps, p.start, p.policy_end - 1, p.policy_end, p.end,
             total - 1}
    for k in (1, 2):
        steps |= {p.start + k * p.interval - 1, p.start + k * p.interval}
    steps |= set(range(0, total, max(1, total // 10)))
    return sorted(s for s in steps if 0 <= s < total)


def schedule_rows(recipe: Recipe, steps: list[int]) -> list[dict]:
    schedule, lr_factor, base_lr = recipe.gmp_schedule(), recipe.lr_factor(), recipe.training.learning_rate
    pruning = recipe.stage == "student"
    rows = []
    for step in steps:
        factor = lr_factor(step)
        rows.append({"step": step,
                     "target_sparsity": schedule.sparsity(step) if pruning else 0.0,
                     "mask_sparsity": schedule.sparsity_for_mask_at(step) if pruning else 0.0,
                     "mask_update": pruning and schedule.is_update_step(step),
                     "lr_factor": factor, "lr": base_lr * factor})
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'step':>8}  {'target':>7}  {'masks':>7}  {'update':>6}  {'lr factor':>9}  {'lr':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['step']:>8}  {r['target_sparsity']:>7.4f}  {r['mask_sparsity']:>7.4f}  "
                     f"{'yes' if r['mask_update'] else '-':>6}  {r['lr_factor']:>9.5f}  {r['lr']:>10.3e}")
    return "\n".join(lines)


def describe(recipe: Recipe) -> str:
    t, p = recipe.training, recipe.pruning
    if recipe.stage != "student":
        return (f"stage teacher: no pruning; linear LR {t.learning_rate:g} with {t.warmup_steps} warmup "
                f"steps over {t.total_steps} steps")
    method = p.method + (f" {p.block_shape[0]}x{p.block_shape[1]}" if p.method == "block" else "") + \
        (f" {p.n}:{p.m}" if p.method == "nm" else "")
    rewind = (f"LR rewound every {p.interval} steps in [{p.start}, {p.policy_end})" if t.lr_rewind
              else "no LR rewinding")
    return (f"stage student: {method} ({p.scope}) {p.initial_sparsity:g} -> {p.final_sparsity:g}, cubic over "
            f"[{p.start}, {p.policy_end}], masks every {p.interval} steps until {p.end} "
            f"({len(recipe.gmp_schedule().update_steps())} updates); {rewind}; base LR {t.learning_rate:g}, "
            f"{t.warmup_steps} warmup steps, {t.total_steps} steps")


def plot_schedule(recipe: Recipe, path: str | Path) -> Path:
    """Sparsity (target and masks in force) and the learning rate over every step, one PNG,
    written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = schedule_rows(recipe, list(range(recipe.training.total_steps)))
    steps = [r["step"] for r in rows]
    fig, ax_s = plt.subplots(figsize=(10, 4.5), dpi=120)
    ax_s.plot(steps, [r["target_sparsity"] for r in rows], color="tab:blue", lw=1, ls="--",
              label="target sparsity (Eq. 1)")
    ax_s.step(steps, [r["mask_sparsity"] for r in rows], where="post", color="tab:blue", lw=1.5,
              label="sparsity of the masks")
    ax_s.set_xlabel("optimizer step")
    ax_s.set_ylabel("sparsity", color="tab:blue")
    ax_s.set_ylim(0, 1)
    ax_lr = ax_s.twinx()
    ax_lr.plot(steps, [r["lr"] for r in rows], color="tab:red", lw=0.8, label="learning rate")
    ax_lr.set_ylabel("learning rate", color="tab:red")
    ax_lr.set_ylim(bottom=0)
    if recipe.stage == "student":
        for x in (recipe.pruning.policy_end, recipe.pruning.end):
            ax_s.axvline(x, color="grey", lw=0.6, ls=":")
    handles = ax_s.get_legend_handles_labels()[0] + ax_lr.get_legend_handles_labels()[0]
    ax_s.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
    ax_s.set_title(describe(recipe), fontsize=7, wrap=True)
    fig.tight_layout()
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
