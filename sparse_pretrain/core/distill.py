"""Knowledge-distillation losses of Prune Once for All.

Soft cross-entropy between the teacher's and the student's distributions at temperature T,
scaled by T^2 (Hinton et al.), averaged over the selected positions:

    L_kd = T^2 * mean_i [ - sum_v softmax(t_i / T)_v * log_softmax(s_i / T)_v ]

It differs from KL(teacher || student) by the teacher's entropy, a constant for the student, so
the gradients are the same as the reference code's KL. For BERT the MLM and NSP terms are
added 1:1 (as the reference code does); the training loss is L = lambda_pt * L_pt + lambda_kd * L_kd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

POSITIONS = ("all", "masked")
IGNORE_INDEX = -100


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 2.0) -> torch.Tensor:
    """Mean over rows of T^2 * CE(softmax(teacher / T), softmax(student / T)); logits are [..., C]."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).to(student.dtype)
    if student.shape[0] == 0:
        return student.sum() * 0.0
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    p_teacher = F.softmax(teacher / temperature, dim=-1)
    return -(p_teacher * log_p_student).sum(-1).mean() * temperature**2


def kd_positions(attention_mask: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                 positions: str = "all") -> torch.Tensor:
    """Boolean [batch, seq] of the token positions distilled: every non-padding token ("all", as
    the reference code does) or only the masked-LM positions ("masked")."""
    if positions == "all":
        if attention_mask is None:
            raise ValueError("positions='all' needs the attention mask")
        return attention_mask.bool()
    if positions == "masked":
        if labels is None:
            raise ValueError("positions='masked' needs the MLM labels")
        return labels != IGNORE_INDEX
    raise ValueError(f"distillation.positions: must be one of {POSITIONS}, got {positions!r}")


def token_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, selected: torch.Tensor,
                  temperature: float = 2.0) -> torch.Tensor:
    """KD over the token positions where ``selected`` [batch, seq] is True; logits are [batch, seq, V]."""
    return soft_cross_entropy(student_logits[selected], teacher_logits[selected], temperature)


@dataclass(frozen=True)
class DistillationWeights:
    lambda_pt: float = 0.5
    lambda_kd: float = 0.5
    temperature: float = 2.0
    positions: str = "all"


def pretraining_distillation_loss(weights: DistillationWeights, pretraining_loss: torch.Tensor,
                                  student_mlm_logits: torch.Tensor, teacher_mlm_logits: torch.Tensor,
                                  attention_mask: Optional[torch.Tensor], mlm_labels: Optional[torch.Tensor],
                                  student_nsp_logits: Optional[torch.Tensor] = None,
                                  teacher_nsp_logits: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """L = lambda_pt * L_pt + lambda_kd * (KD_mlm + KD_nsp); returns every term for logging."""
    selected = kd_positions(attention_mask, mlm_labels, weights.positions)
    kd_mlm = token_kd_loss(student_mlm_logits, teacher_mlm_logits, selected, weights.temperature)
    kd = kd_mlm
    terms = {"kd_mlm": kd_mlm}
    if student_nsp_logits is not None:
        if teacher_nsp_logits is None:
            raise ValueError("the student has NSP logits but the teacher has none")
        terms["kd_nsp"] = soft_cross_entropy(student_nsp_logits, teacher_nsp_logits, weights.temperature)
        kd = kd + terms["kd_nsp"]
    terms.update(kd=kd, pretraining=pretraining_loss,
                 loss=weights.lambda_pt * pretraining_loss + weights.lambda_kd * kd)
    return terms
