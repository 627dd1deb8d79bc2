"""The sparsity core: gradual magnitude pruning, LR rewinding, pattern-lock and the distillation loss.

Imports torch and the standard library only (tests/unit/test_layers.py fails otherwise), so the same
code runs under DeepSpeed, Accelerate, plain DDP or one process. Every collective it needs arrives as a
function argument (``AllReduce``); where a rank's shard lives is told by ``shard_units``.
"""
