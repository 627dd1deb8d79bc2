"""Checks of what a run will read, shared by the recipes' preflights: model directories and hub names,
configs, tokenizers, data files, hub datasets, the transformers class a run builds and the attention
implementations it supports.

Each problem is a :class:`UserError` naming the key, the path and what to do. Nothing here builds a
model with weights: configs, tokenizers, file listings and meta-device skeletons only
(:func:`meta_skeleton`). transformers, huggingface_hub and datasets are imported when a check needs them.

What a run reads from the hub is a list of :class:`HubItem` (each recipe's preflight says which);
offline (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``) one that is not in the
cache fails naming it, the cache (``HF_HOME``) and the ``prune-ofa fetch`` line that stages what the run
reads (:func:`fetch_command`), to run where there is internet.
"""
from __future__ import annotations

import difflib
import glob
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from sparse_pretrain.runtime.errors import UserError

# the weight files transformers reads (transformers.utils.SAFE_WEIGHTS_NAME, ...), without importing it
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_WEIGHTS, TORCH_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


# -- paths and hub names ----------------------------------------------------------------------------

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _set(name: str) -> bool:
    return os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or _set("HF_HUB_OFFLINE") or _set("TRANSFORMERS_OFFLINE")


def _datasets_offline() -> bool:
    """datasets reads HF_DATASETS_OFFLINE (else HF_HUB_OFFLINE) once, at import."""
    if _hub_offline() or _set("HF_DATASETS_OFFLINE"):
        return True
    import datasets
    return bool(datasets.config.HF_HUB_OFFLINE)


def _offline_variable(names=OFFLINE_VARIABLES) -> str:
    """The variable that turned the network off, for the message (``HF_HUB_OFFLINE=1`` by default)."""
    return next((f"{name}=1" for name in names if _set(name)), "HF_HUB_OFFLINE=1")


def hf_home() -> str:
    """The Hugging Face cache this process reads (``HF_HOME``; hub and datasets caches below it)."""
    from huggingface_hub import constants
    return str(constants.HF_HOME)


@dataclass(frozen=True)
class HubItem:
    """Something a run reads from the Hugging Face hub: a model (config, weights, tokenizer), a
    tokenizer (config and tokenizer files only) or a dataset (``config`` its configuration); ``key``
    is the recipe key that names it."""
    kind: str                                # "model" | "tokenizer" | "dataset"
    name: str
    key: str
    config: Optional[str] = None

    @property
    def label(self) -> str:
        """``bert-base-uncased``, ``nyu-mll/glue:mnli``: as ``prune-ofa fetch --dataset`` spells it."""
        return f"{self.name}:{self.config}" if self.config else self.name

    @property
    def fetch_args(self) -> list[str]:
        return [f"--{self.kind}", self.label]


def hub_model(key: str, name: Optional[str], weights: bool = True) -> Optional[HubItem]:
    """The hub item ``name`` is, or None for no name, a local path (an earlier stage's output, a
    packaged model resolved to its directory) or no valid hub id (the run's check says why)."""
    if not isinstance(name, str) or not name or looks_local(name):
        return None
    return HubItem("model" if weights else "tokenizer", name, key)


def fetch_command(items: Iterable[HubItem], cache: Optional[str] = None) -> str:
    """The ``prune-ofa fetch`` line that stages ``items`` into ``cache`` (default: this process's
    HF_HOME), items in order and each once."""
    args, seen = ["prune-ofa", "fetch", "--cache", cache or hf_home()], set()
    for item in items:
        if (item.kind, item.label) not in seen:
            seen.add((item.kind, item.label))
            args += item.fetch_args
    return shlex.join(args)


def _stage_hint(item: HubItem, fetch: Optional[str]) -> str:
    """Where to stage ``item``: the fetch line (``fetch``: the one for the whole run), on a node with
    internet, with the same HF_HOME on every node."""
    line = fetch or fetch_command([item])
    also = f" (or `hf download {item.name}`)" if item.kind != "dataset" else ""
    return (f"on a node with internet run `{line}`{also}, then use that HF_HOME here and on every node "
            f"(it must be a directory they all share)")


def _valid_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def looks_local(name: str) -> bool:
    """A path rather than a hub name: it exists, starts with ``/``, ``.`` or ``~``, has more than one
    ``/`` (hub ids are ``name`` or ``owner/name``), starts with a directory that exists here (``runs/x``
    with ``runs/`` here), or is no valid hub id."""
    if os.path.exists(os.path.expanduser(name)) or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in name:
        return True
    if "/" in name and os.path.isdir(name.split("/", 1)[0]):
        return True
    return not _valid_repo_id(name)


