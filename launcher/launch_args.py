"""``prune-ofa launch STAGE``'s arguments: each stage's own options, and the spellings users of
torchrun, deepspeed and accelerate launch bring with them.

* The same meaning, another spelling: an argparse alias of our option (``--nnodes``, ``--num_nodes``,
  ``--num_machines`` for ``--nodes``; ``--num_gpus`` for ``--gpus-per-node``; ``--master_addr`` and
  ``--main_process_ip`` for ``--master-addr``; ...), shown once in the help, next to the option.
* A count with another meaning, mapped by a stated rule: torchrun's ``--nproc-per-node N`` (N
  processes per node, on the node's GPUs where it has them, else CPU processes:
  ``launcher.launch.node_has_gpus``) and accelerate's ``--num_processes N`` (N over all nodes, split
  evenly, the device by the same rule). The plan's notes say what they became.
* Options that mean something else here (``--node_rank``, accelerate's ``--mixed_precision``, ...):
  refused at once with one line naming what to use, exit code 2.

Nothing here imports more than argparse: the parser is built on every ``prune-ofa`` command.
"""
from __future__ import annotations

import argparse

#: stage -> (its one-line help, its description)
STAGE_TEXTS = {
    "pretrain": ("teacher preparation / student pruning on DeepSpeed (torchrun, deepspeed or srun)",
                 "Start a pre-training recipe's ranks (DeepSpeed ZeRO) here, on several hosts over ssh, or inside "
                 "SLURM: one process, torchrun, deepspeed or srun, chosen from the resources asked for and "
                 "SLURM's environment (README, Launching)."),
    "finetune": ("transfer on Accelerate (accelerate launch, torchrun or srun)",
                 "Start a fine-tuning recipe's ranks with accelerate launch (DDP, or Accelerate's DeepSpeed plugin "
                 "with --zero-stage), here or inside SLURM; several hosts outside SLURM are not supported."),
    "qat": ("finetune with qat.enabled=true",
            "The finetune stage with qat.enabled=true: 8-bit quantization-aware training, then the int8 export."),
    "prepare-data": ("tokenize once, one process",
                     "Run prune-ofa prepare-data once (node rank 0 / rank 0 of a SLURM step; nothing elsewhere)."),
    "report": ("compression report, one process; its arguments after --: -- MODEL --out DIR",
               "Run prune-ofa report once, with its arguments after --: "
               "prune-ofa launch report -- MODEL --out DIR [--int8 DIR --metrics FILE ...]."),
}

#: spellings of other launchers that mean something else here: (spellings, the line that says what to use)
REFUSED = (
    (("--node-rank", "--node_rank", "--machine_rank", "--machine-rank"),
     "prune-ofa launch takes each node's rank from SLURM (SLURM_NODEID: srun --ntasks-per-node=1 prune-ofa launch "
     "...) or from the order of --hosts; drop it"),
    (("--mixed_precision", "--mixed-precision"),
     "the recipe decides the precision: give training.precision=auto|bf16|fp32 (fine-tuning also fp16)"),
    (("--use_deepspeed", "--use-deepspeed"),
     "give --zero-stage N (pretrain always runs on DeepSpeed; finetune/qat: Accelerate's DeepSpeed plugin)"),
    (("--multi_gpu", "--multi-gpu"), "one process per GPU is --gpus-per-node N (default: every GPU found)"),
    (("--cpu",), "CPU processes are --processes-per-node N"),
)
#: finetune/qat: --hosts/--hostfile refused the same way
NO_HOSTS = ("finetune/qat on several hosts outside SLURM is not supported (accelerate launch starts one host's "
            "processes): run it inside SLURM, srun --ntasks-per-node=1 prune-ofa launch ...")


class AliasesOnce(argparse.HelpFormatter):
    """An option's spellings listed once with its argument (``--nodes, --nnodes, --num_nodes N``), as
    Python 3.13's argparse shows them, not ``--nodes N, --nnodes N, --num_nodes N``."""

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        args = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {args}"


