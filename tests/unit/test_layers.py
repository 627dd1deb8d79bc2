"""The layers' import rules, read from the source with ``ast`` (nothing is imported or run).

Every import counts: at module level, inside functions (a lazy import is an import), under
``if TYPE_CHECKING:``, and ``importlib.import_module("...")`` / ``__import__("...")`` with a literal
name. A package's ``__init__.py`` runs before any of its modules, so it is held to the rules of every
layer below it (``sparse_pretrain/__init__.py`` to core's).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ("sparse_pretrain", "finetune", "launcher")


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def project(module: str) -> bool:
    return within(module, *PROJECT)


class Rule(NamedTuple):
    folder: str                              # relative to the repository root
    forbidden: Callable[[str], bool]         # absolute module name -> does this folder's code break the rule
    says: str


RULES = (
    Rule("sparse_pretrain/core",
         lambda m: not (m.split(".")[0] in sys.stdlib_module_names or within(m, "torch", "sparse_pretrain.core")),
         "sparse_pretrain.core imports only the standard library, torch and sparse_pretrain.core"),
    Rule("sparse_pretrain/runtime", lambda m: project(m) and not within(m, "sparse_pretrain.runtime"),
         "sparse_pretrain.runtime imports no project module outside sparse_pretrain.runtime"),
    Rule("sparse_pretrain/zero",
         lambda m: project(m) and not within(m, "sparse_pretrain.core", "sparse_pretrain.runtime",
                                             "sparse_pretrain.zero"),
         "sparse_pretrain.zero imports only sparse_pretrain.{core,runtime,zero} of the project"),
    Rule("sparse_pretrain/data",
         lambda m: project(m) and not within(m, "sparse_pretrain.runtime", "sparse_pretrain.data"),
         "sparse_pretrain.data imports only sparse_pretrain.{runtime,data} of the project"),
    Rule("sparse_pretrain", lambda m: within(m, "launcher"), "nothing outside launcher/ imports launcher"),
    Rule("finetune", lambda m: within(m, "launcher"), "nothing outside launcher/ imports launcher"),
    Rule("sparse_pretrain", lambda m: within(m, "finetune"), "sparse_pretrain never imports finetune"),
    Rule("finetune",
         lambda m: within(m, "sparse_pretrain") and not within(m, "sparse_pretrain.core", "sparse_pretrain.runtime",
                                                              "sparse_pretrain.zero",
                                                              "sparse_pretrain.pruning_section"),
         "finetune imports only sparse_pretrain.{core,runtime,zero,pruning_section} of the pre-training side"),
)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(root: Path, name: str) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(root: Path, path: Path):
    """(line, source text, absolute module name) of every import in ``path``. ``from X import y``
    imports ``X.y`` when that is a module of the tree, else ``X``; relative imports are resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(root, path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, ast.unparse(node), alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                yield node.lineno, ast.unparse(node), sub if alias.name != "*" and is_module(root, sub) else base
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            yield node.lineno, ast.unparse(node), node.args[0].value


def checked_files(root: Path, folder: str) -> list[Path]:
    """The modules of ``folder`` and the ``__init__.py`` of each package above it (they run first)."""
    files = sorted(p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)
    above = [root.joinpath(*Path(folder).parts[:i], "__init__.py") for i in range(1, len(Path(folder).parts))]
    return [p for p in above if p.is_file()] + files


def violations(root: Path, rules=RULES) -> list[str]:
    found = []
    for rule in rules:
        for path in checked_files(root, rule.folder):
            for line, text, module in imports(root, path):
                if rule.forbidden(module):
                    found.append(f"{path.relative_to(root)}:{line}: `{text}` ({rule.says})")
    return list(dict.fromkeys(found))


def test_the_layers_import_only_what_they_may():
    found = violations(ROOT)
    assert not found, "layer rules broken:\n" + "\n".join(found)


# --------------------------------------------------------------------------------------------
# the checker itself: a synthetic tree that breaks every rule once

def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


CLEAN = {
    "sparse_pretrain/__init__.py": '__version__ = "0"\n',
    "sparse_pretrain/core/__init__.py": "",
    "sparse_pretrain/core/masks.py": "import math\nimport torch.nn\nfrom typing import Optional\n",
    "sparse_pretrain/core/pruner.py": "from sparse_pretrain.core.masks import x\nfrom . import masks\n",
    "sparse_pretrain/runtime/__init__.py": "",
    "sparse_pretrain/runtime/schema.py": "import pydantic\nimport yaml\nfrom sparse_pretrain.runtime import atomic\n",
    "sparse_pretrain/runtime/atomic.py": "import os\n",
    "sparse_pretrain/zero/__init__.py": "",
    "sparse_pretrain/zero/shards.py": ("import deepspeed\nfrom sparse_pretrain.core import masks\n"
                                       "from sparse_pretrain.runtime.atomic import f\nfrom ..runtime import schema\n"),
    "sparse_pretrain/data/__init__.py": "",
    "sparse_pretrain/data/prepare.py": "import datasets\nfrom sparse_pretrain.runtime.atomic import f\n",
    "sparse_pretrain/trainer.py": "from sparse_pretrain.zero import shards\nfrom sparse_pretrain.data import prepare\n",
    "finetune/__init__.py": "",
    "finetune/trainer.py": "import accelerate\nfrom sparse_pretrain.zero.shards import y\n",
    "launcher/__init__.py": "",
    "launcher/cli.py": "from finetune import trainer\nfrom sparse_pretrain import trainer as t\n",
}

BROKEN = [   # (file, source, line, the import the message must name)
    ("sparse_pretrain/core/methods.py", "import torch\nimport yaml\n", 2, "import yaml"),
    ("sparse_pretrain/core/lazy.py", "def f():\n    from pydantic import BaseModel\n", 2,
     "from pydantic import BaseModel"),
    ("sparse_pretrain/core/other.py", "from sparse_pretrain.runtime import atomic\n", 1,
     "from sparse_pretrain.runtime import atomic"),
    ("sparse_pretrain/core/relative.py", "from ..zero import shards\n", 1, "from ..zero import shards"),
    ("sparse_pretrain/core/dynamic.py", "import importlib\nm = importlib.import_module('deepspeed')\n", 2,
     "importlib.import_module('deepspeed')"),
    ("sparse_pretrain/runtime/monitor.py", "import os\nfrom sparse_pretrain.core.masks import x\n", 2,
     "from sparse_pretrain.core.masks import x"),
    ("sparse_pretrain/runtime/version.py", "from sparse_pretrain import __version__\n", 1,
     "from sparse_pretrain import __version__"),
    ("sparse_pretrain/zero/export.py", "from sparse_pretrain.data import prepare\n", 1,
     "from sparse_pretrain.data import prepare"),
    ("sparse_pretrain/zero/cfg.py", "from sparse_pretrain import recipe\n", 1, "from sparse_pretrain import recipe"),
    ("sparse_pretrain/data/rows.py", "from sparse_pretrain.core import masks\n", 1,
     "from sparse_pretrain.core import masks"),
    ("sparse_pretrain/preflight.py", "def f():\n    from finetune.trainer import y\n", 2,
     "from finetune.trainer import y"),
    ("sparse_pretrain/schedule_report.py", "import launcher.cli\n", 1, "import launcher.cli"),
    ("finetune/heads.py", "if True:\n    from launcher import cli\n", 2, "from launcher import cli"),
    ("finetune/recipe.py", "from sparse_pretrain.recipe import Recipe\n", 1,
     "from sparse_pretrain.recipe import Recipe"),
]


def test_a_clean_tree_passes(tmp_path):
    write(tmp_path, {**CLEAN, "sparse_pretrain/recipe.py": ""})
    assert violations(tmp_path) == []


@pytest.mark.parametrize("rel, source, line, shown", BROKEN, ids=[b[0] for b in BROKEN])
def test_each_broken_rule_is_named_with_file_line_and_import(tmp_path, rel, source, line, shown):
    write(tmp_path, {**CLEAN, "sparse_pretrain/recipe.py": "", rel: source})
    found = violations(tmp_path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{rel}:{line}: `{shown}` ("), found


def test_the_package_init_above_a_layer_is_held_to_its_rule(tmp_path):
    write(tmp_path, {**CLEAN, "sparse_pretrain/__init__.py": "import yaml\n"})
    found = violations(tmp_path)
    assert found == ["sparse_pretrain/__init__.py:1: `import yaml` (sparse_pretrain.core imports only the "
                     "standard library, torch and sparse_pretrain.core)"], found


def test_a_broken_rule_fails_the_layer_test(tmp_path, monkeypatch):
    write(tmp_path, {**CLEAN, "finetune/heads.py": "from launcher.cli import main\n"})
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"finetune/heads\.py:1: `from launcher\.cli import main`"):
        test_the_layers_import_only_what_they_may()
