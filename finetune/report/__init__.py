"""The compression report (``prune-ofa report``): sparsity of the pruned layers, the paper's nominal
compression ratio, and the real one, measured in bytes on disk.

- :mod:`~finetune.report.storage`: the safetensors files: reading the checkpoint, the compact sparse
  export (why a sparse model's file does not shrink, and the format that does), bytes per tensor;
- :mod:`~finetune.report.accounting`: the pruned set, sparsity, nominal and real ratios, metric deltas;
- :mod:`~finetune.report.rendering`: ``report.md`` and ``report.json``.
"""
from finetune.report.accounting import build_report
from finetune.report.rendering import format_markdown, write_report
from finetune.report.storage import QuantizedWeight, load_compact, load_state, tensor_bytes, write_compact

__all__ = ["QuantizedWeight", "build_report", "format_markdown", "load_compact", "load_state", "tensor_bytes",
           "write_compact", "write_report"]
