"""Pre-training rows from tokenized documents, as BERT's ``create_pretraining_data.py`` builds them.

A document is a list of sentences, each a list of token ids (no special tokens). Consecutive
sentences are packed into a row of up to ``max_seq_length`` tokens; with probability
``short_seq_prob`` a row aims at a shorter random length (so the model also sees short inputs).

- With next-sentence prediction (BERT): a row is ``[CLS] A [SEP] B [SEP]``; A is the first
  1..k-1 sentences of the packed chunk; with probability 1/2 (always when the chunk has one
  sentence) B is a random stretch of another document (``next_sentence_label`` 1) and the unused
  sentences go back to be packed again, else B is the rest of the chunk (label 0, "is next", the
  label convention of ``BertForPreTraining``). The pair is truncated to fit, one token at a time
  from the longer side, at its front or back at random. ``token_type_ids`` are 0 for A, 1 for B.
- Without NSP (DistilBERT, RoBERTa style): ``[CLS] sentences [SEP]``, ``token_type_ids`` all 0.

Differences from the reference script: the target length is drawn per row (not once per
document), a sentence longer than a row is cut into row-sized pieces first (so no text is lost),
and one pass over the data (dynamic masking at collate time replaces ``dupe_factor``).

Everything random comes from the :class:`random.Random` passed in, which the caller seeds per
document (:func:`document_rng`), so rows do not depend on how documents are batched or sharded.
"""
from __future__ import annotations

import random
from typing import Callable, Optional

Sentence = list[int]
Document = list[Sentence]


def document_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator for one document: a string seed is hashed with SHA-512 by :mod:`random`,
    so it is the same in every process and Python run (unlike ``hash()``)."""
    return random.Random(f"prune-ofa/{seed}/{split}/{index}")


def split_long(sentences: Document, max_tokens: int) -> Document:
    """Cut every sentence longer than ``max_tokens`` into consecutive pieces of at most that."""
    out = []
    for sentence in sentences:
        for start in range(0, len(sentence), max_tokens):
            out.append(sentence[start:start + max_tokens])
    return [s for s in out if s]


def _target_length(rng: random.Random, max_tokens: int, short_seq_prob: float) -> int:
    if rng.random() < short_seq_prob:
        return rng.randint(2, max_tokens)
    return max_tokens


def truncate_pair(tokens_a: list, tokens_b: list, max_tokens: int, rng: random.Random) -> None:
    """BERT's ``truncate_seq_pair``: drop tokens from the longer side, front or back at random."""
    while len(tokens_a) + len(tokens_b) > max_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def nsp_rows(document: Document, rng: random.Random, max_seq_length: int, short_seq_prob: float,
             random_document: Callable[[random.Random], Optional[Document]],
             cls_id: int, sep_id: int) -> list[dict]:
    """Rows with segment pairs and ``next_sentence_label`` (see the module docstring).

    ``random_document(rng)`` returns another document of the same split, as any sequence of
    sentences (only ``len`` and indexing are used; ``None`` if there is none: then B is always the
    true continuation, and single-sentence chunks are skipped). B may overshoot its target length;
    the pair is truncated to fit.
    """
    max_tokens = max_seq_length - 3
    if max_tokens < 2:
        raise ValueError(f"max_seq_length {max_seq_length} leaves no room for two segments")
    document = split_long(document, max_tokens)
    rows = []
    target = _target_length(rng, max_tokens, short_seq_prob)
    chunk: Document = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            a_end = 1 if len(chunk) < 2 else rng.randint(1, len(chunk) - 1)
            tokens_a = [t for s in chunk[:a_end] for t in s]
            other = None
            if len(chunk) == 1 or rng.random() < 0.5:
                other = random_document(rng)
            if other is not None:
                label = 1
                target_b = max(1, target - len(tokens_a))
                tokens_b = []
                for k in range(rng.randint(0, len(other) - 1), len(other)):
                    tokens_b.extend(other[k])
                    if len(tokens_b) >= target_b:
                        break
                i -= len(chunk) - a_end          # the unused sentences are packed again
            else:
                label = 0
                tokens_b = [t for s in chunk[a_end:] for t in s]
            if tokens_b:
                truncate_pair(tokens_a, tokens_b, max_tokens, rng)
                rows.append({
                    "input_ids": [cls_id] + tokens_a + [sep_id] + tokens_b + [sep_id],
                    "token_type_ids": [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1),
                    "next_sentence_label": label,
                })
            chunk, length = [], 0
            target = _target_length(rng, max_tokens, short_seq_prob)
        i += 1
    return rows


def mlm_rows(document: Document, rng: random.Random, max_seq_length: int, short_seq_prob: float,
             cls_id: int, sep_id: int) -> list[dict]:
    """Rows ``[CLS] consecutive sentences [SEP]`` for models trained on masked-LM only."""
    max_tokens = max_seq_length - 2
    if max_tokens < 1:
        raise ValueError(f"max_seq_length {max_seq_length} leaves no room for tokens")
    rows = []
    target = _target_length(rng, max_tokens, short_seq_prob)
    current: list[int] = []
    for sentence in split_long(document, max_tokens):
        if current and len(current) + len(sentence) > target:
            rows.append(current)
            current = []
            target = _target_length(rng, max_tokens, short_seq_prob)
        current = current + sentence
    if current:
        rows.append(current)
    return [{"input_ids": [cls_id] + r + [sep_id], "token_type_ids": [0] * (len(r) + 2)} for r in rows]