def missing_path_hint(path: Path) -> str:
    """' (did you mean ...?)' or what the nearest existing parent holds."""
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return ""
    if parent == path.parent:
        names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
        close = difflib.get_close_matches(path.name, names, n=1)
        if close:
            return f" (did you mean {str(parent / close[0])!r}?)"
    return f" ({str(parent)!r} exists, {str(path.relative_to(parent))!r} in it does not)" if parent != Path(".") else ""


def is_connection_problem(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) says the hub cannot be reached."""
    names = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout", "ConnectError",
             "Timeout", "ReadTimeout", "ProxyError"}
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if any(cls.__name__ in names for cls in type(err).__mro__) or "couldn't connect" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def model_source(key: str, name, weights: bool = True, fetch: Optional[str] = None) -> str:
    """Where the model named by ``key`` is read from: a local directory (checked for config.json and,
    with ``weights``, a weight file), the cached snapshot of a hub name, or (online) the hub name.
    ``fetch``: the ``prune-ofa fetch`` line a message about a missing hub model gives (default: one
    for this model)."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{key}: must be a model directory or a hub name, got {name!r}")
    if looks_local(name):
        path = Path(os.path.expanduser(name))
        if not path.exists():
            raise UserError(f"{key}: no such directory {name!r}{missing_path_hint(path)}; give a Hugging Face "
                            f"model directory (an earlier stage's <output_dir>/model) or a hub name")
        if not path.is_dir():
            raise UserError(f"{key}: {name!r} is a file; give the model's directory (the one with config.json)")
        if not (path / "config.json").is_file():
            raise UserError(f"{key}: {name!r} has no config.json, so it is not a Hugging Face model directory "
                            f"(save_pretrained writes one; an earlier stage's model is <output_dir>/model)")
        if weights and not any((path / f).is_file() for f in WEIGHT_FILES):
            raise UserError(f"{key}: {name!r} has no weights ({SAFE_WEIGHTS} or {TORCH_WEIGHTS}, or their "
                            f".index.json); was the run that writes it finished?")
        return str(path)
    from huggingface_hub import constants, try_to_load_from_cache
    item = HubItem("model" if weights else "tokenizer", name, key)
    cache = f"the Hugging Face cache (HF_HOME={hf_home()}, hub cache {constants.HF_HUB_CACHE})"
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        snapshot = os.path.dirname(cached)
        if not weights or any(isinstance(try_to_load_from_cache(name, f), str) for f in WEIGHT_FILES):
            return snapshot
        if _hub_offline():
            raise UserError(f"{key}: hub model {name!r} is in {cache} without its weights, and "
                            f"{_offline_variable()} allows no download: {_stage_hint(item, fetch)}")
        return name
    if _hub_offline():
        raise UserError(f"{key}: {name!r} is no local directory, and as a hub name it is not in {cache} while "
                        f"{_offline_variable()} allows no download: {_stage_hint(item, fetch)}, or give a local "
                        f"directory")
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(name)       # online: fetches config.json only
    except (OSError, ValueError) as err:
        if is_connection_problem(err):
            raise UserError(f"{key}: hub model {name!r} is not in {cache} and the hub cannot be reached from "
                            f"here: {_stage_hint(item, fetch)}, or give a local directory") from None
        raise UserError(f"{key}: {name!r} is no local directory, and the hub says: "
                        f"{str(err).strip().splitlines()[0]}") from None
    return name


