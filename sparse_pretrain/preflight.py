"""Preflight: what a run will read, checked before any weights load, and user errors reported once.

``check_recipe(stage, recipe)`` looks at every path and hub name a pre-training, prepare-data,
fine-tuning or QAT run will read (model, teacher, tokenizer, data files, the DeepSpeed config), at
whether transformers has the model class the run builds (masked-LM / pre-training; sequence
classification / question answering), at the attention implementation (one the model class does not
support falls back to one it does, with one printed line), and, for pattern-lock, at the sparsity of
the model's Linear weights read lazily from its safetensors files. Each problem is a
:class:`UserError` naming the key, the path and what to do. Nothing here builds a model with weights:
configs, tokenizers, file listings, a meta-device skeleton and (pattern-lock only) the safetensors
tensors of the pruned weights.

``run_main(prog, body)`` is how every entry point reports the errors a user can cause (a bad recipe,
a bad path, an input file that does not exist, or a ValueError our own code raises about its input):
one line naming the key or path, no traceback, exit code 2, printed by one process only. Under
``prune-ofa launch`` a rank writes the line to the launch's failure file instead
(``$PRUNE_OFA_FAILURE_FILE``, first writer wins) and ``prune-ofa launch`` prints it once and exits with
its code; see :func:`launcher.launch.run`. Without a launch, rank 0 prints at once; another rank waits
``OTHER_RANK_GRACE_S`` first, so that when every rank fails alike the launcher (torchrun, deepspeed,
srun --kill-on-bad-exit) has stopped it by then (it then exits with the same code, silently) and the
line appears once, while a failure only that rank sees is still shown. ``PRUNE_OFA_DEBUG=1`` turns all of this off: tracebacks everywhere.
"""
from __future__ import annotations

import difflib
import glob
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from sparse_pretrain.recipe import ConfigError

#: names the file where the first rank that fails with a user error records it (set by prune-ofa launch)
FAILURE_FILE_ENV = "PRUNE_OFA_FAILURE_FILE"
#: set to 1 for tracebacks instead of one-line messages (and no filtering in prune-ofa launch)
DEBUG_ENV = "PRUNE_OFA_DEBUG"
#: exit code of a run stopped by a user error (as argparse's usage errors)
USER_ERROR_EXIT_CODE = 2
#: seconds a process other than the first waits before printing its user error (see the module docstring)
OTHER_RANK_GRACE_S = 5.0

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# the weight files transformers reads (transformers.utils.SAFE_WEIGHTS_NAME, ...), without importing it
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_WEIGHTS, TORCH_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX)
TASK_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


class UserError(ConfigError):
    """Bad input that is not a recipe value's type or range: a path, a hub name, an architecture, a
    model that does not fit the run. The message starts with the key (or option) it comes from."""


# -- reporting ------------------------------------------------------------------------------------

