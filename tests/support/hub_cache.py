"""A Hugging Face cache for tests: an empty HF_HOME with the network off, as a compute node without
internet has it, and the cache layouts that ``prune-ofa fetch`` leaves (a model snapshot, a prepared
dataset), written without the network.

huggingface_hub and datasets read HF_HOME and the offline variables once, at import; a test in this
process sets both the variables and the values those libraries computed from them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def use_hf_home(monkeypatch, hf_home: Path, offline: bool = True) -> Path:
    """HF_HOME (and the network off, with ``offline``) for this process, as the libraries read it."""
    import datasets.config
    import huggingface_hub.constants
    hf_home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    for name in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_OFFLINE", *OFFLINE):
        monkeypatch.delenv(name, raising=False)
    if offline:
        for name, value in OFFLINE.items():
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", offline)
    return hf_home


def write_snapshot(hub_cache: Path, repo: str, files: dict[str, bytes], revision: str = "0" * 40) -> Path:
    """A model snapshot as huggingface_hub leaves it (``models--owner--name/snapshots/<rev>``, refs/main)."""
    entry = Path(hub_cache) / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(revision)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def write_prepared_dataset(datasets_cache: Path, path: str, config: Optional[str], data: bytes = b"rows") -> Path:
    """A prepared hub dataset as datasets leaves it (``owner___name/<config>/<version>/<hash>`` with
    dataset_info.json), where ``load_dataset(path, config)`` looks offline."""
    owner, _, name = path.rpartition("/")
    config = config or "default"
    prepared = Path(datasets_cache) / "___".join(([owner] if owner else []) + [name]) / config / "0.0.0" / "abc123"
    prepared.mkdir(parents=True, exist_ok=True)
    (prepared / "dataset_info.json").write_text(json.dumps({"config_name": config, "splits": {}}))
    (prepared / f"{name}-train.arrow").write_bytes(data)
    return prepared
