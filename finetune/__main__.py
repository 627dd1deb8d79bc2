"""``accelerate launch -m finetune --config RECIPE.yaml [key=value ...]``"""
import argparse
import sys

from sparse_pretrain.config import ConfigError

from .config import load_finetune_recipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune", description="Pattern-locked fine-tuning with KD.")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        recipe = load_finetune_recipe(args.config, args.overrides)
        from .trainer import run
        run(recipe)
    except (ConfigError, ValueError) as err:
        print(f"finetune: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
