"""`prune-ofa launch`'s command line, parsed in this process: the spellings of torchrun, deepspeed and
accelerate (aliases, mapped counts, refusals), each stage's own options, and a dry run whose printed
command runs as it is."""
import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import build_parser, main
from launcher.launch import build_plan
from launcher.launch_args import REFUSED, launch_request
from sparse_pretrain.runtime import rendezvous
from sparse_pretrain.runtime.rendezvous import expand_hostlist

ROOT = Path(__file__).resolve().parents[3]
BERT_90 = str(ROOT / "configs" / "bert-base-uncased-90.yaml")
RT = str(ROOT / "configs" / "finetune" / "rt-transfer.yaml")
PY = "/venv/bin/python"
#: a SLURM step of one task per node, node 1 of 2 (as test_launch.slurm_step gives it)
NODE_1 = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "node[1-2]",
          "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NODEID": "1", "SLURMD_NODENAME": "node2"}


@pytest.fixture(autouse=True)
def emulated_nodes(monkeypatch):
    def scontrol(*args):
        if args[:2] == ("show", "hostnames"):
            return "\n".join(expand_hostlist(args[2])) + "\n"
        return f"NodeName={args[2]} NodeAddr=127.0.0.1\n" if args[:2] == ("show", "node") else None
    monkeypatch.setattr(rendezvous, "_scontrol", scontrol)
    for name in [k for k in os.environ if k.startswith(("SLURM_", "MASTER_"))]:
        monkeypatch.delenv(name)


def stage_parser(stage: str) -> argparse.ArgumentParser:
    launch = build_parser()._subparsers._group_actions[0].choices["launch"]
    return launch._subparsers._group_actions[0].choices[stage]


def launch_plan(argv, environ=NODE_1):
    args = build_parser().parse_args(["launch", *argv])
    return build_plan(launch_request(args), environ=environ, cuda_devices=0, executable=PY)


def plan_fields(p):
    return (p.argv, p.env, p.files, p.config, p.launcher, p.nodes, p.processes_per_node, p.gpu, p.rendezvous,
            p.zero_stage)


#: a value for each option that has aliases, valid in NODE_1 (2 nodes, CPU processes)
VALUES = {"nodes": "2", "gpus_per_node": "0", "nproc_per_node": "2", "num_processes": "4", "zero_stage": "2",
          "master_addr": "10.0.0.7", "master_port": "31000"}


@pytest.mark.parametrize("stage, config", [("pretrain", BERT_90), ("finetune", RT)])
def test_every_alias_parses_to_the_canonical_options_plan(stage, config):
    """Each spelling of torchrun, deepspeed or accelerate gives the plan the canonical option gives, and the
    help shows the option once with all its spellings."""
    aliased = [a for a in stage_parser(stage)._actions if len(a.option_strings) > 1 and a.dest != "help"
               and a.help != argparse.SUPPRESS]
    assert {a.dest for a in aliased} == set(VALUES)
    spellings = {s for a in aliased for s in a.option_strings}
    assert {"--nnodes", "--num_nodes", "--num_machines", "--num_gpus", "--num-gpus", "--nproc_per_node",
            "--num_processes", "--master_addr", "--main_process_ip", "--master_port", "--main_process_port",
            "--zero_stage"} <= spellings
    batch = "training.micro_batch_size=8" if stage == "pretrain" else "training.batch_size=8"
    base = [stage, "--config", config, batch]
    helptext = stage_parser(stage).format_help()
    for action in aliased:
        canonical, *aliases = action.option_strings
        assert helptext.count(canonical + ",") == 1 and ", ".join(action.option_strings) in helptext
        expected = plan_fields(launch_plan([*base, canonical, VALUES[action.dest]]))
        for alias in aliases:
            assert plan_fields(launch_plan([*base, alias, VALUES[action.dest]])) == expected, alias