def load_config(key: str, source: str):
    """The model's transformers config (config.json only)."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{key}: transformers cannot read the config of {source!r}: {first}") from None


def check_tokenizer(key: str, source: str, pretraining: bool) -> None:
    """The tokenizer at ``source`` loads (a fast one with [CLS]/[SEP] for pre-training)."""
    from transformers import AutoTokenizer
    if os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, f)) for f in TOKENIZER_FILES):
        # transformers would fall back to another tokenizer (e.g. the hub one of the model type)
        raise UserError(f"{key}: {source!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); give a "
                        f"directory with the model's tokenizer (save_pretrained of the tokenizer writes them)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{key}: no tokenizer could be loaded from {source!r} ({first}); give a directory "
                        f"with the model's tokenizer files (tokenizer.json)") from None
    if pretraining and not tokenizer.is_fast:
        raise UserError(f"{key}: {source!r} has no fast tokenizer (tokenizer.json), which pre-training needs")
    if pretraining and (tokenizer.cls_token_id is None or tokenizer.sep_token_id is None):
        raise UserError(f"{key}: the tokenizer of {source!r} has no [CLS]/[SEP] tokens, which pre-training rows need")


def check_files(key: str, patterns) -> None:
    """Each path or glob matches at least one file (the data files of a run)."""
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise UserError(f"{key}: must be file paths or globs, got {pattern!r}")
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            path = Path(os.path.expanduser(pattern))
            hint = missing_path_hint(path) if not glob.has_magic(pattern) else ""
            raise UserError(f"{key}: {pattern!r} matches no file{hint} (`prune-ofa materialize-corpus` writes "
                            f"the demo corpus)")
        if not any(os.path.isfile(m) for m in matches):
            raise UserError(f"{key}: {pattern!r} is a directory, not a file; give its files "
                            f"(e.g. {os.path.join(pattern, '*.jsonl')!r})")


def check_hub_dataset(key: str, path: str, config: Optional[str], how: str, fetch: Optional[str] = None) -> None:
    """With the network off, a hub dataset must be in the datasets cache (``fetch``: the ``prune-ofa
    fetch`` line the message gives; default: one for this dataset)."""
    if not _datasets_offline():
        return
    import datasets
    try:
        datasets.load_dataset_builder(path, config)
    except Exception:   # noqa: BLE001  (whatever datasets raises offline: not there, not cached, no script)
        item = HubItem("dataset", path, key, config)
        raise UserError(f"{key}: hub dataset {item.label} is not in the datasets cache (HF_HOME={hf_home()}, "
                        f"datasets cache {datasets.config.HF_DATASETS_CACHE}) and "
                        f"{_offline_variable(('HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE'))} allows no download: "
                        f"{_stage_hint(item, fetch)}; or {how}") from None


# -- architectures and attention ------------------------------------------------------------------

def model_class_for(key: str, config, mapping_name: str, head: str, why: str):
    """The transformers class the run builds for ``config`` (``mapping_name``: e.g.
    MODEL_FOR_MASKED_LM_MAPPING), or a UserError naming what is missing."""
    import transformers
    mapping = getattr(transformers, mapping_name)
    try:
        return mapping[type(config)]
    except KeyError:
        auto = {"MODEL_FOR_MASKED_LM_MAPPING": "AutoModelForMaskedLM",
                "MODEL_FOR_PRETRAINING_MAPPING": "AutoModelForPreTraining",
                "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING": "AutoModelForSequenceClassification",
                "MODEL_FOR_QUESTION_ANSWERING_MAPPING": "AutoModelForQuestionAnswering"}[mapping_name]
        raise UserError(f"{key}: model type {config.model_type!r} ({type(config).__name__}) has no {head} head in "
                        f"transformers {transformers.__version__} ({auto} has no class for it); {why}") from None


def supported_attention(cls) -> list[str]:
    """The attention implementations ``cls`` supports here, best first (eager always)."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_torch_flex_attn_available
    found = []
    if getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False):
        found += [name for name, ok in (("flash_attention_3", is_flash_attn_3_available),
                                        ("flash_attention_2", is_flash_attn_2_available)) if ok()]
    if getattr(cls, "_supports_sdpa", False):
        found.append("sdpa")
    if getattr(cls, "_supports_flex_attn", False) and is_torch_flex_attn_available():
        found.append("flex_attention")
    return found + ["eager"]


def choose_attention(requested, classes) -> str:
    """``requested`` if every class supports it, else the best implementation all of them support
    (sdpa, else eager). An unknown name is a UserError listing the known ones; a hub kernel
    (``owner/name``) is left to transformers."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if not isinstance(requested, str):
        raise UserError(f"model.attn_implementation: must be one of {known}, got {requested!r}")
    if "/" in requested:
        return requested
    if requested not in known:
        raise UserError(f"model.attn_implementation: unknown {requested!r} (known: {', '.join(known)})")
    supported = [name for name in supported_attention(classes[0]) if all(name in supported_attention(c)
                                                                        for c in classes)]
    if requested in supported:
        return requested
    return "sdpa" if "sdpa" in supported else "eager"


def meta_skeleton(cls, config):
    """``cls`` built from ``config`` on the meta device: the model's structure without memory or
    weights (enough for the pruning section's ``check_against_model``)."""
    import copy

    import torch
    with torch.device("meta"):
        return cls._from_config(copy.deepcopy(config), attn_implementation="eager")
