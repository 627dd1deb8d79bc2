"""Knowledge-distillation losses of Prune Once for All.

Soft cross-entropy between the teacher's and the student's distributions at temperature T,
scaled by T^2 (Hinton et al.), averaged over the selected positions:

    L_kd = T^2 * mean_i [ - sum_v softmax(t_i / T)_v * log_softmax(s_i / T)_v ]

It differs from KL(teacher || student) by the teacher's entropy, a constant for the student, so
the gradients are the same as the reference code's KL. For BERT the MLM and NSP terms are
added 1:1 (as the reference code does); the training loss is L = lambda_pt * L_pt + lambda_kd * L_kd.

What is optimized is the soft cross-entropy; what shows whether the student converges is the KL
divergence, 0 when the student's distribution is the teacher's (the cross-entropy's floor is the
teacher's entropy, most of its value at T = 2 over a 30k vocabulary, so its curve looks flat).
:func:`distillation_terms` returns both: the loss, and for logging only (detached)
``kl = loss - T^2 * mean_i H(softmax(t_i / T)) = T^2 * mean_i KL(softmax(t_i / T) || softmax(s_i / T))``,
on the loss's scale (times the same T^2), in the same pass over the logits as the loss (one more
log-softmax of the teacher's, under no_grad).

Over a vocabulary of 30,522 the loss of a whole micro-batch is the largest tensor of the step:
:func:`chunked_soft_cross_entropy` computes the same loss and gradient a chunk of rows at a time, in
fp32 whatever the logits' dtype, so that no fp32 [rows, vocabulary] tensor of the whole micro-batch
exists (peak extra memory ~ 3 x chunk_rows x vocabulary x 4 bytes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

POSITIONS = ("all", "masked")
IGNORE_INDEX = -100


class KDTerms(NamedTuple):
    """A distillation loss and its KL divergence: ``loss`` (T^2 x soft cross-entropy, what is optimized)
    and ``kl`` (T^2 x KL(teacher || student) = ``loss`` minus T^2 x the teacher's entropy; detached,
    for logging: 0 when the student's distribution is the teacher's)."""
    loss: torch.Tensor
    kl: torch.Tensor


def _rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both logits as [rows, C] (the teacher's detached), or a ValueError if their shapes differ."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    return (student_logits.reshape(-1, student_logits.shape[-1]),
            teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]))


def _soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                        with_entropy: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """T^2 x the mean soft cross-entropy of [rows, C] logits and, with ``with_entropy``, T^2 x the
    teacher's mean entropy (no gradient; from the same teacher probabilities)."""
    teacher = teacher.to(student.dtype)
    if student.shape[0] == 0:
        zero = student.sum() * 0.0
        return zero, zero.detach() if with_entropy else None
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    scaled_teacher = teacher / temperature
    p_teacher = F.softmax(scaled_teacher, dim=-1)
    loss = -(p_teacher * log_p_student).sum(-1).mean() * temperature**2
    if not with_entropy:
        return loss, None
    with torch.no_grad():
        entropy = -(p_teacher * F.log_softmax(scaled_teacher, dim=-1)).sum(-1).mean() * temperature**2
    return loss, entropy


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 2.0) -> torch.Tensor:
    """Mean over rows of T^2 * CE(softmax(teacher / T), softmax(student / T)); logits are [..., C]."""
    return _soft_cross_entropy(*_rows(student_logits, teacher_logits), temperature, with_entropy=False)[0]


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _ChunkedSoftCrossEntropy(torch.autograd.Function):
    """T^2 * mean_i CE(softmax(t_i/T), softmax(s_i/T)) over chunks of rows, and (no gradient) T^2 x the
    teacher's mean entropy, from each chunk's teacher probabilities. Written by hand because
    autograd would keep every chunk's fp32 softmax for the backward: the forward keeps only the
    logits, and the backward recomputes each chunk's softmaxes, d/ds_i = T/N * (softmax(s_i/T) -
    softmax(t_i/T)) (the teacher's probabilities sum to one)."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, chunk_rows, with_entropy):
        rows, wide = student.shape[0], _at_least_fp32(student.dtype)
        total = torch.zeros((), dtype=wide, device=student.device)
        entropy = torch.zeros((), dtype=wide, device=student.device)
        for start in range(0, rows, chunk_rows):
            s = student[start:start + chunk_rows].to(wide) / temperature
            t = teacher[start:start + chunk_rows].to(wide) / temperature
            p_t = F.softmax(t, dim=-1)
            total -= (p_t * F.log_softmax(s, dim=-1)).sum()
            if with_entropy:
                entropy -= (p_t * F.log_softmax(t, dim=-1)).sum()
        ctx.save_for_backward(student, teacher)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        entropy = entropy * (temperature**2 / rows)
        ctx.mark_non_differentiable(entropy)
        return total * (temperature**2 / rows), entropy

    @staticmethod
    def backward(ctx, grad_output, _grad_entropy):
        student, teacher = ctx.saved_tensors
        temperature, chunk_rows, rows = ctx.temperature, ctx.chunk_rows, student.shape[0]
        wide = _at_least_fp32(student.dtype)
        grad = torch.empty_like(student)
        scale = grad_output.to(wide) * (temperature / rows)
        for start in range(0, rows, chunk_rows):
            q = F.softmax(student[start:start + chunk_rows].to(wide) / temperature, dim=-1)
            q -= F.softmax(teacher[start:start + chunk_rows].to(wide) / temperature, dim=-1)
            grad[start:start + chunk_rows] = q.mul_(scale)
        return grad, None, None, None, None


def _chunked(student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk_rows: int,
             with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    if student.shape[0] == 0:
        zero = student.to(_at_least_fp32(student.dtype)).sum() * 0.0
        return zero, zero.detach()
    return _ChunkedSoftCrossEntropy.apply(student, teacher, float(temperature), int(chunk_rows), with_entropy)


def chunked_soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                               temperature: float = 2.0, chunk_rows: int = 4096) -> torch.Tensor:
    """:func:`soft_cross_entropy` (same value and gradient, computed in fp32) ``chunk_rows`` rows at a
    time; logits are [..., C]. The result is fp32 (fp64 for fp64 logits)."""
    return _chunked(*_rows(student_logits, teacher_logits), temperature, chunk_rows, with_entropy=False)[0]


def distillation_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
                       chunk_rows: int = 0) -> KDTerms:
    """:func:`soft_cross_entropy` (``chunk_rows`` > 0: :func:`chunked_soft_cross_entropy`, the same value
    and gradient) and its KL divergence, T^2 x KL(teacher || student), for logging (see the module's
    docstring). The teacher's entropy costs one more log-softmax of the teacher's logits, chunk by chunk
    where the loss is chunked, under no_grad; the loss and its gradient are those of the functions above."""
    student, teacher = _rows(student_logits, teacher_logits)
    if chunk_rows:
        loss, entropy = _chunked(student, teacher, temperature, chunk_rows, with_entropy=True)
    else:
        loss, entropy = _soft_cross_entropy(student, teacher, temperature, with_entropy=True)
    return KDTerms(loss, loss.detach() - entropy)


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
                  temperature: float = 2.0, chunk_rows: int = 0) -> torch.Tensor:
    """KD over the token positions where ``selected`` [batch, seq] is True; logits are [batch, seq, V].
    ``chunk_rows`` > 0: :func:`chunked_soft_cross_entropy` with chunks of that many rows."""
    if chunk_rows:
        return chunked_soft_cross_entropy(student_logits[selected], teacher_logits[selected], temperature, chunk_rows)
    return soft_cross_entropy(student_logits[selected], teacher_logits[selected], temperature)


@dataclass(frozen=True)
class DistillationWeights:
    lambda_pt: float = 0.5
    lambda_kd: float = 0.5
    temperature: float = 2.0
    positions: str = "all"
    chunk_rows: int = 0     # > 0: the MLM KD term a chunk of this many rows at a time (same loss)


def pretraining_distillation_loss(weights: DistillationWeights, pretraining_loss: torch.Tensor,
                                  student_mlm_logits: torch.Tensor, teacher_mlm_logits: torch.Tensor,
                                  attention_mask: Optional[torch.Tensor], mlm_labels: Optional[torch.Tensor],
                                  student_nsp_logits: Optional[torch.Tensor] = None,
                                  teacher_nsp_logits: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """L = lambda_pt * L_pt + lambda_kd * (KD_mlm + KD_nsp); returns every term for logging, and
    ``kd_kl``: the KL divergence of ``kd`` (:class:`KDTerms`: detached, 0 when the student matches)."""
    selected = kd_positions(attention_mask, mlm_labels, weights.positions)
    mlm = distillation_terms(student_mlm_logits[selected], teacher_mlm_logits[selected], weights.temperature,
                             weights.chunk_rows)
    kd, kd_kl = mlm
    terms = {"kd_mlm": mlm.loss}
    if student_nsp_logits is not None:
        if teacher_nsp_logits is None:
            raise ValueError("the student has NSP logits but the teacher has none")
        nsp = distillation_terms(student_nsp_logits, teacher_nsp_logits, weights.temperature)
        terms["kd_nsp"] = nsp.loss
        kd, kd_kl = kd + nsp.loss, kd_kl + nsp.kl
    terms.update(kd=kd, kd_kl=kd_kl, pretraining=pretraining_loss,
                 loss=weights.lambda_pt * pretraining_loss + weights.lambda_kd * kd)
    return terms
