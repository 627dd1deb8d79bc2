"""The fine-tuning preflight offline: a task's hub dataset (GLUE, SQuAD) or a hub model missing from
the Hugging Face cache fails before anything loads, with one message naming the item, the cache
(HF_HOME) and the `prune-ofa fetch` line that stages what the run reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub_cache import use_hf_home
from launcher.cli import main

ROOT = Path(__file__).resolve().parents[3]
FINETUNE = ROOT / "configs" / "finetune"
PRUNE_OFA = Path(sys.executable).parent / "prune-ofa"


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("command", ["finetune", "qat"])
def test_a_glue_task_not_in_the_cache_names_it_the_cache_and_the_fetch_line(capsys, monkeypatch, tmp_path, command):
    hf = use_hf_home(monkeypatch, tmp_path / "hf")                 # empty, the network off
    recipe = FINETUNE / ("mnli-teacher.yaml" if command == "finetune" else "mnli-qat.yaml")
    assert main([command, "--config", str(recipe)]) == 2
    err = one_line(capsys)
    assert err.startswith(f"prune-ofa {command}: task.name: hub dataset nyu-mll/glue:mnli is not in the datasets "
                          f"cache (HF_HOME={hf}, datasets cache {hf / 'datasets'})")
    models = "--model bert-base-uncased " if command == "finetune" else ""      # QAT reads earlier stages' models
    assert f"on a node with internet run `prune-ofa fetch --cache {hf} {models}--dataset nyu-mll/glue:mnli`" in err


def test_a_hub_model_not_in_the_cache_names_itself(capsys, monkeypatch, tmp_path):
    hf = use_hf_home(monkeypatch, tmp_path / "hf")
    files = {}
    for split in ("train", "validation"):
        files[split] = tmp_path / f"{split}.json"
        files[split].write_text(json.dumps({"sentence": "a fine film", "label": 1}) + "\n")
    argv = ["finetune", "--config", str(FINETUNE / "sst2-teacher.yaml"),
            f"task.data_files={{train: {files['train']}, validation: {files['validation']}}}"]
    assert main(argv) == 2
    err = one_line(capsys)
    assert err.startswith("prune-ofa finetune: model.name_or_path: 'bert-base-uncased' is no local directory")
    assert f"HF_HOME={hf}" in err and f"`prune-ofa fetch --cache {hf} --model bert-base-uncased`" in err


@pytest.mark.slow
def test_offline_in_a_fresh_process_from_the_environment_alone(tmp_path):
    """What a compute node does: HF_HOME and HF_HUB_OFFLINE in the environment, nothing patched."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "PRUNE_OFA_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    done = subprocess.run([str(PRUNE_OFA), "finetune", "--config", str(FINETUNE / "squad-teacher.yaml")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "hub dataset rajpurkar/squad is not in the datasets cache" in done.stderr
    assert (f"`prune-ofa fetch --cache {tmp_path / 'hf'} --model bert-base-uncased --dataset rajpurkar/squad`"
            in done.stderr)
