"""``accelerate launch -m finetune --config RECIPE.yaml [key=value ...]``

Load the recipe, check what it reads (``sparse_pretrain.preflight``), run it. A user error is one line
from one process with exit code 2; a programming error keeps its traceback."""
import argparse
import sys

from sparse_pretrain.preflight import check_recipe, run_main

from finetune.recipe import load_finetune_recipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune", description="Pattern-locked fine-tuning with KD.")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    def body():
        recipe = load_finetune_recipe(args.config, args.overrides)
        check_recipe("qat" if recipe.qat.enabled else "finetune", recipe)   # before any weights load
        from finetune.trainer import run
        run(recipe)
    return run_main(parser.prog, body)


if __name__ == "__main__":
    sys.exit(main())
