"""The report as people read it: ``report.md`` (:func:`format_markdown`) next to ``report.json``
(:func:`write_report`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from finetune.report.accounting import ratio_or_none
from sparse_pretrain.runtime.atomic import write_text


def _x(ratio: Optional[float]) -> str:
    return "n/a (nothing stored)" if ratio is None else f"{ratio:.2f}x"


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def format_markdown(report: dict) -> str:
    nom, real, sp = report["nominal"], report["real"], report["sparsity"]
    enc, whole = nom["encoder"], nom["whole_model"]
    lines = [f"# Compression report: `{report['model_dir']}`", "",
             f"**Encoder** (what the ratios below call the encoder): {enc['definition']}. "
             f"{report['selection']['pruned_tensors']} tensors, {enc['parameters']} weights; selected by "
             f"{report['selection']['method']}.", "",
             "## Sparsity", "",
             f"Encoder sparsity: **{sp['encoder']:.2%}** ({sp['zeros']} of {sp['parameters']} weights are zero)."]
    if sp.get("declared"):
        lines.append(f"Declared in sparsity.json: target {sp['declared']['target']}, global "
                     f"{sp['declared']['global']}.")
    lines += ["", "| layer | shape | stored as | sparsity | nonzeros | encoding | bytes (compact) "
                  "| bytes (dense fp32) | nominal |",
              "|---|---|---|---:|---:|---|---:|---:|---:|"]
    for row in report["layers"]:
        lines.append(f"| {row['name']} | {'x'.join(map(str, row['shape']))} | {row['stored_as']} "
                     f"| {row['sparsity']:.2%} | {row['nonzeros']} | {row['encoding']} | {row['compact_bytes']} "
                     f"| {row['dense_fp32_bytes']} | {_x(row['nominal_ratio'])} |")
    lines += ["", "## Compression", "", "### Nominal (the paper's formula)", "",
              f"{nom['formula']}; positions, scales and zero points are not counted.", "",
              f"- Encoder: {enc['dense_fp32_bits']} / {enc['stored_bits']} bits = **{_x(enc['ratio'])}**",
              f"- Whole model ({whole['definition']}): {whole['dense_fp32_bits']} / {whole['stored_bits']} "
              f"bits = **{_x(whole['ratio'])}**", "",
              "### Real (bytes measured on disk)", "",
              "| file | bytes | dense fp32 / this |", "|---|---:|---:|",
              f"| dense fp32 safetensors ({real['dense_fp32']['source']}) | {real['dense_fp32']['bytes']} | 1.00x |",
              f"| original checkpoint | {real['original']['bytes']} "
              f"| {_x(ratio_or_none(real['dense_fp32']['bytes'], real['original']['bytes']))} |",
              f"| compact sparse export{' (' + real['compact']['path'] + ')' if real['compact']['path'] else ''} "
              f"| {real['compact']['bytes']} | **{_x(real['ratio_vs_dense_fp32'])}** |", "",
              f"Compact export vs the original checkpoint: {_x(real['ratio_vs_original'])}. Encoder alone, "
              f"tensor bytes inside the files: {real['encoder']['dense_fp32_bytes']} dense fp32 -> "
              f"{real['encoder']['compact_bytes']} compact = **{_x(real['encoder']['ratio'])}** "
              "(positions, scales and zero points included).", "",
              "### Why the model file did not shrink", ""]
    lines += [f"- {note}" for note in report["notes"]]
    if report["metrics"]:
        lines += ["", "## Task metrics", "", "| metric | this model | dense baseline | delta | relative |",
                  "|---|---:|---:|---:|---:|"]
        for name, m in report["metrics"].items():
            rel = "-" if m["relative"] is None else f"{m['relative']:+.2%}"
            delta = "-" if m["delta"] is None else f"{m['delta']:+.4f}"
            lines.append(f"| {name} | {_num(m['value'])} | {_num(m['baseline'])} | {delta} | {rel} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``report.json`` and ``report.md`` in ``out_dir``, each written atomically."""
    out_dir = Path(out_dir)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_text(json_path, json.dumps(report, indent=2) + "\n")
    write_text(md_path, format_markdown(report))
    return json_path, md_path
