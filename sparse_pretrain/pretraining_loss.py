"""The loss of one pre-training micro-batch: the model's own objectives, plus distillation.

``L = L_pt`` when preparing a teacher, ``L = lambda_pt * L_pt + lambda_kd * L_kd`` when pruning a
student (:mod:`sparse_pretrain.core.distill`). L_pt is masked-LM cross-entropy (+ next-sentence
prediction for BERT), as the Hugging Face model computes it from ``labels``.

``vocab_rows="needed"`` (the default) applies each model's MLM head only to the rows a loss reads:
the masked positions, or with ``distillation.positions: all`` every non-padding token. Hugging Face
heads project every position onto the vocabulary (micro-batch x 512 x 30,522 logits, for student
and teacher), then the loss reads 15% of them; NVIDIA's and MosaicBERT's BERTs project only masked
positions. The losses are the same (tests/unit/sparse_pretrain/test_pretraining_loss.py); with
``positions: all`` and no padding nothing is saved, with ``positions: masked`` or in teacher
preparation about 85% of the head's work. ``vocab_rows="all"`` is the model's own forward, as before.

How, for any Hugging Face masked-LM: a forward pre-hook on the module that takes the encoder's
hidden states into the head (:func:`head_entry`) replaces them, [batch, seq, H], by the selected
rows, [rows, H], for the duration of one forward. The model then returns logits [rows, V] (in
``hidden[selected]`` order) and no loss; the losses are computed here.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from sparse_pretrain.core.distill import (
    IGNORE_INDEX,
    DistillationWeights,
    distillation_terms,
    kd_positions,
    pretraining_distillation_loss,
)

VOCAB_ROWS = ("needed", "all")
FORWARD_KEYS = ("input_ids", "attention_mask", "token_type_ids")

#: heads that start with a transform outside the module holding the vocabulary projection, by the
#: name of that projection's parent-level attribute: gathering before the transform saves it too
_HEAD_STARTS = {"vocab_projector": "vocab_transform"}   # DistilBERT: transform, activation, norm, projector


def head_entry(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose first input is the encoder's hidden states on their way into the MLM head:
    the model's direct child that holds the output embeddings (BERT ``cls``, RoBERTa ``lm_head``),
    or, where the head is laid out flat (DistilBERT), its first layer."""
    decoder = model.get_output_embeddings()
    if decoder is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (no MLM head) to apply at selected rows; "
                         f"set training.vocab_rows=all")
    for name, child in model.named_children():
        if child is decoder:
            return getattr(model, _HEAD_STARTS.get(name, name))
        if any(m is decoder for m in child.modules()):
            return child
    raise ValueError(f"{type(model).__name__}: its output embeddings are not one of its submodules; "
                     f"set training.vocab_rows=all")


