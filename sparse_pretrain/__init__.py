"""Sparse pre-training, the Prune Once for All way: the sparsity core (schedule, LR rewinding,
pruning methods, masks, pattern-lock, distillation loss, recipes) and, on top of it, the
DeepSpeed trainer. The core imports neither DeepSpeed nor Accelerate."""

__version__ = "0.1.0"