class Refused(argparse.Action):
    """A spelling that means something else here: parsing it ends at once, with one line and exit code 2."""

    def __init__(self, option_strings, dest, message, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"{parser.prog}: {option_string}: {self.message}\n")


def _count(option: str):
    """argparse type of a count of processes (torchrun also takes words)."""
    def parse(text: str) -> int:
        if text.isdigit() and int(text) > 0:
            return int(text)
        if text in ("gpu", "auto"):
            raise argparse.ArgumentTypeError(f"leave {option} out: one process per GPU found is the default")
        if text == "cpu":
            raise argparse.ArgumentTypeError("CPU processes are --processes-per-node N")
        raise argparse.ArgumentTypeError(f"a number of processes (at least 1), got {text!r}")
    return parse


def _nodes(text: str) -> int:
    """argparse type of --nodes: one number (torchrun's elastic MIN:MAX is not supported)."""
    if ":" in text:
        raise argparse.ArgumentTypeError(f"elastic ranges (torchrun's MIN:MAX, got {text!r}) are not supported: "
                                         f"give one number of nodes")
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of nodes, got {text!r}") from None


def add_resources(one: argparse.ArgumentParser, stage: str, shown: bool = True) -> None:
    """Nodes, processes per node, launcher and partition; hidden (``shown=False``) for prepare-data,
    which runs one process but takes them from pipeline scripts (``launcher.submit.launch_command``)."""
    from launcher.launch import LAUNCHERS

    def text(help_):
        return help_ if shown else argparse.SUPPRESS
    pretrain = stage == "pretrain"
    one.add_argument("--nodes", "--nnodes", "--num_nodes", "--num-nodes", "--num_machines", "--num-machines",
                     type=_nodes, metavar="N", help=text("nodes (default: SLURM's, the hosts given, or 1)"))
    # hidden options outside a group: Python 3.11's usage formatter fails on a group of hidden options only
    per_node = one.add_mutually_exclusive_group() if shown else one
    per_node.add_argument("--gpus-per-node", "--num_gpus", "--num-gpus", type=int, metavar="N",
                          help=text("one process per GPU (default: every GPU found)"))
    per_node.add_argument("--processes-per-node", type=int, metavar="N", help=text("CPU processes per node"))
    if shown:
        per_node.add_argument("--nproc-per-node", "--nproc_per_node", type=_count("--nproc-per-node"), metavar="N",
                              help="torchrun's count: processes per node, on GPUs where the node has them "
                                   "(SLURM_GPUS_ON_NODE, --partition's GPUs, this machine's), else CPU processes")
        per_node.add_argument("--num-processes", "--num_processes", type=_count("--num-processes"), metavar="N",
                              help="accelerate's count: processes over all nodes, split evenly over them; "
                                   "on GPUs as for --nproc-per-node")
    one.add_argument("--launcher", choices=LAUNCHERS, default="auto", metavar="NAME", help=text(
        "default: auto; " + ("deepspeed, torchrun or srun" if pretrain else "accelerate, torchrun or srun")
        + " (README, Launching)"))
    one.add_argument("--partition", metavar="NAME",
                     help=text("SLURM partition (checked against its GPUs per node; srun uses it)"))


