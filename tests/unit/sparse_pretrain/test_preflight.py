"""The pre-training preflight offline: a hub model or the pre-training corpus missing from the
Hugging Face cache fails before any weights load, with one message naming the item, the cache
(HF_HOME) and the `prune-ofa fetch` line that stages what the run reads."""
from __future__ import annotations

from pathlib import Path

import pytest

from hub_cache import use_hf_home, write_snapshot
from launcher.cli import main
from pretrain_fixtures import minilm_dir

ROOT = Path(__file__).resolve().parents[3]
TEACHER = ROOT / "configs" / "bert-base-uncased-teacher.yaml"


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_hub_model_not_in_the_cache_names_itself_the_cache_and_the_fetch_line(capsys, monkeypatch, tmp_path):
    hf = use_hf_home(monkeypatch, tmp_path / "hf")                 # empty, the network off
    assert main(["pretrain", "--config", str(TEACHER)]) == 2
    err = one_line(capsys)
    assert err.startswith("prune-ofa pretrain: model.name_or_path: 'bert-base-uncased'")
    assert f"HF_HOME={hf}" in err and "HF_HUB_OFFLINE=1 allows no download" in err
    # the run reads prepared rows, so its line stages the model only; prepare-data's the corpus too
    assert f"on a node with internet run `prune-ofa fetch --cache {hf} --model bert-base-uncased`" in err
    assert main(["prepare-data", "--config", str(TEACHER)]) == 2
    assert (f"`prune-ofa fetch --cache {hf} --model bert-base-uncased --dataset wikimedia/wikipedia:20231101.en`"
            in one_line(capsys))


@pytest.fixture
def staged_model(monkeypatch, tmp_path):
    """The offline cache holding a small BERT's config and tokenizer as acme/tiny-bert (no weights:
    prepare-data reads none)."""
    hf = use_hf_home(monkeypatch, tmp_path / "hf")
    files = {name: (Path(minilm_dir()) / name).read_bytes()
             for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")}
    write_snapshot(hf / "hub", "acme/tiny-bert", files)
    return hf


def test_prepare_data_offline_without_the_corpus_names_it(capsys, staged_model, tmp_path):
    argv = ["prepare-data", "--config", str(TEACHER), "model.name_or_path=acme/tiny-bert",
            f"data.cache_dir={tmp_path / 'prepared'}"]
    assert main(argv) == 2
    err = one_line(capsys)
    assert err.startswith("prune-ofa prepare-data: data.dataset_name: hub dataset wikimedia/wikipedia:20231101.en "
                          "is not in the datasets cache")
    assert f"datasets cache {staged_model / 'datasets'}" in err and "data.data_files" in err
    assert (f"`prune-ofa fetch --cache {staged_model} --model acme/tiny-bert --dataset wikimedia/wikipedia:20231101.en`"
            in err)


def test_prepare_data_offline_needs_no_corpus_once_its_rows_are_prepared(staged_model, tmp_path):
    """`prune-ofa fetch --prepare` built the rows on the login node: the prepare-data job finds them."""
    from sparse_pretrain.data.prepare import INFO_FILE, prepared_path
    from sparse_pretrain.preflight import check_pretrain
    from sparse_pretrain.recipe import load_recipe
    from sparse_pretrain.runtime.errors import UserError
    recipe = load_recipe(TEACHER, ["model.name_or_path=acme/tiny-bert", f"data.cache_dir={tmp_path / 'prepared'}"])
    with pytest.raises(UserError, match="wikimedia/wikipedia"):
        check_pretrain(recipe, prepare_only=True)
    rows = prepared_path(recipe)
    rows.mkdir(parents=True)
    (rows / INFO_FILE).write_text("{}")
    assert check_pretrain(recipe, prepare_only=True) == []
