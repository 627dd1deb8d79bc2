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
    from sparse_pretrain.recipe import load_recipe
    from sparse_pretrain.schedule_report import describe, format_table, plot_schedule, schedule_rows, table_steps
    recipe = load_recipe(args.config, args.overrides)
    steps = sorted(set(args.steps)) if args.steps else table_steps(recipe)
    bad = [s for s in steps if not 0 <= s < recipe.training.total_steps]
    if bad:
        from sparse_pretrain.runtime.errors import UserError
        raise UserError(f"--steps {bad}: outside [0, training.total_steps = {recipe.training.total_steps})")
    print(describe(recipe))
    if recipe.stage == "student":
        from sparse_pretrain.preflight import pruned_selection
        from sparse_pretrain.runtime.errors import UserError
        try:
            print("pruned: " + pruned_selection(recipe))
        except UserError as err:         # a hub model not fetched yet: the curves need no model
            print(f"pruned: not shown here ({err})")
    print(format_table(schedule_rows(recipe, steps)))
    if args.plot:
        print(f"plot written to {plot_schedule(recipe, args.plot)}")
    return 0


def cmd_demo(args) -> int:
    from pathlib import Path

    from launcher.demo import run_demo
    from launcher.demo_pipeline import DemoSizes
    sizes = DemoSizes(processes=args.processes, teacher_steps=args.teacher_steps, student_steps=args.student_steps,
                      finetune_steps=args.finetune_steps, qat_steps=args.qat_steps,
                      sparsities=tuple(s / 100 for s in args.sparsities))
    return run_demo(Path(args.out), sizes, one_shot=not args.no_one_shot)


def cmd_pretrain(args) -> int:
    from launcher.launch import with_zero_stage
    from sparse_pretrain.preflight import check_pretrain
    from sparse_pretrain.recipe import load_recipe
    recipe = load_recipe(args.config, with_zero_stage(args.overrides, args.zero_stage))
    check_pretrain(recipe)                           # paths, hub names, architecture: before any weights load
    from sparse_pretrain.trainer import run
    run(recipe)
    return 0


def cmd_finetune(args, qat: bool = False) -> int:
    from finetune.preflight import check_finetune
    from finetune.recipe import load_finetune_recipe
    overrides = list(args.overrides) + (["qat.enabled=true"] if qat else [])
    recipe = load_finetune_recipe(args.config, overrides)
    check_finetune(recipe)
    from finetune.trainer import run
    run(recipe)
    return 0


def cmd_prepare_data(args) -> int:
    """``launcher.data_commands``'s prepare-data, after the preflight of what it reads."""
    from launcher.data_commands import cmd_prepare_data as prepare
    from sparse_pretrain.preflight import check_pretrain
    from sparse_pretrain.recipe import load_recipe
    overrides = list(args.overrides) + ([f"data.num_proc={args.num_proc}"] if args.num_proc is not None else [])
    check_pretrain(load_recipe(args.config, overrides), prepare_only=True)
    return prepare(args)


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


