"""Dynamic masking at collate time: BERT's 15% with 80% [MASK] / 10% random token / 10% unchanged.

Why not ``transformers.DataCollatorForLanguageModeling`` (5.23, which takes a ``seed``): its
generator is one stream per process, re-seeded ``seed + worker_id`` inside DataLoader workers, so
the masks depend on ``num_workers`` and on how many batches each worker happened to collate; it
has no state to save, so a resumed run masks differently from an uninterrupted one; and its
random replacements are drawn from the whole vocabulary, special tokens included.

Here each row is masked by its own ``torch.Generator``:

- rows that carry a ``mask_seed`` (added by :class:`~sparse_pretrain.data.batches.PretrainingRows`
  from :class:`~sparse_pretrain.data.batches.PretrainingBatches`, a function of the data seed,
  the epoch and the sample's global position) are masked from that seed alone: the same sample
  at the same step gets the same mask in any number of workers, on any world size, after resume;
- rows without one draw from the collator's own generator, whose state is
  :meth:`MaskingCollator.state_dict` (exact when collating in the training process).

Every row draws the same amount of randomness for its length, independent of padding or of the
other rows in the batch. Every row has at least one masked position (its smallest draw, when the 15%
draw selected none). Special tokens ([CLS], [SEP], [PAD], ...) are never selected, and
random replacements never are special tokens.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE_INDEX = -100


class MaskingCollator:
    """Pad rows to the batch maximum (rounded up to ``pad_to_multiple_of``) and mask them.

    Rows are mappings with ``input_ids`` and optionally ``token_type_ids``,
    ``next_sentence_label`` and ``mask_seed``. Returns long tensors ``input_ids`` (masked),
    ``attention_mask``, ``token_type_ids``, ``labels`` (the original id at selected positions,
    -100 elsewhere) and ``next_sentence_label`` when the rows have it.
    """

    def __init__(self, tokenizer, mlm_probability: float = 0.15, mask_replace_prob: float = 0.8,
                 random_replace_prob: float = 0.1, pad_to_multiple_of: int | None = 8, seed: int = 0):
        if not 0 < mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if mask_replace_prob < 0 or random_replace_prob < 0 or mask_replace_prob + random_replace_prob > 1:
            raise ValueError("mask_replace_prob and random_replace_prob must be >= 0 and sum to <= 1")
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a mask and a pad token for masked-LM")
        self.mlm_probability = mlm_probability
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mask_token_id = tokenizer.mask_token_id
        self.pad_token_id = tokenizer.pad_token_id
        vocab_size = len(tokenizer)
        special = sorted(set(tokenizer.all_special_ids))
        self.is_special = torch.zeros(vocab_size, dtype=torch.bool)
        self.is_special[torch.tensor(special, dtype=torch.long)] = True
        self.replacement_ids = torch.nonzero(~self.is_special).flatten()
        self.generator = torch.Generator().manual_seed(seed)

    # -- state (only the generator for rows without a mask_seed) ---------------------------------
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    # -- masking ----------------------------------------------------------------------------------
    def mask_row(self, ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask one unpadded row; returns (masked ids, labels)."""
        n = ids.numel()
        select_draw = torch.rand(n, generator=generator)
        action_draw = torch.rand(n, generator=generator)
        random_ids = self.replacement_ids[
            torch.randint(len(self.replacement_ids), (n,), generator=generator)]
        special = self.is_special[ids.clamp(0, len(self.is_special) - 1)]
        selected = (select_draw < self.mlm_probability) & ~special
        if not selected.any() and not special.all():
            # a row with nothing masked would make the masked-LM loss 0/0 (NaN) in a micro-batch of
            # such rows (short rows, micro-batch 1): mask the position with the smallest draw instead
            selected[torch.where(special, 2.0, select_draw).argmin()] = True
        labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
        to_mask = selected & (action_draw < self.mask_replace_prob)
        to_random = selected & ~to_mask & (action_draw < self.mask_replace_prob + self.random_replace_prob)
        masked = torch.where(to_mask, torch.full_like(ids, self.mask_token_id), ids)
        masked = torch.where(to_random, random_ids, masked)
        return masked, labels

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("empty batch")
        lengths = [len(r["input_ids"]) for r in rows]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        token_type_ids = torch.zeros((batch, width), dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            seed = row.get("mask_seed")
            generator = self.generator if seed is None else torch.Generator().manual_seed(int(seed))
            input_ids[i, :n], labels[i, :n] = self.mask_row(ids, generator)
            attention_mask[i, :n] = 1
            if "token_type_ids" in row:
                token_type_ids[i, :n] = torch.as_tensor(row["token_type_ids"], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
               "labels": labels}
        if "next_sentence_label" in rows[0]:
            out["next_sentence_label"] = torch.tensor([int(r["next_sentence_label"]) for r in rows],
                                                      dtype=torch.long)
        return out