@pytest.mark.parametrize("spelling, names", [(s, message) for spellings, message in REFUSED for s in spellings])
def test_a_spelling_that_means_something_else_is_refused_in_one_line(spelling, names, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["launch", "pretrain", "--config", BERT_90, spelling, "1"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"prune-ofa launch pretrain: {spelling}: ")
    assert "--" in err.split(": ", 2)[2] or "training.precision" in err        # it names what to use


def test_finetune_on_hosts_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["launch", "finetune", "--config", RT, "--hosts", "a,b"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not supported" in err and "srun --ntasks-per-node=1" in err


def test_torchrun_words_and_elastic_ranges_say_what_to_give(capsys):
    for argv, message in ((["--nproc-per-node", "gpu"], "one process per GPU found is the default"),
                          (["--nproc_per_node", "cpu"], "--processes-per-node N"),
                          (["--nnodes", "1:4"], "elastic ranges")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["launch", "pretrain", "--config", BERT_90, *argv])
        assert message in capsys.readouterr().err


def test_each_launch_stage_lists_only_its_options():
    def options(stage):
        return {s for a in stage_parser(stage)._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
    everything = {"--config", "--nodes", "--gpus-per-node", "--processes-per-node", "--nproc-per-node", "--launcher",
                  "--partition", "--hosts", "--hostfile", "--zero-stage", "--master-addr", "--master-port"}
    assert everything <= options("pretrain")
    assert everything - {"--hosts", "--hostfile"} <= options("finetune") and "--hosts" not in options("qat")
    assert options("prepare-data") == {"-h", "--help", "--config", "--dry-run"}
    assert options("report") == {"-h", "--help", "--dry-run"}
    report_help = stage_parser("report").format_help()
    assert "--zero-stage" not in report_help and "--hosts" not in report_help and "--nodes" not in report_help
    # what pipeline scripts pass to prepare-data stays accepted (launcher.submit.launch_command)
    args = build_parser().parse_args(["launch", "prepare-data", "--config", BERT_90, "--nodes", "1",
                                      "--processes-per-node", "2", "--partition", "cpu"])
    assert launch_request(args).processes_per_node == 2


def test_every_subcommand_has_a_description():
    top = build_parser()._subparsers._group_actions[0].choices
    missing = [name for name, parser in top.items() if not parser.description]
    launch = top["launch"]._subparsers._group_actions[0].choices
    missing += [f"launch {name}" for name, parser in launch.items() if not parser.description]
    assert missing == []


def test_pretrain_takes_zero_stage_too():
    args = build_parser().parse_args(["pretrain", "--config", BERT_90, "--zero_stage", "3"])
    assert args.zero_stage == 3


def test_a_dry_run_on_hosts_prints_a_command_that_runs_as_it_is(tmp_path, monkeypatch, capsys):
    """The printed deepspeed command's hostfile exists (the dry run writes it, and says so), and
    deepspeed's own parser and hostfile reader accept the command."""
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["launch", "pretrain", "--config", BERT_90, "--hosts", "gpu1,gpu2", "--num_gpus", "8",
                 "--dry-run", "training.micro_batch_size=16"]) == 0
    out, err = capsys.readouterr()
    argv = shlex.split(out.splitlines()[0])
    paths = [a for a in argv if a.startswith("/") and a != argv[0]]
    assert paths and all(Path(a).exists() for a in paths), paths
    from deepspeed.launcher.runner import fetch_hostfile, parse_args
    parsed = parse_args(argv[1:])
    assert dict(fetch_hostfile(parsed.hostfile)) == {"gpu1": 8, "gpu2": 8}
    assert (parsed.num_nodes, parsed.num_gpus, parsed.master_addr, parsed.module) == (2, 8, "gpu1", True)
    assert f"wrote {parsed.hostfile}" in err


def test_building_the_parser_imports_no_torch():
    """`prune-ofa --help` (every command builds the whole parser) stays clear of torch (~2 s)."""
    code = ("import sys; from launcher.cli import build_parser; build_parser(); "
            "print(sorted({'torch', 'deepspeed', 'transformers', 'accelerate', 'datasets'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_corpus_sources_are_materializes():
    from launcher.data_commands import CORPUS_SOURCES
    from sparse_pretrain.data.corpus.materialize import SOURCES
    assert CORPUS_SOURCES == SOURCES