def add_stage(stages, stage: str, func) -> argparse.ArgumentParser:
    """One ``prune-ofa launch STAGE`` parser, with only the options that stage takes."""
    from launcher.launch import STAGES
    summary, description = STAGE_TEXTS[stage]
    one = stages.add_parser(stage, help=summary, description=description, formatter_class=AliasesOnce)
    starts_ranks = STAGES[stage] is not None
    if stage != "report":
        one.add_argument("--config", required=True, metavar="FILE",
                         help="YAML recipe (prune-ofa recipes ls lists the shipped ones)")
    if starts_ranks or stage == "prepare-data":
        add_resources(one, stage, shown=starts_ranks)
    if stage == "pretrain":
        hosts = one.add_mutually_exclusive_group()
        hosts.add_argument("--hosts", metavar="H1,H2,...",
                           help="several hosts outside SLURM, comma-separated (deepspeed over ssh)")
        hosts.add_argument("--hostfile", metavar="FILE",
                           help="an MPI-style hostfile ('HOST slots=N' lines) instead of --hosts")
    elif starts_ranks:
        one.add_argument("--hosts", "--hostfile", action=Refused, message=NO_HOSTS)
    if starts_ranks:
        one.add_argument("--zero-stage", "--zero_stage", type=int, choices=[0, 1, 2, 3], help=(
            "the recipe's ZeRO stage (training.zero_stage=N; an override saying otherwise is an error)"
            if stage == "pretrain" else "Accelerate's DeepSpeed plugin at this ZeRO stage (default: DDP)"))
        one.add_argument("--master-addr", "--master_addr", "--main_process_ip", "--main-process-ip", metavar="ADDR",
                         help="rendezvous address (default: SLURM's first node, the first host, or 127.0.0.1)")
        one.add_argument("--master-port", "--master_port", "--main_process_port", "--main-process-port", type=int,
                         metavar="PORT", help="rendezvous port (default: derived from the SLURM job, or a free one)")
        for spellings, message in REFUSED:
            one.add_argument(*spellings, action=Refused, message=message)
    one.add_argument("--dry-run", action="store_true",
                     help="print the command and the effective config, run nothing (a hostfile the command "
                          "reads is written)")
    one.add_argument("overrides", nargs="*", metavar="key=value", help=(
        "its arguments, after --: -- MODEL --out DIR" if stage == "report" else
        "recipe overrides, e.g. " + ("data.num_proc=8" if stage == "prepare-data" else "training.learning_rate=1e-4")))
    one.set_defaults(func=func)
    return one


def add_launch_command(subparsers, func) -> argparse.ArgumentParser:
    """Add ``launch`` and its stages to an argparse subparsers object; each stage runs ``func(args)``."""
    from launcher.launch import STAGES
    launch = subparsers.add_parser(
        "launch", help="start a stage on this machine, on several hosts or inside SLURM, with the right launcher",
        description="Build the command that runs a stage here (torchrun, deepspeed, accelerate launch, srun or "
                    "one process, chosen from the resources and SLURM's environment), check it, and run it. "
                    "torchrun's, deepspeed's and accelerate's spellings of the same options are accepted "
                    "(--nnodes, --num_gpus, --nproc-per-node, --num_processes, --master_addr, ...).")
    stages = launch.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage in STAGES:
        add_stage(stages, stage, func)
    return launch


def launch_request(args):
    """The ``LaunchRequest`` of parsed ``prune-ofa launch STAGE`` arguments (a stage's parser has only
    the options that stage takes; the others are None here)."""
    from launcher.launch import LaunchRequest, partition_cpus, partition_gpus

    def get(name):
        return getattr(args, name, None)
    hosts, partition, launcher = get("hosts"), get("partition"), get("launcher") or "auto"
    return LaunchRequest(
        stage=args.stage, config=get("config"), overrides=args.overrides, nodes=get("nodes"),
        gpus_per_node=get("gpus_per_node"), processes_per_node=get("processes_per_node"),
        nproc_per_node=get("nproc_per_node"), total_processes=get("num_processes"), launcher=launcher,
        hosts=[h for h in hosts.split(",") if h] if hosts else None, hostfile=get("hostfile"), partition=partition,
        partition_gpus=partition_gpus(partition) if partition else None,
        partition_cpus=partition_cpus(partition) if partition and launcher == "srun" else None,
        zero_stage=get("zero_stage"), master_addr=get("master_addr"), master_port=get("master_port"),
        dry_run=args.dry_run)
