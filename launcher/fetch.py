"""``prune-ofa fetch``: stage what a pipeline or a recipe reads from the Hugging Face hub, on a node
with internet (a login node), so that compute nodes without it run with ``HF_HUB_OFFLINE=1``.

What is fetched is what the recipes' preflights check (``hub_items`` of ``sparse_pretrain.preflight``
and ``finetune.preflight``): models and tokenizers by hub name, the pre-training dataset unless
``data.data_files`` are given, a task's hub dataset (GLUE, SQuAD). Local paths, earlier stages'
outputs (``@stage/...``) and packaged models are not fetched. Models go into the hub cache
(``huggingface_hub.snapshot_download``, the files transformers reads), datasets are downloaded and
prepared into the datasets cache (``download_and_prepare``), both under one ``HF_HOME``: ``--cache``,
else the cluster profile's ``hf_home``, else ``$HF_HOME``, else Hugging Face's default. There a later
``from_pretrained`` or ``load_dataset`` finds them offline. ``--prepare`` also runs prepare-data for the
pipeline's prepare-data stages (or the pre-training recipe), so that the compute nodes start from
tokenized rows.
"""
from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

PRETRAINING_KINDS = ("pretrain", "prepare-data")
FINETUNING_KINDS = ("finetune", "qat")
#: sections only a pre-training recipe has / only a fine-tuning recipe has (sparse_pretrain.recipe.Recipe,
#: finetune.recipe.FinetuneRecipe)
PRETRAINING_SECTIONS, FINETUNING_SECTIONS = ("stage", "data"), ("task", "qat")
#: what transformers reads of a model repository: config, safetensors weights (sharded or not), tokenizer
CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_PATTERNS = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                      "tokenizer.model"]
SAFETENSORS_PATTERNS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
TORCH_PATTERNS = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]


@dataclass
class Need:
    """One hub item and who reads it: (reader, key) pairs, e.g. (``teacher``, ``model.name_or_path``)."""
    item: object                             # sparse_pretrain.runtime.model_checks.HubItem
    readers: list = field(default_factory=list)
    path: Optional[Path] = None              # where it is in the cache, once fetched
    size: int = 0

    @property
    def read_by(self) -> str:
        """``model.name_or_path (teacher, sst2-teacher)``: each key with its readers."""
        by_key: dict = {}
        for reader, key in self.readers:
            by_key.setdefault(key, []).append(reader)
        return "; ".join(f"{key} ({', '.join(readers)})" for key, readers in by_key.items())


# -- what to fetch ----------------------------------------------------------------------------------

def recipe_kind(path: str, overrides: list[str]) -> str:
    """``pretrain`` or ``finetune``: the sections of the recipe (with the overrides) say which, as the
    two recipe schemas differ (``stage``/``data`` against ``task``/``qat``)."""
    from sparse_pretrain.runtime.errors import UserError
    from sparse_pretrain.runtime.recipe_files import apply_overrides, read_yaml_tree
    tree = apply_overrides(read_yaml_tree(path), overrides)
    pretraining, finetuning = (any(k in tree for k in keys) for keys in (PRETRAINING_SECTIONS, FINETUNING_SECTIONS))
    if pretraining == finetuning:
        raise UserError(f"--config: cannot tell what {path} is: a pre-training recipe has "
                        f"{' and '.join(PRETRAINING_SECTIONS)} sections, a fine-tuning recipe "
                        f"{' and '.join(FINETUNING_SECTIONS)}" + (", it has both" if pretraining else ""))
    return "pretrain" if pretraining else "finetune"


def recipe_items(kind: str, config: str, overrides: list[str], dataset: bool = True) -> list:
    """The hub items the recipe of a ``kind`` stage reads, as its preflight lists them (``dataset``:
    with the pre-training dataset, which prepare-data reads)."""
    if kind in PRETRAINING_KINDS:
        from sparse_pretrain.preflight import hub_items
        from sparse_pretrain.recipe import load_recipe
        return hub_items(load_recipe(config, overrides), dataset=dataset)
    if kind in FINETUNING_KINDS:
        from finetune.preflight import hub_items
        from finetune.recipe import load_finetune_recipe
        return hub_items(load_finetune_recipe(config, overrides))
    return []                                # report: paths only


def collect(sources) -> list[Need]:
    """(reader, items) pairs -> one Need per item, readers in order."""
    needs: dict = {}
    for reader, items in sources:
        for item in items:
            need = needs.setdefault((item.kind, item.label), Need(item))
            need.readers.append((reader, item.key))
    return list(needs.values())


