"""SQuAD v1.1 for the transfer stage: data, sliding-window features, answer decoding, the metric.

Data flows one way through this module:

1. :func:`load_squad` reads a local file in the official nested format
   (``data[].paragraphs[].qas[]``) into a flat :class:`datasets.Dataset` with the columns of the
   hub's ``squad`` dataset (``id, title, context, question, answers{text, answer_start}``), or
   hands a hub name to :func:`datasets.load_dataset`.
2. :func:`prepare_train_features` / :func:`prepare_eval_features` tokenize (question, context)
   pairs for ``Dataset.map(batched=True)``. A context longer than one window is cut into windows of
   ``max_seq_length`` tokens that overlap by ``doc_stride`` tokens; each window is one *feature*,
   so one example may give several. A training feature's label is the first answer's token span
   if the whole answer lies inside its window, else the [CLS] token ("not in this window"). An
   evaluation feature keeps its ``example_id`` and the character offsets of its context tokens.
3. :func:`postprocess_predictions` turns a model's start/end logits over all the features of an
   example into one answer string: the best-scoring valid span (score = start logit + end logit,
   start <= end, at most ``max_answer_length`` tokens, both ends inside the context) over all its
   windows, read back from the original context through the offsets.
4. :func:`squad_metrics` is the official v1.1 evaluation (``evaluate-v1.1.py``): exact match and
   token F1 after :func:`normalize_answer`, the maximum over the reference answers, averaged over
   the references and reported in percent.

Tokenizers that pad on the left (XLNet style) take the pair the other way round, (context,
question), so that truncation and padding never meet in the middle of the pair; everything below
asks the tokenizer which side it pads on and which sequence index holds the context.
"""
from __future__ import annotations