def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def process_rank() -> int:
    """This process's rank: ``RANK`` (torchrun, deepspeed, accelerate), else ``SLURM_PROCID`` (an srun
    task: a rank, or the node index of a one-task-per-node ``prune-ofa launch``), else 0."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def _project_dirs() -> tuple[str, ...]:
    dirs = []
    for package in ("sparse_pretrain", "finetune", "launcher"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            dirs += [os.path.join(os.path.realpath(d), "") for d in spec.submodule_search_locations]
    return tuple(dirs)


def _raised_here(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in this project's code (not a library)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.realpath(tb.tb_frame.f_code.co_filename).startswith(_project_dirs())


def user_error_message(err: BaseException) -> Optional[str]:
    """The one-line message of an error the user caused, or None for a programming error (which keeps
    its traceback). User errors: ConfigError (a bad recipe value; "invalid config: ..."), UserError
    and other ConfigError kinds (a bad path, hub name, architecture, pipeline), FileNotFoundError (an
    input that is not there), and a ValueError or OSError raised by this project's own code, which
    raises them only about its input and its files (a full disk, a directory it may not write); one
    raised inside a library is not one."""
    if type(err) is ConfigError:
        text = f"invalid config: {err}"
    elif isinstance(err, (ConfigError, FileNotFoundError)) or (isinstance(err, (ValueError, OSError))
                                                               and _raised_here(err)):
        text = str(err)
    else:
        return None
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def record_failure(path: str | Path, message: str, code: int = USER_ERROR_EXIT_CODE) -> bool:
    """Write ``message`` and ``code`` to the failure file unless another rank did first (a hard link of
    a complete file: atomic, first writer wins). False when the file cannot be written here (a rank on
    another host, where the launch's temporary directory does not exist)."""
    path = Path(path)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        scratch.write_text(json.dumps({"message": message, "code": code, "rank": process_rank()}))
        try:
            os.link(scratch, path)
        except FileExistsError:
            pass
        return True
    except OSError:
        return False
    finally:
        try:
            scratch.unlink()
        except OSError:
            pass


def read_failure(path: str | Path) -> Optional[dict]:
    """What :func:`record_failure` wrote (``message``, ``code``, ``rank``), or None."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def print_user_error(line: str, code: int = USER_ERROR_EXIT_CODE) -> None:
    """Print one user-error line from this process: at once on rank 0; on another rank after
    ``OTHER_RANK_GRACE_S``, by when a launcher that saw rank 0 fail alike has stopped this one. Stopped
    (SIGTERM, SIGINT, SIGHUP) during the grace it exits at once, silently, with ``code``: srun reports
    the highest exit code of its tasks, which stays the user error's, not 128 + SIGTERM."""
    if process_rank() != 0:
        def leave(signum, frame):
            os._exit(code)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):   # whatever handler a trainer installed
            try:
                signal.signal(signum, leave)
            except ValueError:       # not the main thread: the default action still stops it
                pass
        time.sleep(OTHER_RANK_GRACE_S)
    print(line, file=sys.stderr, flush=True)


#: written to stderr after a failure is recorded: ``prune-ofa launch`` keeps the stream up to it (in
#: the pipe's order, so nothing a rank printed before its failure is lost) and drops what follows
FAILURE_SENTINEL = b"\x1eprune-ofa: failure recorded\x1e\n"


def report_user_error(prog: str, message: str, code: int = USER_ERROR_EXIT_CODE) -> None:
    """To ``prune-ofa launch`` through its failure file when it started this process, else printed."""
    failure_file = os.environ.get(FAILURE_FILE_ENV)
    if failure_file and record_failure(failure_file, message, code):
        sys.stderr.flush()
        try:
            os.write(sys.stderr.fileno(), FAILURE_SENTINEL)   # one write: never split by a flush
        except (OSError, ValueError, AttributeError):
            pass
        return
    print_user_error(f"{prog}: {message}", code)


def run_main(prog: str, body: Callable[[], Optional[int]]) -> int:
    """Run an entry point's ``body``: its exit code (None: 0); a user error reported once, exit code 2."""
    try:
        return body() or 0
    except Exception as err:   # noqa: BLE001  (only user errors are handled; the rest is re-raised)
        message = None if debug() else user_error_message(err)
        if message is None:
            raise
        report_user_error(prog, message)
        return USER_ERROR_EXIT_CODE


def note(line: str) -> None:
    """An informational line, printed by rank 0 only."""
    if process_rank() == 0:
        print(line, file=sys.stderr, flush=True)


# -- paths and hub names ----------------------------------------------------------------------------

