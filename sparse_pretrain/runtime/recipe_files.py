"""Reading a recipe file: YAML as a mapping, then ``key=value`` overrides from the command line.

Every recipe kind reads its file this way (pre-training, fine-tuning and QAT recipes); what the
mapping must hold is each schema's business (:func:`sparse_pretrain.runtime.schema.validated`).
An override's value is read as YAML (``pruning.final_sparsity=0.85``, ``data.data_files=[a, b]``),
and its dotted key names a place in the mapping, sections created on the way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from sparse_pretrain.runtime.schema import ConfigError

__all__ = ["read_yaml_tree", "apply_overrides"]


def read_yaml_tree(path: str | Path | None, error: type[Exception] = ConfigError, what: str = "config",
                   holds: str = "a mapping of sections") -> dict:
    """A YAML file as a mapping (empty without a path); otherwise ``error`` naming ``what`` the file
    is and that it must hold ``holds``."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise error(f"{what}: no such file {str(path)!r}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise error(f"{what}: {path} is not valid YAML ({err})") from None
    if not isinstance(tree, dict):
        raise error(f"{what}: {path} must hold {holds}")
    return tree


def apply_overrides(tree: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a config mapping, in place."""
    for text in overrides:
        _set_path(tree, *_parse_override(text))
    return tree


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. pruning.final_sparsity=0.85")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse {raw!r} ({err})") from None
    return key.strip().split("."), value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[:i + 1])}: is a value, cannot set {'.'.join(path)}")
        node = child
    node[path[-1]] = value