def cmd_submit(args) -> int:
    from launcher.cluster import cluster_argument
    from launcher.pipeline import load_pipeline
    from launcher.submit import PipelineActive, SubmitError, format_plan, format_submitted, submit_pipeline
    pipeline = load_pipeline(args.pipeline, tasks=args.tasks, cluster=cluster_argument(args.cluster))
    if args.dry_run:
        print(format_plan(pipeline))
    for notice in pipeline.notices:       # what could not be checked (a partition's GPUs per node)
        print(f"note: {notice}")
    try:
        record = submit_pipeline(pipeline, only=args.only, dry_run=args.dry_run, resume=args.resume)
    except PipelineActive as err:         # jobs of this pipeline still queued: nothing was written
        print(f"prune-ofa submit: {err}", file=sys.stderr)
        return 2
    except SubmitError as err:
        print(f"prune-ofa submit: {err}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"dry run: scripts in {pipeline.slurm_dir} (submit.sh submits them all); nothing submitted")
        return 0
    stages = record["submitted"]
    if not stages:
        print(f"pipeline {pipeline.name}: nothing to submit: every stage has finished or is still queued")
        return 0
    print(f"pipeline {pipeline.name}: {len(stages)} job(s) submitted")
    print(format_submitted(pipeline, record, stages))
    return 0


def cmd_status(args) -> int:
    from pathlib import Path

    from launcher.submit import format_status, jobs_file, read_jobs, stage_status
    if args.pipeline:
        from launcher.cluster import cluster_argument
        from launcher.pipeline import load_pipeline
        path = jobs_file(load_pipeline(args.pipeline, check_partition=False, cluster=cluster_argument(args.cluster)))
    else:
        path = Path(args.jobs)
    record = read_jobs(path)
    print(format_status(record, stage_status(record)))
    return 0


def cmd_launch(args) -> int:
    from launcher.launch import build_plan, run, write_files
    from launcher.launch_args import launch_request
    plan = build_plan(launch_request(args))
    if args.dry_run:       # the files the command reads are written too: the printed command runs as it is
        for path in write_files(plan):
            print(f"prune-ofa launch: wrote {path} (the command reads it)", file=sys.stderr)
        for line in plan.notes:
            print(f"prune-ofa launch: note: {line}", file=sys.stderr)
        print(plan.command_line())
        print(plan.summary(), end="")
        return 0
    if plan.argv and plan.recipe is not None:       # this node starts processes: check what they will read
        from launcher.preflight import check_recipe
        plan.argv += check_recipe(args.stage, plan.recipe)   # e.g. an attention fallback, for every rank
    return run(plan)


def cmd_fetch(args) -> int:
    """``launcher.fetch``: stage the hub models and datasets a pipeline or recipe reads; ``--prepare``
    runs this CLI's prepare-data (with its preflight) for the prepare-data stages."""
    from launcher.fetch import run_fetch
    return run_fetch(args, prepare=cmd_prepare_data)


def cmd_env(args) -> int:
    from launcher.env_report import run_env
    return run_env(args)


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
    from launcher.recipes_command import add_recipes_command
    add_recipes_command(sub)
    from launcher.data_commands import add_data_commands
    add_data_commands(sub)
    sub.choices["prepare-data"].set_defaults(func=cmd_prepare_data)
    pretrain = sub.add_parser("pretrain", help="teacher preparation or student pruning (DeepSpeed ZeRO)",
                              description="Run a pre-training recipe (stage: teacher | student) in this "
                                          "process, or in each process of a torchrun/deepspeed/srun launch.")
    _add_config_args(pretrain)
    pretrain.add_argument("--zero-stage", "--zero_stage", type=int, choices=[0, 1, 2, 3],
                          help="the recipe's ZeRO stage (training.zero_stage=N; an override saying otherwise is "
                               "an error)")
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
    report = sub.add_parser("report", help="sparsity and honest compression report of a model directory",
                            description="The sparsity of a model's pruned layers, the paper's nominal compression "
                                        "ratio and the real one, in bytes on disk of a compact sparse export "
                                        "(written to --out; with --int8, of the int8 weights); with --metrics and "
                                        "--baseline, the task metrics against the dense baseline. Writes "
                                        "report.md and report.json to --out and prints the table.")
    report.add_argument("model", help="a Hugging Face model directory (dense or sparse)")
    report.add_argument("--int8", help="the int8 export of that model (prune-ofa qat's model-int8)")
    report.add_argument("--metrics", help="metrics.json of the model's task run")
    report.add_argument("--baseline", help="metrics of the dense baseline (JSON)")
    report.add_argument("--out", required=True, help="where report.md, report.json and the compact export go")
    report.set_defaults(func=cmd_report)
    submit = sub.add_parser("submit", help="submit a pipeline (configs/pipelines/*.yaml) as dependent SLURM jobs",
                            description="Render one sbatch script per stage into OUTPUT_ROOT/slurm, submit them "
                                        "in order with afterok dependencies (a failed stage cancels its "
                                        "dependents) and record OUTPUT_ROOT/slurm/jobs.json. Refused while "
                                        "jobs of the pipeline (job names PIPELINE-STAGE, asked of squeue) are "
                                        "pending or running: wait, scancel them, or use --resume.")
    submit.add_argument("--pipeline", required=True, metavar="NAME|FILE",
                        help="a shipped pipeline's name (bert-base-90, ...: configs/pipelines/) or a spec file")
    submit.add_argument("--cluster", metavar="FILE", help="cluster profile: the site's partitions, account, time "
                                                          "limits, scratch, HF_HOME, offline (configs/clusters/"
                                                          "example.yaml; default: $PRUNE_OFA_CLUSTER)")
    submit.add_argument("--tasks", nargs="+", metavar="TASK", help="the task chains to queue (default: all the "
                                                                   "pipeline lists, e.g. squad mnli qnli qqp sst2)")
    submit.add_argument("--dry-run", action="store_true", help="write the scripts, print the sbatch commands, "
                                                               "submit nothing")
    which = submit.add_mutually_exclusive_group()
    which.add_argument("--only", nargs="+", metavar="STAGE", help="submit only these stages (the others are "
                                                                  "running or done; refused while one of these "
                                                                  "is still queued)")
    which.add_argument("--resume", action="store_true",
                       help="queue only the stages that have not finished, as a workflow manager's resume does "
                            "(Nextflow -resume): a stage has finished when SLURM says COMPLETED or, once SLURM "
                            "has forgotten its job, its log has the 'done' line; stages still pending or running "
                            "are kept and their dependents wait for those jobs; training stages resume from "
                            "their checkpoints")
    submit.set_defaults(func=cmd_submit)
    status = sub.add_parser("status", help="the SLURM state of each stage of a submitted pipeline",
                            description="The SLURM state of each stage of a submitted pipeline (from "
                                        "OUTPUT_ROOT/slurm/jobs.json, scontrol and sacct): pending and why, "
                                        "running where, requeued how often, ended with which exit code.")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--pipeline", metavar="NAME|FILE",
                       help="pipeline name or spec (its OUTPUT_ROOT/slurm/jobs.json is read)")
    where.add_argument("--jobs", help="a jobs.json written by prune-ofa submit")
    status.add_argument("--cluster", metavar="FILE", help="the cluster profile it was submitted with (its scratch "
                                                          "holds OUTPUT_ROOT; default: $PRUNE_OFA_CLUSTER)")
    status.set_defaults(func=cmd_status)
    from launcher.launch_args import add_launch_command
    add_launch_command(sub, cmd_launch)
    fetch = sub.add_parser(
        "fetch", help="download the models and datasets a pipeline or recipe reads, for nodes without internet",
        description="On a node with internet (a login node): download every hub model, tokenizer and dataset a "
                    "pipeline's recipes (or one recipe) read into HF_HOME (--cache, else the cluster profile's "
                    "hf_home, else $HF_HOME), so that jobs run with HF_HUB_OFFLINE=1; local paths, earlier "
                    "stages' outputs and packaged models need nothing. --prepare also tokenizes the "
                    "prepare-data stages' data. Ends with what to export on the compute nodes.")
    from launcher.fetch import add_fetch_arguments
    add_fetch_arguments(fetch)
    fetch.set_defaults(func=cmd_fetch)
    env = sub.add_parser("env", help="what this machine offers the project (torch, CUDA, GPUs, DeepSpeed ops, ...) "
                                     "and how to fix what is missing",
                         description="A report in the manner of ds_report and accelerate env: Python, torch and "
                                     "its CUDA build, driver, NCCL, GPUs (bf16, TF32), transformers, accelerate, "
                                     "datasets, DeepSpeed and its ops, nvcc and ninja, SLURM, the offline assets; "
                                     "then one line per gap with the command that fixes it. Exit code 0 (it is a "
                                     "diagnosis) unless --require-gpu finds no usable GPU.")
    from launcher.env_report import add_env_arguments
    add_env_arguments(env)
    env.set_defaults(func=cmd_env)
    demo = sub.add_parser("demo", help="the demo that `make demo` runs (offline, CPU)",
                          description="The whole Prune Once for All chain on the packaged MiniLM-L6 and the "
                                      "offline RT sentiment task (the pipeline configs/pipelines/minilm-rt.yaml, "
                                      "run on this machine with the sizes below), every stage through `prune-ofa "
                                      "launch`; a stage whose output exists in --out is reused.")
    from launcher.demo_pipeline import DemoSizes
    d = DemoSizes()
    demo.add_argument("--out", default="runs/demo", help="where the runs, report.md, report.json and plots go")
    demo.add_argument("--processes", type=int, default=d.processes, help="processes per stage")
    demo.add_argument("--teacher-steps", type=int, default=d.teacher_steps, help="teacher preparation steps")
    demo.add_argument("--student-steps", type=int, default=d.student_steps, help="student pruning steps")
    demo.add_argument("--finetune-steps", type=int, default=d.finetune_steps, help="task teacher / transfer steps")
    demo.add_argument("--qat-steps", type=int, default=d.qat_steps, help="QAT steps")
    demo.add_argument("--sparsities", type=int, nargs="+", default=[round(100 * s) for s in d.sparsities],
                      metavar="PERCENT", help="student targets in percent")
    demo.add_argument("--no-one-shot", action="store_true", help="skip the one-shot pruning table")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # a user error (bad recipe, path, hub name, input file): one line, one process, exit code 2
    from sparse_pretrain.runtime.errors import run_main
    return run_main(f"prune-ofa {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
