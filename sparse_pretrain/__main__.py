"""``deepspeed --num_gpus N -m sparse_pretrain --config RECIPE.yaml [key=value ...]`` (or torchrun).

Load the recipe, check what it reads (``sparse_pretrain.preflight``), run it. A user error is one line
from one process with exit code 2 (``sparse_pretrain.runtime.errors.run_main``); a programming error keeps
its traceback."""
import argparse
import sys

from sparse_pretrain.preflight import check_pretrain
from sparse_pretrain.recipe import load_recipe
from sparse_pretrain.runtime.errors import run_main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_pretrain",
                                     description="Teacher preparation or student pruning on DeepSpeed ZeRO.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    def body():
        recipe = load_recipe(args.config, args.overrides)
        check_pretrain(recipe)                      # paths, hub names, architecture: before any weights load
        from sparse_pretrain.trainer import run
        run(recipe)
    return run_main(parser.prog, body)


if __name__ == "__main__":
    sys.exit(main())