def _hub_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or any(
        os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


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


def _missing_path_hint(path: Path) -> str:
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


def _stage_hint(name: str) -> str:
    return (f"stage it where there is network: `hf download {name}` (huggingface_hub < 1.0: `huggingface-cli "
            f"download {name}`) with HF_HOME set to a directory every node shares and the same HF_HOME here, "
            f"or give a local directory")


def _is_connection_problem(err: BaseException) -> bool:
    names = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectTimeout", "ConnectError",
             "Timeout", "ReadTimeout", "ProxyError"}
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if any(cls.__name__ in names for cls in type(err).__mro__) or "couldn't connect" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def model_source(key: str, name, weights: bool = True) -> str:
    """Where the model named by ``key`` is read from: a local directory (checked for config.json and,
    with ``weights``, a weight file), the cached snapshot of a hub name, or (online) the hub name."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{key}: must be a model directory or a hub name, got {name!r}")
    if looks_local(name):
        path = Path(os.path.expanduser(name))
        if not path.exists():
            raise UserError(f"{key}: no such directory {name!r}{_missing_path_hint(path)}; give a Hugging Face "
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
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        snapshot = os.path.dirname(cached)
        if not weights or any(isinstance(try_to_load_from_cache(name, f), str) for f in WEIGHT_FILES):
            return snapshot
        if _hub_offline():
            raise UserError(f"{key}: hub model {name!r} is in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                            f"without its weights, and HF_HUB_OFFLINE=1 allows no download: {_stage_hint(name)}")
        return name
    if _hub_offline():
        raise UserError(f"{key}: {name!r} is no local directory, and as a hub name it is not in the Hugging Face "
                        f"cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1 allows no download: "
                        f"{_stage_hint(name)}")
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(name)       # online: fetches config.json only
    except (OSError, ValueError) as err:
        if _is_connection_problem(err):
            raise UserError(f"{key}: hub model {name!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                            f"and the hub cannot be reached from here: {_stage_hint(name)}") from None
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
            hint = _missing_path_hint(path) if not glob.has_magic(pattern) else ""
            raise UserError(f"{key}: {pattern!r} matches no file{hint} (`prune-ofa materialize-corpus` writes "
                            f"the demo corpus)")
        if not any(os.path.isfile(m) for m in matches):
            raise UserError(f"{key}: {pattern!r} is a directory, not a file; give its files "
                            f"(e.g. {os.path.join(pattern, '*.jsonl')!r})")


def check_hub_dataset(key: str, path: str, config: Optional[str], how: str) -> None:
    """With the network off, a hub dataset must be in the datasets cache."""
    if not _hub_offline():
        return
    try:
        import datasets
        datasets.load_dataset_builder(path, config)
    except Exception:   # noqa: BLE001  (whatever datasets raises offline: not there, not cached, no script)
        args = f"{path!r}" + (f", {config!r}" if config else "")
        raise UserError(f"{key}: hub dataset {path}{'/' + config if config else ''} is not in the local cache and "
                        f"HF_HUB_OFFLINE=1 allows no download: stage it where there is network with "
                        f"`python -c \"import datasets; datasets.load_dataset({args})\"` (HF_HOME shared by every "
                        f"node), or {how}") from None


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
    from transformers.utils import (is_flash_attn_2_available, is_flash_attn_3_available,
                                    is_torch_flex_attn_available)
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


# -- pattern-lock: the sparsity of a model's pruned weights, read lazily ---------------------------------

def pruned_weight_sparsity(model_dir: str | Path) -> Optional[float]:
    """Zeros / elements over the 2-D weights pattern-lock locks (the Linear weights the default include
    pattern selects: the encoder's and the pooler's), read from the safetensors files without
    building the model. None without safetensors files or without such weights (the trainer checks)."""
    import re

    import torch
    from safetensors import safe_open

    from sparse_pretrain.core.masks import DEFAULT_INCLUDE
    model_dir = Path(model_dir)
    if (model_dir / SAFE_INDEX).is_file():
        shards = sorted(set(json.loads((model_dir / SAFE_INDEX).read_text())["weight_map"].values()))
        files = [model_dir / s for s in shards]
    elif (model_dir / SAFE_WEIGHTS).is_file():
        files = [model_dir / SAFE_WEIGHTS]
    else:
        return None
    patterns = [re.compile(p) for p in DEFAULT_INCLUDE]
    zeros = total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():
                if not name.endswith(".weight") or not any(p.fullmatch(name[:-len(".weight")]) for p in patterns):
                    continue
                if len(weights.get_slice(name).get_shape()) != 2:
                    continue
                tensor = weights.get_tensor(name)
                total += tensor.numel()
                zeros += tensor.numel() - int(torch.count_nonzero(tensor))
    return zeros / total if total else None


# -- per recipe kind ------------------------------------------------------------------------------

def deepspeed_config_path(value: str) -> Path:
    """``training.deepspeed_config`` as the trainer resolves it: as given, else under the project."""
    path = Path(value)
    return path if path.is_file() or not (PROJECT_ROOT / path).is_file() else PROJECT_ROOT / path


def pretraining_class(key: str, config, nsp: bool):
    """The class the pre-training trainer builds for ``config``: AutoModelForPreTraining with an NSP
    head when ``nsp``, else AutoModelForMaskedLM; both need a masked-LM head."""
    why = ("pre-training here is masked-LM (+ NSP) distillation, and causal LMs are not supported yet: give an "
           "encoder model (BERT, DistilBERT, RoBERTa, ...)")
    cls = model_class_for(key, config, "MODEL_FOR_MASKED_LM_MAPPING", "masked-LM", why)
    if not nsp:
        return cls
    import inspect
    cls = model_class_for(key, config, "MODEL_FOR_PRETRAINING_MAPPING", "pre-training", "set data.nsp=false")
    if "next_sentence_label" not in inspect.signature(cls.forward).parameters:
        raise UserError(f"data.nsp: {key} is a {cls.__name__}, which has no next-sentence head; set data.nsp=false")
    return cls


def check_pretrain(recipe, prepare_only: bool = False) -> list[str]:
    """Everything a pre-training run (``prepare_only``: ``prune-ofa prepare-data``) reads. Sets
    ``recipe.model.attn_implementation`` to one the model supports; returns the overrides it applied."""
    from sparse_pretrain.data.prepare import NSP_MODEL_TYPES
    m, d, t = recipe.model, recipe.data, recipe.training
    tokenizer_key = "data.tokenizer_name_or_path" if d.tokenizer_name_or_path else "model.name_or_path"
    student = model_source("model.name_or_path", m.name_or_path, weights=not prepare_only)
    if d.tokenizer_name_or_path:
        tokenizer = model_source(tokenizer_key, d.tokenizer_name_or_path, weights=False)
    else:
        tokenizer = student
    if d.data_files:
        check_files("data.data_files", d.data_files)
    elif prepare_only and d.dataset_name:
        check_hub_dataset("data.dataset_name", d.dataset_name, d.dataset_config,
                          "give local files with data.data_files")
    if not prepare_only:
        ds_config = deepspeed_config_path(t.deepspeed_config)
        if not ds_config.is_file():
            raise UserError(f"training.deepspeed_config: no such file {t.deepspeed_config!r} (the shipped ones are "
                            f"{', '.join(sorted(p.name for p in (PROJECT_ROOT / 'ds_configs').glob('*.json')))} "
                            f"in ds_configs/)")
    config = load_config("model.name_or_path", student)
    check_tokenizer(tokenizer_key, tokenizer, pretraining=True)
    nsp = d.nsp == "true" if d.nsp != "auto" else config.model_type in NSP_MODEL_TYPES
    classes = [pretraining_class("model.name_or_path", config, nsp)]
    if prepare_only:
        return []
    if recipe.stage == "student":
        if m.teacher_name_or_path and m.teacher_name_or_path != m.name_or_path:
            teacher = model_source("model.teacher_name_or_path", m.teacher_name_or_path)
            teacher_config = load_config("model.teacher_name_or_path", teacher)
            classes.append(pretraining_class("model.teacher_name_or_path", teacher_config, nsp))
            if getattr(teacher_config, "vocab_size", None) != getattr(config, "vocab_size", None):
                raise UserError(f"model.teacher_name_or_path: its vocabulary has {teacher_config.vocab_size} tokens, "
                                f"the student's {config.vocab_size}: distillation needs the same vocabulary")
        check_pruning_on_skeleton(recipe, classes[0], config)
    applied = []
    chosen = choose_attention(m.attn_implementation, classes)
    if chosen != m.attn_implementation:
        note(f"model.attn_implementation: {classes[0].__name__} does not support {m.attn_implementation!r} here "
             f"(supported: {', '.join(supported_attention(classes[0]))}); using {chosen!r}")
        m.attn_implementation = chosen
        applied.append(f"model.attn_implementation={chosen}")
    return applied


def check_pruning_on_skeleton(recipe, cls, config) -> None:
    """Include/exclude patterns and block shapes against the model's structure on the meta device
    (no memory, no weights): the pre-training recipe's own check (check_against_model)."""
    import torch

    from sparse_pretrain.recipe import check_against_model
    import copy
    with torch.device("meta"):
        skeleton = cls._from_config(copy.deepcopy(config), attn_implementation="eager")
    check_against_model(recipe, skeleton)      # ConfigError naming pruning.include[i] / pruning.block_shape


