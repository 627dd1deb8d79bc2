"""``prune-ofa fetch``: what it fetches for shipped pipelines and recipes (exact lists; stage outputs,
local paths and packaged models excluded), where it puts it, and that a run offline then finds it.
No network: the downloads go through stand-ins of ``snapshot_download`` and ``load_dataset_builder``
that record their arguments and write the cache layouts the real ones leave."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from hub_cache import use_hf_home, write_prepared_dataset, write_snapshot
from launcher.cli import main
from launcher.fetch import choose_cache, collect, default_hf_home, pipeline_sources, recipe_items, recipe_kind

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs"
WIKIPEDIA = ("dataset", "wikimedia/wikipedia:20231101.en")
BERT = ("model", "bert-base-uncased")


@pytest.fixture(autouse=True)
def no_cluster_from_the_environment(monkeypatch):
    monkeypatch.delenv("PRUNE_OFA_CLUSTER", raising=False)      # fetch's default --cluster


def fetched(needs) -> dict:
    """(kind, label) -> 'key (readers)' of each item."""
    return {(n.item.kind, n.item.label): n.read_by for n in needs}


def config_items(path, *overrides) -> set:
    path = str(path)
    return {(i.kind, i.label) for i in recipe_items(recipe_kind(path, list(overrides)), path, list(overrides))}


# -- what is fetched -------------------------------------------------------------------------------

def test_a_shipped_pipeline_fetches_the_model_the_corpus_and_each_tasks_dataset():
    from launcher.pipeline import load_pipeline
    pipeline = load_pipeline("bert-base-85", check_partition=False, tasks=["squad", "mnli"])
    needs = fetched(collect(pipeline_sources(pipeline)))
    assert needs == {
        BERT: "model.name_or_path (prepare, teacher, squad-teacher, mnli-teacher)",
        WIKIPEDIA: "data.dataset_name (prepare)",        # pre-training stages read the prepared rows
        ("dataset", "rajpurkar/squad"): "task.name (squad-teacher, squad-transfer, squad-qat)",
        ("dataset", "nyu-mll/glue:mnli"): "task.name (mnli-teacher, mnli-transfer, mnli-qat)",
    }                                                  # the student, transfers and QAT read @stage outputs


def test_recipes_name_their_hub_items_and_overrides_apply():
    # the student prunes a local teacher (runs/...): only the corpus comes from the hub
    assert config_items(CONFIGS / "bert-base-uncased-85.yaml") == {WIKIPEDIA}
    assert config_items(CONFIGS / "bert-base-uncased-85.yaml", "model.name_or_path=bert-base-uncased",
                        "data.tokenizer_name_or_path=roberta-base", "data.dataset_config=20231101.de") == {
        BERT, ("tokenizer", "roberta-base"), ("dataset", "wikimedia/wikipedia:20231101.de")}
    assert config_items(CONFIGS / "bert-base-uncased-teacher.yaml", "data.data_files=[corpus/*.jsonl]") == {BERT}
    assert config_items(CONFIGS / "finetune" / "squad-teacher.yaml") == {BERT, ("dataset", "rajpurkar/squad")}
    assert config_items(CONFIGS / "finetune" / "mnli-transfer.yaml",          # local model and teacher
                        "distillation.teacher=textattack/bert-base-uncased-MNLI") == {
        ("model", "textattack/bert-base-uncased-MNLI"), ("dataset", "nyu-mll/glue:mnli")}
    assert config_items(CONFIGS / "finetune" / "sst2-teacher.yaml",
                        "task.data_files={train: a.json, validation: b.json}") == {BERT}


def test_the_packaged_model_and_offline_task_need_nothing(capsys, monkeypatch, tmp_path):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    use_hf_home(monkeypatch, tmp_path / "hf", offline=False)
    assert config_items(CONFIGS / "minilm-l6-teacher.yaml") == set()
    assert config_items(CONFIGS / "finetune" / "rt-teacher.yaml") == set()
    assert main(["fetch", "--pipeline", "minilm-rt"]) == 0
    out = capsys.readouterr().out
    assert "nothing to fetch" in out and "nothing from the hub for prepare, teacher, student, rt-teacher" in out


def test_a_recipe_is_told_apart_by_its_sections(tmp_path):
    from sparse_pretrain.runtime.errors import UserError
    assert recipe_kind(str(CONFIGS / "minilm-l6-85.yaml"), []) == "pretrain"
    assert recipe_kind(str(CONFIGS / "finetune" / "rt-qat.yaml"), []) == "finetune"
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"model": {"name_or_path": "bert-base-uncased"}}))
    assert recipe_kind(str(bare), ["task.name=sst2"]) == "finetune"     # the overrides count
    with pytest.raises(UserError, match=r"cannot tell what .* pre-training recipe has stage and data sections"):
        recipe_kind(str(bare), [])


# -- where it goes ---------------------------------------------------------------------------------

def test_the_cache_is_the_option_then_the_profile_then_hf_home_then_the_default(tmp_path):
    profile = SimpleNamespace(hf_home=tmp_path / "profile")
    env = {"HF_HOME": str(tmp_path / "env"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert choose_cache(str(tmp_path / "opt"), profile, env) == (tmp_path / "opt", "--cache")
    assert choose_cache(None, profile, env) == (tmp_path / "profile", "the cluster profile's hf_home")
    assert choose_cache(None, SimpleNamespace(hf_home=None), env) == (tmp_path / "env", "$HF_HOME")
    assert choose_cache(None, None, {"XDG_CACHE_HOME": str(tmp_path / "xdg")})[0] == tmp_path / "xdg" / "huggingface"
    assert default_hf_home({}) == Path("~/.cache/huggingface").expanduser()


@pytest.fixture
def fake_hub(monkeypatch):
    """snapshot_download and load_dataset_builder stand-ins: calls recorded, caches written."""
    import datasets
    import huggingface_hub
    calls = []

    def snapshot_download(repo_id, *, cache_dir, allow_patterns, **kwargs):
        calls.append(("snapshot_download", repo_id, str(cache_dir), list(allow_patterns)))
        files = {"config.json": b"{}", "tokenizer.json": b"{}"}
        if "model.safetensors" in allow_patterns:
            files["model.safetensors"] = b"w" * 2048
        return str(write_snapshot(Path(cache_dir), repo_id, files))

    class Builder:
        def __init__(self, path, name, cache_dir):
            calls.append(("load_dataset_builder", path, name, cache_dir))
            self.path, self.name, self.cache_dir = path, name, None
            self.root = Path(cache_dir)

        def download_and_prepare(self):
            self.cache_dir = str(write_prepared_dataset(self.root, self.path, self.name, b"r" * 3072))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda path, name=None, cache_dir=None: Builder(
        path, name, cache_dir))
    return calls


def test_fetch_downloads_into_the_cache_where_an_offline_run_finds_it(capsys, monkeypatch, tmp_path, fake_hub):
    from sparse_pretrain.runtime.model_checks import check_hub_dataset, model_source
    use_hf_home(monkeypatch, tmp_path / "login-node", offline=False)   # $HF_HOME here is not where it goes
    cache = tmp_path / "shared-hf"
    argv = ["fetch", "--config", str(CONFIGS / "finetune" / "mnli-teacher.yaml"), "--cache", str(cache)]
    assert main(argv) == 0
    assert [call[:3] for call in fake_hub] == [("snapshot_download", "bert-base-uncased", str(cache / "hub")),
                                               ("load_dataset_builder", "nyu-mll/glue", "mnli")]
    assert fake_hub[1][3] == str(cache / "datasets")
    patterns = fake_hub[0][3]
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= set(patterns)
    assert not any(p.endswith((".bin", ".h5", ".msgpack", ".onnx")) for p in patterns)   # safetensors only
    out = capsys.readouterr().out
    assert f"fetched into HF_HOME={cache}:" in out
    assert "bert-base-uncased" in out and "2.0 KiB" in out and "nyu-mll/glue:mnli" in out and "3.0 KiB" in out
    assert f"export HF_HOME={cache} HF_HUB_OFFLINE=1" in out
    # on a compute node: HF_HOME the shared cache, the network off; the preflight checks pass
    import datasets.load
    monkeypatch.setattr(datasets, "load_dataset_builder", datasets.load.load_dataset_builder)   # the real one
    use_hf_home(monkeypatch, cache, offline=True)
    assert Path(model_source("model.name_or_path", "bert-base-uncased")).parent.parent.name == \
        "models--bert-base-uncased"
    check_hub_dataset("task.name", "nyu-mll/glue", "mnli", "give task.data_files")
    assert main(["fetch", "--config", str(CONFIGS / "finetune" / "mnli-teacher.yaml"), "--dry-run"]) == 0
    assert all(line.split()[2] == "cached" for line in capsys.readouterr().out.splitlines() if line.startswith("  "))


def test_a_repository_without_safetensors_gets_its_pytorch_weights(monkeypatch, tmp_path):
    import huggingface_hub

    from launcher.fetch import fetch_model
    from sparse_pretrain.runtime.model_checks import HubItem
    calls = []

    def snapshot_download(repo_id, *, cache_dir, allow_patterns, **kwargs):
        calls.append(allow_patterns)
        files = {"config.json": b"{}", **({"pytorch_model.bin": b"w"} if "pytorch_model.bin" in allow_patterns else {})}
        return str(write_snapshot(Path(cache_dir), repo_id, files))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    path = fetch_model(HubItem("model", "acme/old-bert", "model.name_or_path"), tmp_path)
    assert len(calls) == 2 and "pytorch_model.bin" in calls[1] and (path / "pytorch_model.bin").is_file()
    calls.clear()
    fetch_model(HubItem("tokenizer", "acme/old-bert", "data.tokenizer_name_or_path"), tmp_path)
    assert len(calls) == 1 and not any("safetensors" in p or ".bin" in p for p in calls[0])   # no weights


def test_the_cluster_profile_names_the_cache_and_prepare_runs_the_prepare_stages(capsys, monkeypatch, tmp_path,
                                                                                  fake_hub):
    import launcher.cli
    use_hf_home(monkeypatch, tmp_path / "login-node", offline=False)
    profile = tmp_path / "cluster.yaml"
    profile.write_text(yaml.safe_dump({"hf_home": str(tmp_path / "site-hf"), "offline": True,
                                       "scratch": str(tmp_path / "scratch")}))
    spec = yaml.safe_load((CONFIGS / "pipelines" / "minilm-rt.yaml").read_text())
    (tmp_path / "minilm-rt.yaml").write_text(yaml.safe_dump({**spec, "workdir": str(ROOT)}))
    monkeypatch.chdir(tmp_path)                        # fetch runs elsewhere; prepare-data where the jobs run
    prepared = []
    monkeypatch.setattr(launcher.cli, "cmd_prepare_data", lambda args: prepared.append((args, Path.cwd())) or 0)
    assert main(["fetch", "--pipeline", str(tmp_path / "minilm-rt.yaml"), "--cluster", str(profile), "--prepare"]) == 0
    (args, cwd), = prepared
    assert Path(args.config) == CONFIGS / "minilm-l6-teacher.yaml" and cwd == ROOT and Path.cwd() == tmp_path
    assert f"data.cache_dir={tmp_path / 'scratch' / 'data' / 'prepared'}" in args.overrides   # the profile's scratch
    out = capsys.readouterr().out
    assert f"HF_HOME={tmp_path / 'site-hf'} (from the cluster profile's hf_home)" in out
    assert f"--cluster {profile}" in out and "prepare-data done" in out


# -- refusals --------------------------------------------------------------------------------------

def test_fetch_refuses_offline_and_says_what_to_give(capsys, monkeypatch, tmp_path, fake_hub):
    use_hf_home(monkeypatch, tmp_path / "hf", offline=True)
    assert main(["fetch", "--model", "bert-base-uncased"]) == 2
    assert "HF_HUB_OFFLINE=1" in capsys.readouterr().err and fake_hub == []
    assert main(["fetch", "--model", "bert-base-uncased", "--dry-run"]) == 0     # listing needs no network
    assert main(["fetch"]) == 2
    assert "--pipeline NAME_OR_PATH, --config RECIPE" in capsys.readouterr().err
    assert main(["fetch", "--pipeline", "minilm-rt", "training.seed=1", "--dry-run"]) == 2
    assert "training.seed=1: key=value overrides go with --config" in capsys.readouterr().err


def test_a_name_the_hub_does_not_know_fails_naming_the_key(capsys, monkeypatch, tmp_path):
    import huggingface_hub

    class RepositoryNotFoundError(Exception):   # stands for huggingface_hub's (its class name is what counts)
        pass

    def snapshot_download(repo_id, **kwargs):
        raise RepositoryNotFoundError(f"404 {repo_id}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    use_hf_home(monkeypatch, tmp_path / "hf", offline=False)
    recipe = str(CONFIGS / "finetune" / "sst2-teacher.yaml")
    assert main(["fetch", "--config", recipe, "model.name_or_path=acme/no-such-bert"]) == 2
    assert f"model.name_or_path ({recipe}): the hub has no model 'acme/no-such-bert'" in capsys.readouterr().err