def explicit_items(models, tokenizers, datasets) -> list:
    """``--model``, ``--tokenizer`` and ``--dataset PATH[:CONFIG]`` as hub items; hub names only."""
    from sparse_pretrain.runtime.errors import UserError
    from sparse_pretrain.runtime.model_checks import HubItem, hub_model
    items = []
    for option, names, weights in (("--model", models, True), ("--tokenizer", tokenizers, False)):
        for name in names or []:
            item = hub_model(option, name, weights=weights)
            if item is None:
                raise UserError(f"{option}: {name!r} is a local path or no hub name; fetch takes hub names "
                                f"(owner/name)")
            items.append(item)
    for spec in datasets or []:
        path, _, config = spec.partition(":")
        if not path:
            raise UserError(f"--dataset: {spec!r}: give PATH or PATH:CONFIG, e.g. nyu-mll/glue:mnli")
        items.append(HubItem("dataset", path, "--dataset", config or None))
    return items


# -- pipelines ------------------------------------------------------------------------------------

def pipeline_sources(pipeline) -> list:
    """(stage name, items) for each stage; prepare-data stages read the pre-training dataset,
    pre-training stages the rows it prepared."""
    return [(stage.name, recipe_items(stage.kind, str(stage.config), stage.override_args(),
                                      dataset=stage.kind == "prepare-data") if stage.config else [])
            for stage in pipeline.stages.values()]


# -- the cache -------------------------------------------------------------------------------------

def default_hf_home(environ=None) -> Path:
    """Hugging Face's default HF_HOME (huggingface_hub.constants: $XDG_CACHE_HOME/huggingface)."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "huggingface"


def choose_cache(cache: Optional[str], cluster, environ=None) -> tuple[Path, str]:
    """(HF_HOME to fetch into, where that came from): --cache, the cluster profile's hf_home,
    $HF_HOME, Hugging Face's default."""
    environ = os.environ if environ is None else environ
    if cache:
        return Path(cache).expanduser().resolve(), "--cache"
    if cluster is not None and getattr(cluster, "hf_home", None):
        return Path(cluster.hf_home).expanduser().resolve(), "the cluster profile's hf_home"
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser().resolve(), "$HF_HOME"
    return default_hf_home(environ).resolve(), "Hugging Face's default (HF_HOME unset)"


