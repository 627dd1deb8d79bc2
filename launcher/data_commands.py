"""The data subcommands of ``prune-ofa``: ``materialize-corpus`` and ``prepare-data``.

``launcher.cli`` registers them with ``add_data_commands(subparsers)``; ``python -m
launcher.data_commands COMMAND ...`` runs them on their own.
"""
from __future__ import annotations

import argparse
import sys

DEFAULT_CORPUS_DIR = "data/corpus"
#: the sources of ``sparse_pretrain.data.corpus.materialize.SOURCES``, written out: importing that module
#: imports the ``sparse_pretrain.data`` package and with it torch (2 s on every ``prune-ofa`` command,
#: ``--help`` included), so the parser lists them itself (tests/unit/launcher/test_cli.py checks they agree)
CORPUS_SOURCES = ("wiki", "austen", "wordnet")


def cmd_materialize_corpus(args) -> int:
    from sparse_pretrain.data.corpus.materialize import materialize_corpus
    manifest = materialize_corpus(args.out, args.sources, cache=args.cache, force=args.force)
    written = [manifest["sources"].get(s, {}) for s in args.sources]
    ok = [e for e in written if "documents" in e]
    if not ok:
        print("materialize-corpus: no source could be materialized", file=sys.stderr)
        return 1
    docs, chars = sum(e["documents"] for e in ok), sum(e["chars"] for e in ok)
    print(f"corpus: {docs} documents, {chars:,} chars in {args.out} (manifest.json); "
          f"use it with data.data_files=[{args.out}/*.jsonl]")
    return 0


def cmd_prepare_data(args) -> int:
    from sparse_pretrain.data.prepare import NoSpaceError, prepare_dataset
    from sparse_pretrain.recipe import load_recipe
    overrides = list(args.overrides)
    if args.num_proc is not None:
        overrides.append(f"data.num_proc={args.num_proc}")
    recipe = load_recipe(args.config, overrides)
    try:
        path = prepare_dataset(recipe, force=args.force)
    except (FileNotFoundError, ValueError, NoSpaceError) as err:   # bad sources, a full disk
        print(f"prepare-data: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def add_data_commands(subparsers) -> None:
    """Add ``materialize-corpus`` and ``prepare-data`` to an argparse subparsers object (importing
    nothing heavy: the commands import what they run)."""
    corpus = subparsers.add_parser(
        "materialize-corpus", help="write the offline demo corpus (Wikipedia sample, Austen, WordNet)",
        description="Fetch real English prose from package registries only (the gensim wheel's "
                    "Wikipedia sample from PyPI; Debian's janeaustenr and wordnet-base via apt-get "
                    "download) and write one JSON Lines file per source, one document per line, "
                    "plus manifest.json. Sources already there are kept; unavailable ones are skipped.")
    corpus.add_argument("--out", default=DEFAULT_CORPUS_DIR, help=f"output directory (default {DEFAULT_CORPUS_DIR})")
    corpus.add_argument("--sources", nargs="+", default=list(CORPUS_SOURCES), choices=CORPUS_SOURCES,
                        help="which sources (default: all)")
    corpus.add_argument("--cache", help="where downloads are kept (default OUT/.cache)")
    corpus.add_argument("--force", action="store_true", help="rebuild sources already there")
    corpus.set_defaults(func=cmd_materialize_corpus)

    prepare = subparsers.add_parser(
        "prepare-data", help="tokenize and build pre-training rows once, saved by settings hash",
        description="Load the recipe's data (hub dataset or data.data_files), tokenize with the model's "
                    "fast tokenizer, build BERT pre-training rows (NSP pairs or MLM-only) and save them "
                    "under data.cache_dir/<name>-<settings hash>; prints that directory. It appears "
                    "complete or not at all: an error, Ctrl-C or SIGTERM removes the temporary "
                    "directory, and the next run removes one a killed run left.")
    prepare.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    prepare.add_argument("overrides", nargs="*", metavar="key=value",
                         help="override recipe keys, e.g. data.data_files=[data/corpus/*.jsonl]")
    prepare.add_argument("--num-proc", type=int, help="tokenizing processes (same as data.num_proc)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if prepared already")
    prepare.set_defaults(func=cmd_prepare_data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.data_commands")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_data_commands(sub)
    args = parser.parse_args(argv)
    from sparse_pretrain.runtime.schema import ConfigError
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"{args.command}: invalid config: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
