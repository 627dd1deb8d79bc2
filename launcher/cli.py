"""``prune-ofa``: the one command of the project, with a subcommand per job."""
from __future__ import annotations

import argparse
import sys

from sparse_pretrain import __version__


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override recipe keys, e.g. pruning.final_sparsity=0.85")


def cmd_schedule(args) -> int:
    from sparse_pretrain.config import load_recipe
    from sparse_pretrain.schedule_report import (describe, format_table, plot_schedule, schedule_rows,
                                                 table_steps)
    recipe = load_recipe(args.config, args.overrides)
    steps = sorted(set(args.steps)) if args.steps else table_steps(recipe)
    bad = [s for s in steps if not 0 <= s < recipe.training.total_steps]
    if bad:
        raise SystemExit(f"prune-ofa schedule: --steps {bad} outside [0, {recipe.training.total_steps})")
    print(describe(recipe))
    print(format_table(schedule_rows(recipe, steps)))
    if args.plot:
        print(f"plot written to {plot_schedule(recipe, args.plot)}")
    return 0


def cmd_demo(args) -> int:
    from pathlib import Path

    from launcher.demo import run_demo
    return run_demo(Path(args.out), args.steps, args.processes)


def cmd_pretrain(args) -> int:
    from sparse_pretrain.config import load_recipe
    from sparse_pretrain.trainer import run
    run(load_recipe(args.config, args.overrides))
    return 0


def cmd_finetune(args, qat: bool = False) -> int:
    from finetune.config import load_finetune_recipe
    from finetune.trainer import run
    overrides = list(args.overrides) + (["qat.enabled=true"] if qat else [])
    run(load_finetune_recipe(args.config, overrides))
    return 0


def cmd_report(args) -> int:
    import json
    from pathlib import Path

    from finetune.report import build_report, format_markdown, write_report
    quantized = None
    if args.int8:
        from finetune.quantization import int8_modules, load_quantized
        quantized = {f"{name}.weight": module.weight() for name, module in
                     int8_modules(load_quantized(args.int8)).items()}
    def read(path):
        """A metrics file: a flat {name: value}, or finetune's metrics.json ({split: {name: value}})."""
        if not path:
            return None
        data = json.loads(Path(path).read_text())
        data = data.get("metrics", data)
        return {(f"{split}/{k}" if isinstance(v, dict) else split): val
                for split, v in data.items() for k, val in (v.items() if isinstance(v, dict) else [(split, v)])}
    report = build_report(args.model, quantized=quantized, metrics=read(args.metrics), baseline=read(args.baseline),
                          compact_path=Path(args.out) / "model.compact.safetensors")
    write_report(report, args.out)
    print(format_markdown(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prune-ofa",
        description="Sparse pre-trained language models, the Prune Once for All way: teacher "
                    "preparation and student pruning on DeepSpeed, transfer and QAT on Accelerate.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    schedule = sub.add_parser("schedule", help="print (and plot) the sparsity and LR curves of a recipe",
                              description="Print the sparsity schedule and the (rewound) learning rate "
                                          "of a recipe at selected steps; --plot draws every step.")
    _add_config_args(schedule)
    schedule.add_argument("--steps", type=int, nargs="+", help="steps to print (default: key steps)")
    schedule.add_argument("--plot", metavar="FILE.png", help="also draw both curves into this PNG")
    schedule.set_defaults(func=cmd_schedule)
    from sparse_pretrain.data.cli import add_data_commands
    add_data_commands(sub)
    pretrain = sub.add_parser("pretrain", help="teacher preparation or student pruning (DeepSpeed ZeRO)",
                              description="Run a pre-training recipe (stage: teacher | student) in this "
                                          "process, or in each process of a torchrun/deepspeed/srun launch.")
    _add_config_args(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)
    finetune = sub.add_parser("finetune", help="pattern-locked fine-tuning with KD (Accelerate)",
                              description="Fine-tune on a task with the zeros locked, distilling from a dense "
                                          "task teacher; also trains that teacher (model.pattern_lock=false).")
    _add_config_args(finetune)
    finetune.set_defaults(func=cmd_finetune)
    qat = sub.add_parser("qat", help="8-bit quantization-aware training after fine-tuning, int8 export",
                         description="The finetune recipe with qat.enabled=true: fake-quantized encoder "
                                     "Linears, then a real int8 export evaluated on CPU.")
    _add_config_args(qat)
    qat.set_defaults(func=lambda args: cmd_finetune(args, qat=True))
    report = sub.add_parser("report", help="sparsity and honest compression report of a model directory")
    report.add_argument("model", help="a Hugging Face model directory (dense or sparse)")
    report.add_argument("--int8", help="the int8 export of that model (prune-ofa qat's model-int8)")
    report.add_argument("--metrics", help="metrics.json of the model's task run")
    report.add_argument("--baseline", help="metrics of the dense baseline (JSON)")
    report.add_argument("--out", required=True, help="where report.md, report.json and the compact export go")
    report.set_defaults(func=cmd_report)
    demo = sub.add_parser("demo", help="the demo that `make demo` runs (offline, CPU)",
                          description="Print/plot the paper's schedule and prune the packaged MiniLM-L6 "
                                      "with every method through the real pruner.")
    demo.add_argument("--out", default="runs/demo", help="where report.md, report.json and plots go")
    demo.add_argument("--steps", type=int, default=60,
                      help="steps of teacher preparation and of student pruning (0: skip that part)")
    demo.add_argument("--processes", type=int, default=2, help="DeepSpeed processes per stage")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from sparse_pretrain.config import ConfigError
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"prune-ofa {args.command}: invalid config: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:   # bad input found before the expensive work
        print(f"prune-ofa {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
