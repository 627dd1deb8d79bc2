"""The optimizer's parameter groups, the same for both recipes (torch only)."""
from __future__ import annotations

from typing import Sequence


def optimizer_groups(model, weight_decay: float, new: Sequence[str] = (), new_lr: float | None = None) -> list[dict]:
    """AdamW groups: no weight decay for biases and LayerNorm weights (as BERT and HF do); the
    parameters named in ``new`` in groups of their own at ``new_lr`` (when given)."""
    groups = {(False, True): [], (False, False): [], (True, True): [], (True, False): []}
    separate = set(new) if new_lr is not None else set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[(name in separate, param.ndim >= 2)].append(param)
    result = [{"params": groups[(False, True)], "weight_decay": weight_decay},
              {"params": groups[(False, False)], "weight_decay": 0.0}]
    result += [{"params": groups[(True, d)], "weight_decay": weight_decay if d else 0.0, "lr": new_lr}
               for d in (True, False) if groups[(True, d)]]
    return result