@contextlib.contextmanager
def heads_at(model: torch.nn.Module, selected: torch.Tensor):
    """Within the block, ``model``'s MLM head sees only the rows of its input where ``selected``
    [batch, seq] is True (a one-forward pre-hook on :func:`head_entry`)."""
    entry = head_entry(model)

    def gather_rows(module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != selected.shape:
            raise ValueError(f"{type(model).__name__}: the MLM head's input has shape {tuple(hidden.shape)}, "
                             f"not [batch, seq, hidden] = {tuple(selected.shape)} + [H]; set training.vocab_rows=all")
        return (hidden[selected], *args[1:])

    handle = entry.register_forward_pre_hook(gather_rows)
    try:
        yield
    finally:
        handle.remove()


def mlm_logits(output) -> torch.Tensor:
    return output.prediction_logits if hasattr(output, "prediction_logits") else output.logits


def _hf_model(model):
    return getattr(model, "module", model)    # a DeepSpeed engine wraps the Hugging Face model


def _forward_rows(model, inputs: dict, rows: torch.Tensor):
    with heads_at(_hf_model(model), rows):
        return model(**inputs)


def pretraining_losses(student, teacher: Optional[torch.nn.Module], batch: dict,
                       weights: Optional[DistillationWeights], nsp: bool, *,
                       vocab_rows: str = "needed") -> dict[str, torch.Tensor]:
    """The loss of one micro-batch and its terms: ``loss`` (to backward), ``pretraining``, ``kd``,
    ``kd_kl`` (the KL divergence of ``kd``, detached, for logging: :class:`~sparse_pretrain.core.distill.KDTerms`;
    0-dim tensors) and ``rows`` (0-dim: vocabulary rows the student projected).

    ``student``: the model or its DeepSpeed engine; ``teacher``: the frozen teacher or None;
    ``batch``: input_ids, attention_mask[, token_type_ids], labels (-100 where not masked)[,
    next_sentence_label]; ``weights``: the distillation's (its ``chunk_rows``: the MLM KD term that
    many rows at a time, 0: at once), None without a teacher. The teacher runs under ``torch.no_grad``
    (not inference mode: its logits are saved for the KD backward, and ZeRO-3's hooks write into
    gathered parameters after a forward)."""
    if vocab_rows not in VOCAB_ROWS:
        raise ValueError(f"vocab_rows must be one of {VOCAB_ROWS}, got {vocab_rows!r}")
    inputs = {k: batch[k] for k in FORWARD_KEYS if k in batch}
    labels = batch["labels"]
    if vocab_rows == "all":
        return _all_rows(student, teacher, batch, inputs, weights, nsp)

    masked = labels != IGNORE_INDEX
    kd = teacher is not None and weights is not None
    # the rows the heads project: the masked positions, or with KD over all positions the
    # non-padding ones (which hold the masked ones: the collator masks tokens, never padding)
    every_token = kd and weights.positions == "all"
    rows = kd_positions(batch.get("attention_mask"), labels, "all") | masked if every_token else masked
    output = _forward_rows(student, inputs, rows)
    logits = mlm_logits(output)                                   # [rows, V], in hidden[rows] order
    mlm_rows = logits[masked[rows]] if every_token else logits    # no copy where every row is masked
    loss_pt = F.cross_entropy(mlm_rows.float(), labels[masked])
    if nsp:
        loss_pt = loss_pt + F.cross_entropy(output.seq_relationship_logits.float().view(-1, 2),
                                            batch["next_sentence_label"].view(-1))
    zero = torch.zeros((), device=logits.device)
    terms = {"pretraining": loss_pt, "loss": loss_pt, "kd": zero, "kd_kl": zero, "rows": rows.sum()}
    if not kd:
        return terms
    with torch.no_grad():
        teacher_out = _forward_rows(teacher, inputs, rows)
    student_rows, teacher_rows = logits, mlm_logits(teacher_out)  # KD reads every row projected
    loss_kd, kd_kl = distillation_terms(student_rows, teacher_rows, weights.temperature, weights.chunk_rows)
    if nsp:
        kd_nsp = distillation_terms(output.seq_relationship_logits, teacher_out.seq_relationship_logits,
                                    weights.temperature)
        loss_kd, kd_kl = loss_kd + kd_nsp.loss, kd_kl + kd_nsp.kl
    terms.update(kd=loss_kd, kd_kl=kd_kl, loss=weights.lambda_pt * loss_pt + weights.lambda_kd * loss_kd)
    return terms


def _all_rows(student, teacher, batch, inputs, weights, nsp):
    """The models' own forwards over every position (logits [batch, seq, V]), as before."""
    keys = (*FORWARD_KEYS, "labels", "next_sentence_label")
    output = student(**{k: batch[k] for k in keys if k in batch})
    loss_pt = output.loss
    zero = torch.zeros((), device=loss_pt.device)
    terms = {"pretraining": loss_pt, "loss": loss_pt, "kd": zero, "kd_kl": zero,
             "rows": batch["input_ids"].new_tensor(batch["input_ids"].numel())}
    if teacher is None or weights is None:
        return terms
    with torch.no_grad():
        teacher_out = teacher(**inputs)
    mixed = pretraining_distillation_loss(
        weights, loss_pt, mlm_logits(output), mlm_logits(teacher_out), batch.get("attention_mask"), batch["labels"],
        getattr(output, "seq_relationship_logits", None), teacher_out.seq_relationship_logits if nsp else None)
    terms.update(kd=mixed["kd"], kd_kl=mixed["kd_kl"], loss=mixed["loss"])
    return terms