import collections
import json
import os
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# -- the official SQuAD v1.1 metric ------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official normalization: lower case, drop ASCII punctuation, drop the articles
    a/an/the as whole words, collapse runs of whitespace (in that order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    """True when prediction and reference are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-overlap F1 (0..1) of the normalized strings, tokens split on whitespace and counted
    with multiplicity. No overlap (including an empty side) scores 0."""
    predicted = normalize_answer(prediction).split()
    reference = normalize_answer(ground_truth).split()
    overlap = sum((collections.Counter(predicted) & collections.Counter(reference)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def max_over_ground_truths(score_fn, prediction: str, ground_truths: Iterable[str]) -> float:
    """The best score of ``prediction`` against any of the reference answers."""
    return max(float(score_fn(prediction, truth)) for truth in ground_truths)


def squad_metrics(predictions: Mapping[str, str],
                  references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """``{"exact_match": %, "f1": %}`` over every question in ``references`` (id -> list of
    reference answer texts). As in the official script, a question with no prediction counts as
    wrong, and predictions for ids not in ``references`` are ignored."""
    if not references:
        raise ValueError("squad_metrics: no references to score against")
    exact = f1 = 0.0
    for qid, truths in references.items():
        if isinstance(truths, str):
            truths = [truths]
        if not truths:
            raise ValueError(f"squad_metrics: question {qid!r} has no reference answer")
        if qid not in predictions:
            continue
        exact += max_over_ground_truths(exact_match_score, predictions[qid], truths)
        f1 += max_over_ground_truths(f1_score, predictions[qid], truths)
    return {"exact_match": 100.0 * exact / len(references), "f1": 100.0 * f1 / len(references)}


def references_from(examples) -> dict[str, list[str]]:
    """``{id: answer texts}`` from examples with ``id`` and ``answers`` columns, for
    :func:`squad_metrics`."""
    return {qid: list(answers["text"]) for qid, answers in zip(examples["id"], examples["answers"])}


# -- loading -----------------------------------------------------------------------------------

def squad_features():
    """The column types of a SQuAD dataset, as the hub's ``squad`` declares them."""
    from datasets import Features, List, Value
    return Features({
        "id": Value("string"),
        "title": Value("string"),
        "context": Value("string"),
        "question": Value("string"),
        "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
    })


def _field(record: Any, key: str, kind: type, where: str, source: str):
    if not isinstance(record, dict) or key not in record:
        raise ValueError(f"{source}: {where} has no {key!r} field")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{source}: {where}.{key} should be {kind.__name__}, got {type(value).__name__}")
    return value


def squad_rows(squad: Mapping, source: str = "<squad>", check_spans: bool = True) -> list[dict]:
    """Flatten the official nested format (``{"data": [{"title", "paragraphs": [{"context",
    "qas": [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}``) into one row per
    question. A missing or mistyped field raises :class:`ValueError` naming where it is; with
    ``check_spans`` so does an answer whose text is not at ``answer_start`` in its context."""
    rows = []
    articles = _field(squad, "data", list, "the file", source)
    for a, article in enumerate(articles):
        where = f"data[{a}]"
        title = article.get("title", "") if isinstance(article, dict) else ""
        for p, paragraph in enumerate(_field(article, "paragraphs", list, where, source)):
            pwhere = f"{where}.paragraphs[{p}]"
            context = _field(paragraph, "context", str, pwhere, source)
            for q, qa in enumerate(_field(paragraph, "qas", list, pwhere, source)):
                qwhere = f"{pwhere}.qas[{q}]"
                qid = _field(qa, "id", str, qwhere, source)
                question = _field(qa, "question", str, qwhere, source)
                texts, starts = [], []
                for n, answer in enumerate(_field(qa, "answers", list, qwhere, source)):
                    awhere = f"{qwhere}.answers[{n}]"
                    text = _field(answer, "text", str, awhere, source)
                    start = _field(answer, "answer_start", int, awhere, source)
                    if check_spans and context[start:start + len(text)] != text:
                        raise ValueError(f"{source}: {awhere} (question {qid!r}): {text!r} is not at "
                                         f"answer_start {start} of its context (found "
                                         f"{context[start:start + len(text)]!r})")
                    texts.append(text)
                    starts.append(start)
                rows.append({"id": qid, "title": str(title), "context": context, "question": question,
                             "answers": {"text": texts, "answer_start": starts}})
    return rows


def load_squad(path_or_name: str, split: str = "train", check_spans: bool = True):
    """A SQuAD split as a :class:`datasets.Dataset`.

    ``path_or_name`` is either a local JSON file in the official format (one file is one split,
    so ``split`` is not used) or a dataset name for :func:`datasets.load_dataset` (``"squad"``,
    needs the hub or its cache), which gets ``split``.
    """
    import datasets
    if os.path.isfile(path_or_name):
        with open(path_or_name, encoding="utf-8") as f:
            try:
                squad = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path_or_name}: not a JSON file ({e})") from e
        rows = squad_rows(squad, source=path_or_name, check_spans=check_spans)
        return datasets.Dataset.from_list(rows, features=squad_features())
    if path_or_name.endswith(".json"):
        raise FileNotFoundError(f"no SQuAD file at {path_or_name}")
    return datasets.load_dataset(path_or_name, split=split)


# -- features ----------------------------------------------------------------------------------

def _tokenize(examples, tokenizer, max_seq_length: int, doc_stride: int, pad_to_max_length: bool):
    """Tokenize the (question, context) pairs of a batch into overlapping windows. Returns the
    encoding and the sequence index (0 or 1) of the context."""
    if doc_stride >= max_seq_length:
        raise ValueError(f"doc_stride ({doc_stride}) must be smaller than max_seq_length ({max_seq_length})")
    pad_on_right = tokenizer.padding_side == "right"
    # Some SQuAD questions start with a lot of whitespace; it only wastes window room.
    questions = [q.lstrip() for q in examples["question"]]
    contexts = examples["context"]
    first, second = (questions, contexts) if pad_on_right else (contexts, questions)
    encoding = tokenizer(
        first, second,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length" if pad_to_max_length else False,
    )
    return encoding, (1 if pad_on_right else 0)


def _cls_index(input_ids: Sequence[int], tokenizer) -> int:
    cls_id = tokenizer.cls_token_id
    if cls_id is not None and cls_id in input_ids:
        return input_ids.index(cls_id)
    return 0


def prepare_train_features(examples, tokenizer, max_seq_length: int = 384, doc_stride: int = 128,
                           pad_to_max_length: bool = True) -> dict[str, list]:
    """Training features for a batch of examples (``Dataset.map(batched=True,
    remove_columns=...)``): the tokenizer's columns plus ``start_positions`` and
    ``end_positions``, the token span of the first answer in each window, or the [CLS] index twice
    when that answer is not wholly inside the window (or the example has no answer)."""
    encoding, context_index = _tokenize(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length)
    sample_map = encoding.pop("overflow_to_sample_mapping")
    offset_map = encoding.pop("offset_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(offset_map):
        cls = _cls_index(encoding["input_ids"][i], tokenizer)
        answers = examples["answers"][sample_map[i]]
        span = None
        if answers["text"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            span = _token_span(offsets, encoding.sequence_ids(i), context_index, start_char, end_char)
        start, end = span if span is not None else (cls, cls)
        starts.append(start)
        ends.append(end)
    encoding["start_positions"] = starts
    encoding["end_positions"] = ends
    return dict(encoding)


def _token_span(offsets, sequence_ids, context_index: int, start_char: int, end_char: int):
    """The (first, last) context token covering characters [start_char, end_char), or None when
    the window's context does not cover them all."""
    context = [t for t, s in enumerate(sequence_ids) if s == context_index]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None
    # The last token starting at or before the answer, the first ending at or after it.
    start = max(t for t in context if offsets[t][0] <= start_char)
    end = min(t for t in context if offsets[t][1] >= end_char)
    return start, end


def prepare_eval_features(examples, tokenizer, max_seq_length: int = 384, doc_stride: int = 128,
                          pad_to_max_length: bool = True) -> dict[str, list]:
    """Evaluation features for a batch of examples: the tokenizer's columns plus ``example_id``
    (the id of the feature's example) and ``offset_mapping`` with ``None`` for every token outside
    the context (question, special tokens, padding), so only context spans can be decoded."""
    encoding, context_index = _tokenize(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length)
    sample_map = encoding.pop("overflow_to_sample_mapping")
    example_ids, offset_mapping = [], []
    for i, offsets in enumerate(encoding["offset_mapping"]):
        example_ids.append(examples["id"][sample_map[i]])
        sequence_ids = encoding.sequence_ids(i)
        offset_mapping.append([tuple(o) if sequence_ids[t] == context_index else None
                               for t, o in enumerate(offsets)])
    encoding["example_id"] = example_ids
    encoding["offset_mapping"] = offset_mapping
    return dict(encoding)


# -- decoding ----------------------------------------------------------------------------------

def postprocess_predictions(examples, features, start_logits, end_logits, n_best_size: int = 20,
                            max_answer_length: int = 30) -> dict[str, str]:
    """``{example id: answer text}`` from per-feature logits (row ``i`` belongs to ``features[i]``,
    shaped ``[n_features, seq_len]`` or a list of per-feature rows, padding allowed).

    For each window, the ``n_best_size`` highest start and end logits give the candidate spans;
    a span counts if both ends are context tokens (an offset that is not ``None``), start <= end
    and it is at most ``max_answer_length`` tokens long. The best candidate over all windows of an
    example (score: start logit + end logit) is read back from the context by character offsets;
    an example with no valid candidate gets the empty string.
    """
    feature_example_ids = features["example_id"]  # a Dataset or a dict of columns
    n = len(feature_example_ids)
    if len(start_logits) != n or len(end_logits) != n:
        raise ValueError(f"{n} features but {len(start_logits)} start / {len(end_logits)} end logit rows")
    by_example: dict[str, list[int]] = collections.defaultdict(list)
    for i, example_id in enumerate(feature_example_ids):
        by_example[example_id].append(i)
    all_offsets = features["offset_mapping"]

    predictions = {}
    for qid, context in zip(examples["id"], examples["context"]):
        best_score, best_text = -np.inf, ""
        for i in by_example.get(qid, []):
            offsets = all_offsets[i]
            starts = np.asarray(start_logits[i], dtype=np.float64)[:len(offsets)]
            ends = np.asarray(end_logits[i], dtype=np.float64)[:len(offsets)]
            for s in np.argsort(starts)[::-1][:n_best_size]:
                if offsets[s] is None:
                    continue
                for e in np.argsort(ends)[::-1][:n_best_size]:
                    if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = starts[s] + ends[e]
                    if score > best_score:
                        best_score, best_text = score, context[offsets[s][0]:offsets[e][1]]
        predictions[qid] = best_text
    return predictions