def check_finetune(recipe) -> list[str]:
    """Everything a fine-tuning or QAT run reads: the task's data files, the model and its tokenizer,
    the teacher, the heads transformers has for them, pattern-lock's sparse model."""
    from finetune.tasks.classification import TASKS, task_spec
    task, m, d = recipe.task, recipe.model, recipe.distillation
    squad = task.name == "squad"
    if not squad:
        try:
            spec = task_spec(task.name, task.text_columns, task.label_column, task.num_labels)
        except ValueError as err:
            raise UserError(str(err)) from None
    files = task.data_files or {}
    if not isinstance(files, dict):
        raise UserError(f"task.data_files: must map splits to files ({{train: F, validation: F}}), got {files!r}")
    needed = ["train", "validation"] if squad else [spec.train_split, *spec.eval_splits]
    if files:
        missing = [s for s in needed if s not in files]
        if missing:
            raise UserError(f"task.data_files: no file for split(s) {missing} (have {sorted(files)}); task "
                            f"{task.name} reads {needed}")
        for split, path in files.items():
            key = f"task.data_files.{split}"
            if not isinstance(path, str):
                raise UserError(f"{key}: must be a file path, got {path!r}")
            p = Path(os.path.expanduser(path))
            if not p.exists():
                raise UserError(f"{key}: no such file {path!r}{_missing_path_hint(p)}")
            if not p.is_file():
                raise UserError(f"{key}: {path!r} is a directory; give the file")
            if p.suffix.lower() not in TASK_FILE_SUFFIXES:
                raise UserError(f"{key}: {path!r}: unknown format {p.suffix or '(no suffix)'!r}; give "
                                f"{', '.join(TASK_FILE_SUFFIXES)} files")
    elif squad:
        check_hub_dataset("task.name", "rajpurkar/squad", None, "give task.data_files: {train: F, validation: F}")
    elif task.name in TASKS and spec.hub:
        check_hub_dataset("task.name", spec.hub[0], spec.hub[1], "give task.data_files: {train: F, validation: F}")
    elif task.name not in TASKS:
        raise UserError(f"task.data_files: task {task.name!r} is not built in, so its data must be given: "
                        f"task.data_files: {{train: F, validation: F}}")

    mapping, head = (("MODEL_FOR_QUESTION_ANSWERING_MAPPING", "question-answering") if squad
                     else ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING", "sequence-classification"))
    why = f"task {task.name} needs one"
    source = model_source("model.name_or_path", m.name_or_path)
    config = load_config("model.name_or_path", source)
    cls = model_class_for("model.name_or_path", config, mapping, head, why)
    check_tokenizer("model.name_or_path", source, pretraining=False)
    if d.teacher:
        teacher = model_source("distillation.teacher", d.teacher)
        teacher_config = load_config("distillation.teacher", teacher)
        model_class_for("distillation.teacher", teacher_config, mapping, head, why)
        if getattr(teacher_config, "vocab_size", None) != getattr(config, "vocab_size", None):
            raise UserError(f"distillation.teacher: its vocabulary has {teacher_config.vocab_size} tokens, the "
                            f"model's {config.vocab_size}: the teacher reads the model's token ids, so both need "
                            f"the same tokenizer")
        from finetune.heads import head_for
        try:
            head_for(task).check_teacher(teacher_config)
        except ValueError as err:
            raise UserError(str(err)) from None
    if m.pattern_lock:
        sparsity = pruned_weight_sparsity(source) if os.path.isdir(source) else None
        if sparsity is not None and sparsity < m.min_sparsity:
            raise UserError(f"model.pattern_lock: the model is {sparsity:.1%} sparse, below model.min_sparsity "
                            f"({m.min_sparsity:.0%}); pattern-lock needs a sparse pre-trained model (or set "
                            f"model.pattern_lock=false to fine-tune a dense one)")
    if recipe.pruning is not None:
        t = recipe.training
        steps = t.max_steps or 2 ** 62
        prune_recipe = recipe.pruning.pretrain_recipe(steps, int(t.warmup_ratio * t.max_steps) if t.max_steps else 0)
        check_pruning_on_skeleton(prune_recipe, cls, config)
    return []


def check_recipe(stage: str, recipe) -> list[str]:
    """The preflight of a stage (``pretrain``, ``prepare-data``, ``finetune``, ``qat``); returns the
    ``key=value`` overrides it applied to ``recipe`` (for the ranks a launch starts)."""
    if stage in ("pretrain", "prepare-data"):
        return check_pretrain(recipe, prepare_only=stage == "prepare-data")
    if stage in ("finetune", "qat"):
        return check_finetune(recipe)
    return []