def tree_size(path: Path) -> int:
    """Bytes under ``path``, links followed (the hub cache's snapshots link to its blobs)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def cached_path(item, hf_home: Path) -> Optional[Path]:
    """Where ``item`` is in the cache under ``hf_home`` with what the runs read, or None."""
    if item.kind == "dataset":
        from datasets.naming import camelcase_to_snakecase
        owner, _, name = item.name.rpartition("/")
        entry = "___".join(([owner] if owner else []) + [camelcase_to_snakecase(name)])
        found = sorted((hf_home / "datasets" / entry).glob(f"{item.config or '*'}/*/*/dataset_info.json"))
        return found[-1].parent if found else None
    from huggingface_hub import try_to_load_from_cache

    from sparse_pretrain.runtime.model_checks import WEIGHT_FILES
    config = try_to_load_from_cache(item.name, "config.json", cache_dir=hf_home / "hub")
    if not isinstance(config, str):
        return None
    if item.kind == "model" and not any(isinstance(try_to_load_from_cache(item.name, f, cache_dir=hf_home / "hub"),
                                                   str) for f in WEIGHT_FILES):
        return None
    return Path(config).parent


# -- downloading -----------------------------------------------------------------------------------

def fetch_model(item, hf_home: Path) -> Path:
    """The snapshot of a hub model (config, safetensors or else PyTorch weights, tokenizer) or of a
    tokenizer (config, tokenizer) in ``hf_home/hub``."""
    from huggingface_hub import snapshot_download

    from sparse_pretrain.runtime.model_checks import WEIGHT_FILES
    patterns = CONFIG_FILES + TOKENIZER_PATTERNS + (SAFETENSORS_PATTERNS if item.kind == "model" else [])
    path = Path(snapshot_download(item.name, cache_dir=hf_home / "hub", allow_patterns=patterns))
    if item.kind == "model" and not any((path / f).is_file() for f in WEIGHT_FILES):   # no safetensors there
        path = Path(snapshot_download(item.name, cache_dir=hf_home / "hub", allow_patterns=patterns + TORCH_PATTERNS))
    if not (path / "config.json").is_file():
        from sparse_pretrain.runtime.errors import UserError
        raise UserError(f"{item.key}: hub repository {item.name!r} has no config.json, so it is no transformers "
                        f"model; give a model's hub name")
    return path


def fetch_dataset(item, hf_home: Path) -> Path:
    """A hub dataset downloaded and prepared (Arrow files) in ``hf_home/datasets``, where
    ``load_dataset(path, config)`` finds it offline."""
    import datasets
    builder = datasets.load_dataset_builder(item.name, item.config, cache_dir=str(hf_home / "datasets"))
    builder.download_and_prepare()
    return Path(builder.cache_dir)


def fetch_error(need: Need, err: Exception):
    """A download failure as a UserError naming the item and who reads it, or None (re-raise)."""
    from sparse_pretrain.runtime.errors import UserError
    from sparse_pretrain.runtime.model_checks import is_connection_problem
    item, who = need.item, need.read_by
    names = {cls.__name__ for cls in type(err).__mro__}
    if is_connection_problem(err):
        return UserError(f"{who}: the hub cannot be reached from here to fetch {item.label}: run prune-ofa fetch "
                         f"on a node with internet (a login node)")
    if names & {"GatedRepoError"}:
        return UserError(f"{who}: {item.label} is gated on the hub: accept its terms there and log in "
                         f"(`hf auth login`) before prune-ofa fetch")
    if names & {"RepositoryNotFoundError", "DatasetNotFoundError", "RevisionNotFoundError"}:
        return UserError(f"{who}: the hub has no {item.kind} {item.label!r} (check the name)")
    if item.kind == "dataset" and isinstance(err, ValueError):      # e.g. an unknown configuration
        return UserError(f"{who}: dataset {item.label}: {str(err).strip().splitlines()[0]}")
    return None


# -- the command -----------------------------------------------------------------------------------

def offline_variables(environ=None) -> list[str]:
    environ = os.environ if environ is None else environ
    from sparse_pretrain.runtime.model_checks import OFFLINE_VARIABLES
    return [name for name in OFFLINE_VARIABLES if environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")]


def run_fetch(args, prepare: Callable[[argparse.Namespace], int]) -> int:
    """``prune-ofa fetch``; ``prepare``: the prepare-data command (``launcher.cli.cmd_prepare_data``)."""
    from sparse_pretrain.runtime.errors import UserError
    if args.overrides and not args.config:
        raise UserError(f"{args.overrides[0]}: key=value overrides go with --config RECIPE")
    if not (args.pipeline or args.config or args.model or args.tokenizer or args.dataset):
        raise UserError("prune-ofa fetch: say what to fetch: --pipeline NAME_OR_PATH, --config RECIPE, or "
                        "--model / --tokenizer / --dataset NAME")
    if args.tasks and not args.pipeline:
        raise UserError("--tasks: selects tasks of a pipeline; give --pipeline")
    offline = offline_variables()
    if offline and not args.dry_run:
        set_here = " and ".join(f"{name}=1" for name in offline)
        raise UserError(f"prune-ofa fetch downloads, but {set_here} {'is' if len(offline) == 1 else 'are'} set here: "
                        f"run it on a node with internet without {'it' if len(offline) == 1 else 'them'} "
                        f"(`env {' '.join('-u ' + name for name in offline)} prune-ofa fetch ...`)")
    from launcher.cluster import cluster_argument, load_cluster
    cluster_file = cluster_argument(args.cluster)         # --cluster, else $PRUNE_OFA_CLUSTER
    cluster = load_cluster(cluster_file) if cluster_file else None
    hf_home, why = choose_cache(args.cache, cluster)
    os.environ["HF_HOME"] = str(hf_home)     # for what imports huggingface_hub/datasets from here on

    sources, preparing = [], []
    if args.pipeline:
        from launcher.pipeline import load_pipeline
        # as prune-ofa submit queues it: its tasks, the profile's scratch (data.cache_dir of prepare-data)
        pipeline = load_pipeline(args.pipeline, check_partition=False, tasks=args.tasks, cluster=cluster_file)
        sources += pipeline_sources(pipeline)
        preparing += [(f"stage {s.name}", str(s.config), s.override_args(), pipeline.workdir)
                      for s in pipeline.stages.values() if s.kind == "prepare-data"]
    if args.config:
        kind = recipe_kind(args.config, args.overrides)
        sources.append((args.config, recipe_items(kind, args.config, args.overrides)))
        if kind == "pretrain":
            preparing.append((f"recipe {args.config}", args.config, list(args.overrides), Path.cwd()))
    named = explicit_items(args.model, args.tokenizer, args.dataset)
    if named:
        sources.append(("command line", named))
    needs = collect(sources)

    print(f"HF_HOME={hf_home} (from {why})")
    local = [reader for reader, items in sources if not items]
    if local:
        print(f"nothing from the hub for {', '.join(local)} (local paths, earlier stages' outputs, packaged models)")
    if args.dry_run:
        print(table(needs, lambda n: "cached" if cached_path(n.item, hf_home) else "to fetch"))
        if args.prepare:
            for reader, config, overrides, _ in preparing:
                print(f"  prepare-data ({reader}): prune-ofa prepare-data --config {shlex.join([config, *overrides])}")
        print("dry run: nothing downloaded")
        return 0

    for need in needs:
        print(f"fetching {need.item.kind} {need.item.label} ...", flush=True)
        try:
            need.path = (fetch_dataset if need.item.kind == "dataset" else fetch_model)(need.item, hf_home)
        except Exception as err:   # hub and datasets errors: translated, or re-raised
            translated = fetch_error(need, err)
            if translated is None:
                raise
            raise translated from None
        need.size = tree_size(need.path)
    if args.prepare:
        for reader, config, overrides, workdir in preparing:
            print(f"prepare-data ({reader}) in {workdir}:", flush=True)
            here = os.getcwd()
            os.chdir(workdir)                 # the recipe's relative paths (data.cache_dir) as its job reads them
            try:
                code = prepare(argparse.Namespace(config=config, overrides=overrides, num_proc=None, force=False))
            finally:
                os.chdir(here)
            if code:
                return code
    print(summary(needs, hf_home, cluster, prepared=args.prepare and bool(preparing)))
    return 0


def table(needs: list[Need], state: Callable[[Need], str]) -> str:
    """One line per item: kind, name, ``state`` (cached / its size), the keys that name it."""
    if not needs:
        return "  nothing to fetch"
    width = max(len(n.item.label) for n in needs)
    return "\n".join(f"  {n.item.kind:9} {n.item.label:{width}}  {state(n):>10}  {n.read_by}" for n in needs)


def summary(needs: list[Need], hf_home: Path, cluster=None, prepared: bool = False) -> str:
    """What was fetched (names, sizes, readers) and what the compute nodes need set."""
    lines = []
    if needs:
        lines += [f"fetched into HF_HOME={hf_home}:", table(needs, lambda n: human_size(n.size)),
                  f"  {len(needs)} item(s), {human_size(sum(n.size for n in needs))}"]
    else:
        lines.append("nothing to fetch: every model and dataset is a local path, an earlier stage's output or "
                     "packaged")
    if prepared:
        lines.append("prepare-data done: the prepare-data stages find their rows and start at once")
    lines.append("on the compute nodes (HF_HOME must be a directory every node reads):")
    if cluster is not None and cluster.hf_home == hf_home and cluster.offline:
        lines.append(f"  prune-ofa submit --cluster {cluster.path} ...: the profile sets HF_HOME={hf_home} and the "
                     f"offline variables in every job")
    else:
        lines += [f"  export HF_HOME={shlex.quote(str(hf_home))} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "
                  f"TRANSFORMERS_OFFLINE=1",
                  f"  or, for prune-ofa submit, a cluster profile (--cluster FILE) with hf_home: {hf_home} and "
                  f"offline: true"]
    return "\n".join(lines)


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to fetch (any of them, together)")
    what.add_argument("--pipeline", metavar="NAME_OR_PATH",
                      help="a pipeline spec, or the name of a shipped one (configs/pipelines/): every stage's recipe")
    what.add_argument("--config", metavar="RECIPE",
                      help="a pre-training or fine-tuning recipe (with key=value overrides)")
    what.add_argument("--model", action="append", metavar="NAME", help="a hub model (config, weights, tokenizer)")
    what.add_argument("--tokenizer", action="append", metavar="NAME", help="a hub tokenizer (config and tokenizer)")
    what.add_argument("--dataset", action="append", metavar="PATH[:CONFIG]",
                      help="a hub dataset, e.g. nyu-mll/glue:mnli")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="the pipeline's tasks (as prune-ofa submit takes)")
    parser.add_argument("--cluster", metavar="FILE", help="cluster profile (default: $PRUNE_OFA_CLUSTER): its "
                                                        "hf_home is the default --cache, its scratch where "
                                                        "--prepare writes")
    parser.add_argument("--cache", metavar="DIR", help="HF_HOME to fetch into (default: the cluster profile's "
                                                      "hf_home, else $HF_HOME, else ~/.cache/huggingface)")
    parser.add_argument("--prepare", action="store_true",
                        help="also run prepare-data for the pipeline's prepare-data stages (or the pre-training "
                             "recipe): the compute nodes start from tokenized rows")
    parser.add_argument("--dry-run", action="store_true", help="list what would be fetched (and what is cached)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the --config recipe")
