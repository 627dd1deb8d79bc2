"""``accelerate launch -m finetune --config RECIPE.yaml [key=value ...]``

Load the recipe, check what it reads (``finetune.preflight``), run it. A user error is one line from
one process with exit code 2 (``sparse_pretrain.runtime.errors.run_main``); a programming error keeps its
traceback."""
import argparse
import sys

from finetune.preflight import check_finetune
from finetune.recipe import load_finetune_recipe
from sparse_pretrain.runtime.errors import run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune", description="Pattern-locked fine-tuning with KD.")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    def body():
        recipe = load_finetune_recipe(args.config, args.overrides)
        check_finetune(recipe)                      # paths, hub names, heads: before any weights load
        from finetune.trainer import run
        run(recipe)
    return run_main(parser.prog, body)


if __name__ == "__main__":
    sys.exit(main())
