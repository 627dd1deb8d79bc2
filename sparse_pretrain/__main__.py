"""``deepspeed --num_gpus N -m sparse_pretrain --config RECIPE.yaml [key=value ...]`` (or torchrun)."""
import argparse
import sys

from .config import ConfigError, load_recipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_pretrain",
                                     description="Teacher preparation or student pruning on DeepSpeed ZeRO.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
        from .trainer import run
        run(recipe)
    except ConfigError as err:
        print(f"invalid config: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
