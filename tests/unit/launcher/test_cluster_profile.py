"""Every paper pipeline from one cluster profile (``prune-ofa submit --pipeline NAME --cluster FILE --tasks
...``): the newcomer's plan (BERT-Base 90% on 4 nodes x 8 GPUs, partition gpu, account myproj, 24 h,
SQuAD + MNLI) rendered from the shipped files alone, every shipped pipeline with the example profile
for every task, bad tasks, classes and profile keys refused naming the key, and the partition check
saying when it could not check. No SLURM is needed: scripts are rendered, sbatch is a fake."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.cluster import load_cluster
from launcher.pipeline import PipelineError, load_pipeline, resolve_pipeline_path
from launcher.submit import render_script, submit_pipeline

ROOT = Path(__file__).resolve().parents[3]
PIPELINES = ROOT / "configs" / "pipelines"
EXAMPLE = ROOT / "configs" / "clusters" / "example.yaml"
PAPER_PIPELINES = ("bert-base-85", "bert-base-90", "bert-large-90", "distilbert-85", "distilbert-90",
                   "bert-base-80-block1x4")
PAPER_TASKS = ["squad", "mnli", "qnli", "qqp", "sst2"]
CHAIN = ("teacher", "transfer", "qat", "report")


@pytest.fixture
def newcomer(monkeypatch):
    """The user who submits ($USER in the example profile's scratch and hf_home), from the project root."""
    monkeypatch.setenv("USER", "newcomer")
    monkeypatch.delenv("PRUNE_OFA_CLUSTER", raising=False)
    monkeypatch.chdir(ROOT)


def profile_copy(tmp_path: Path, edit=None, text_edit=None) -> Path:
    """The example profile with scratch and hf_home under tmp_path (so scripts may be written);
    ``text_edit`` changes the text (comments kept), ``edit`` the parsed mapping."""
    text = EXAMPLE.read_text()
    text = re.sub(r"^scratch: .*$", f"scratch: {tmp_path / 'scratch'}", text, flags=re.M)
    text = re.sub(r"^hf_home: .*$", f"hf_home: {tmp_path / 'hf-home'}", text, flags=re.M)
    if text_edit:
        text = text_edit(text)
    if edit:
        tree = yaml.safe_load(text)
        edit(tree)
        text = yaml.safe_dump(tree, sort_keys=False)
    path = tmp_path / "my-cluster.yaml"
    path.write_text(text)
    return path


def run_line(script: str) -> str:
    joined = script.replace("\\\n", " ")
    return re.sub(r" +", " ", next(line for line in joined.splitlines()
                                   if "srun " in line and not line.lstrip().startswith("#")))


def sbatch_lines(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


# -- the newcomer's plan --------------------------------------------------------------------------

def test_the_newcomers_plan_bert_base_90_on_4x8_gpus_with_squad_and_mnli(newcomer):
    """bert-base-90 + configs/clusters/example.yaml + --tasks squad mnli: exactly the stages asked for,
    every script with the site's account, time limit, cache, offline and NCCL variables, scratch paths,
    --cpus-per-task on srun, nothing of an 85% run, and a student recipe that prunes to 90%."""
    from sparse_pretrain.recipe import load_recipe
    pipeline = load_pipeline("bert-base-90", cluster=EXAMPLE, tasks=["squad", "mnli"])
    assert list(pipeline.stages) == ["prepare", "teacher", "student",
                                     *[f"{task}-{role}" for task in ("squad", "mnli") for role in CHAIN]]
    scratch = Path("/scratch/newcomer/prune-ofa")
    root = scratch / "runs" / "pipelines" / "bert-base-90"
    assert pipeline.output_root == root and pipeline.notices == []        # partition_gpus in the profile
    for stage in pipeline.stages.values():
        script = render_script(pipeline, stage)
        lines = sbatch_lines(script)
        assert {"--account=myproj", "--time=24:00:00", "--partition=gpu"} <= set(lines), (stage.name, lines)
        assert f"--output={root}/logs/%x-%j.out" in lines
        assert "export HF_HOME=/scratch/newcomer/hf-home" in script
        for offline in ("HF_HUB_OFFLINE=1", "HF_DATASETS_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"):
            assert f"export {offline}\n" in script, (stage.name, offline)
        gpu = stage.resources.gpus_per_node > 0                           # NCCL only where there are GPUs
        for nccl in ("TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "NCCL_DEBUG=WARN"):
            assert (f"export {nccl}\n" in script) == gpu, (stage.name, nccl)
        assert re.search(rf"srun --nodes={stage.resources.nodes} --ntasks-per-node=1 "
                         rf"--cpus-per-task={stage.resources.cpus} ", run_line(script)), run_line(script)
        assert "-85" not in script, stage.name
        assert stage.output_dir == root / stage.name
    for name in ("teacher", "student"):                                    # pruning: 4 nodes x 8 GPUs
        script = render_script(pipeline, pipeline.stages[name])
        assert {"--nodes=4", "--gres=gpu:8", "--cpus-per-task=64", "--exclusive", "--requeue"} <= \
            set(sbatch_lines(script))
        assert "--nodes 4 --gpus-per-node 8 --launcher deepspeed --partition gpu" in run_line(script)
        assert f"data.cache_dir={scratch}/data/prepared" in run_line(script)
    assert f"data.cache_dir={scratch}/data/prepared" in run_line(render_script(pipeline, pipeline.stages["prepare"]))
    task = render_script(pipeline, pipeline.stages["squad-transfer"])
    assert {"--gres=gpu:1", "--cpus-per-task=8", "--mem=64G"} <= set(sbatch_lines(task))
    assert f"model.name_or_path={root}/student/model" in run_line(task)
    assert "model.name_or_path=bert-base-uncased" in run_line(render_script(pipeline, pipeline.stages["mnli-teacher"]))
    student = pipeline.stages["student"]
    assert student.config == ROOT / "configs" / "bert-base-uncased-90.yaml"
    recipe = load_recipe(str(student.config), student.override_args())
    assert recipe.pruning.final_sparsity == 0.9
    assert recipe.model.name_or_path == f"{root}/teacher/model"


def test_the_newcomers_command_dry_run(newcomer, tmp_path, capsys, monkeypatch):
    """The one command, the profile named by $PRUNE_OFA_CLUSTER: a plan table, the sbatch lines in
    order, nothing submitted; status finds the same output_root through the profile."""
    monkeypatch.setenv("PRUNE_OFA_CLUSTER", str(profile_copy(tmp_path)))
    code = main(["submit", "--pipeline", "bert-base-90", "--tasks", "squad", "mnli", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    root = tmp_path / "scratch" / "runs" / "pipelines" / "bert-base-90"
    assert out.startswith(f"pipeline bert-base-90 ({PIPELINES / 'bert-base-90.yaml'}), tasks squad mnli: 11 stages\n")
    assert f"output_root {root}\n" in out and "account myproj" in out
    assert re.search(r"^student +pretrain +4 x 8 +64 +gpu +myproj +24:00:00 +teacher$", out, re.M), out
    assert [line.split("=", 1)[0] for line in out.splitlines() if "sbatch --parsable" in line] == [
        "job_prepare", "job_teacher", "job_student", *[f"job_{t}_{r}" for t in ("squad", "mnli") for r in CHAIN]]
    assert "nothing submitted" in out and sorted(p.stem for p in (root / "slurm").glob("*.sbatch")) == sorted(
        ["prepare", "teacher", "student", *[f"{t}-{r}" for t in ("squad", "mnli") for r in CHAIN]])
    student = (root / "slurm" / "student.sbatch").read_text()
    assert "# Rendered by `prune-ofa submit --pipeline" in student and "--tasks squad mnli`" in student
    assert "--cluster" in student
    assert main(["status", "--pipeline", "bert-base-90"]) == 2          # status reads root/slurm/jobs.json
    assert str(root / "slurm" / "jobs.json") in capsys.readouterr().err


# -- every shipped pipeline -------------------------------------------------------------------------

@pytest.mark.parametrize("name", PAPER_PIPELINES)
def test_every_paper_pipeline_loads_with_the_example_profile_for_every_task(newcomer, name):
    pipeline = load_pipeline(name, cluster=EXAMPLE)
    assert pipeline.tasks == PAPER_TASKS
    assert list(pipeline.stages) == ["prepare", "teacher", "student",
                                     *[f"{task}-{role}" for task in PAPER_TASKS for role in CHAIN]]
    for task in PAPER_TASKS:
        assert pipeline.stages[f"{task}-transfer"].config == ROOT / "configs" / "finetune" / f"{task}-transfer.yaml"
        assert pipeline.stages[f"{task}-transfer"].overrides["model.name_or_path"] == \
            str(pipeline.output_root / "student" / "model")
    for stage in pipeline.stages.values():     # where the site's values come from: the profile alone
        r = stage.resources
        assert (r.partition, r.account, r.time) == ("gpu", "myproj", "24:00:00"), stage.name
    raw = (PIPELINES / f"{name}.yaml").read_text()
    assert not re.search(r"^\s*(partition|account|time):", raw, re.M)    # no site value in the pipeline


def test_pipelines_take_a_shipped_name_or_a_path():
    assert resolve_pipeline_path("bert-base-90") == PIPELINES / "bert-base-90.yaml"
    assert resolve_pipeline_path(str(PIPELINES / "minilm-rt.yaml")) == PIPELINES / "minilm-rt.yaml"
    with pytest.raises(PipelineError, match=r"^pipeline: no such file 'bert-base-95' \(shipped pipelines: "
                                            r"bert-base-80-block1x4, bert-base-85, bert-base-90,"):
        resolve_pipeline_path("bert-base-95")


def test_without_a_profile_a_classed_pipeline_uses_its_own_classes(newcomer):
    """No --cluster: the pipeline's classes (what the work needs) and the cluster's defaults for the rest."""
    pipeline = load_pipeline("bert-base-90", tasks=["sst2"], check_partition=False)
    student, report = pipeline.stages["student"].resources, pipeline.stages["sst2-report"].resources
    assert (student.nodes, student.gpus_per_node, student.partition, student.account, student.time) == \
        (4, 8, None, None, None)
    assert report.gpus_per_node == 0 and "NCCL_DEBUG" not in student.env and "HF_HOME" not in student.env
    assert pipeline.output_root == ROOT / "runs" / "pipelines" / "bert-base-90"
    assert "data.cache_dir" not in pipeline.stages["student"].overrides


def test_layers_stage_over_class_over_pipeline_and_nccl_changed_or_removed(newcomer, tmp_path):
    """The profile's class beats the pipeline's, a stage's own keys beat both; the profile's nccl:
    changes a default, removes one (null) and adds one; a stage's env beats them."""
    def edit(tree):
        tree["classes"]["pretrain"]["nodes"] = 2
        tree["nccl"] = {"NCCL_DEBUG": "INFO", "TORCH_NCCL_ASYNC_ERROR_HANDLING": None, "NCCL_SOCKET_IFNAME": "ib0"}
    spec = yaml.safe_load((PIPELINES / "bert-base-90.yaml").read_text())
    spec["stages"]["teacher"]["slurm"]["time"] = "2-00:00:00"
    spec["stages"]["teacher"]["slurm"]["env"] = {"NCCL_DEBUG": "TRACE"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    pipeline = load_pipeline(tmp_path / "p.yaml", cluster=profile_copy(tmp_path, edit=edit), tasks=["mnli"])
    teacher, student = pipeline.stages["teacher"].resources, pipeline.stages["student"].resources
    assert (teacher.nodes, teacher.time, student.nodes, student.time) == (2, "2-00:00:00", 2, "24:00:00")
    assert teacher.env["NCCL_DEBUG"] == "TRACE" and student.env["NCCL_DEBUG"] == "INFO"
    assert student.env["NCCL_SOCKET_IFNAME"] == "ib0" and "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in student.env
    assert student.env["TOKENIZERS_PARALLELISM"] == "false"                 # the pipeline's env kept


# -- refusals, naming the key -------------------------------------------------------------------------

def _profile_key(path: str, value):
    def edit(tree):
        node, keys = tree, path.split("/")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_profile_key("classes/pretrain/gpu_per_node", 8),
     r"classes\.pretrain\.gpu_per_node: unknown key \(known: partition, account, time, nodes, gpus_per_node,"),
    (_profile_key("acount", "myproj"), r"acount: unknown key \(known: account, classes, setup, env, scratch,"),
    (_profile_key("classes/task/time", "1 day"), r"classes\.task\.time: '1 day' is not a SLURM time"),
    (_profile_key("offline", "yes"), r"offline: must be true or false, got 'yes'"),
    (_profile_key("nccl/1X", "1"), r"nccl: '1X' is not a variable name"),
    (_profile_key("scratch", "/scratch/$PRUNE_OFA_UNSET_VARIABLE/x"),
     r"scratch: '/scratch/\$PRUNE_OFA_UNSET_VARIABLE/x': \$PRUNE_OFA_UNSET_VARIABLE is not set"),
], ids=["class-key", "top-key", "class-time", "offline", "nccl-name", "unset-variable"])
def test_a_bad_profile_key_fails_with_one_line_naming_the_file_and_key(newcomer, tmp_path, capsys, edit, message):
    profile = profile_copy(tmp_path, edit=edit)
    code = main(["submit", "--pipeline", "bert-base-90", "--cluster", str(profile), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.match(rf"prune-ofa submit: cluster profile {re.escape(str(profile))}: {message}", err), err
    assert not (tmp_path / "scratch").exists()                           # nothing written


def test_an_unknown_task_or_class_fails_naming_the_key(newcomer, tmp_path, capsys):
    code = main(["submit", "--pipeline", "bert-base-90", "--cluster", str(EXAMPLE), "--tasks", "squad", "squadd",
                 "--dry-run"])
    assert code == 2 and capsys.readouterr().err == (
        "prune-ofa submit: tasks: unknown task(s) 'squadd' (pipeline bert-base-90 has: squad, mnli, qnli, qqp, sst2)\n")
    spec = yaml.safe_load((PIPELINES / "bert-base-90.yaml").read_text())
    spec["stages"]["student"]["slurm"] = {"class": "pretrian"}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(PipelineError, match=r"^stages\.student\.slurm\.class: unknown class 'pretrian' \(known: cpu, "
                                            r"pretrain, task, from the pipeline's classes and cluster profile "):
        load_pipeline(tmp_path / "p.yaml", cluster=EXAMPLE)
    with pytest.raises(PipelineError, match=r"^stages\.student\.slurm\.class: unknown class 'pretrian' .*a cluster "
                                            r"profile \(--cluster FILE or \$PRUNE_OFA_CLUSTER\)"):
        load_pipeline(tmp_path / "p.yaml")
    with pytest.raises(PipelineError, match=r"^cluster profile: no such file 'nowhere.yaml' \(shipped: example"):
        load_cluster("nowhere.yaml")


# -- the GPUs-per-partition check says when it could not check ---------------------------------------

def _no_partition_gpus(text: str) -> str:
    return re.sub(r"^ +partition_gpus: .*\n", "", text, flags=re.M)


@pytest.fixture
def path_without_sinfo(tmp_path, monkeypatch):
    """PATH holds only a directory for fake SLURM clients (none yet) and the virtualenv's (SLURM may
    be installed in /usr/bin: not on this PATH)."""
    from launcher.pipeline import _sinfo_gpus
    _sinfo_gpus.cache_clear()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}")
    assert shutil.which("sinfo") is None
    yield bin_dir
    _sinfo_gpus.cache_clear()


def test_the_partition_check_says_it_could_not_check_in_the_dry_run(newcomer, tmp_path, capsys, path_without_sinfo):
    profile = profile_copy(tmp_path, text_edit=_no_partition_gpus)
    assert main(["submit", "--pipeline", "bert-base-90", "--cluster", str(profile), "--tasks", "squad",
                 "--dry-run"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes == ["note: partition gpu: GPUs per node not checked (sinfo is not on PATH) for stage(s) teacher, "
                     "student, squad-teacher, squad-transfer, squad-qat; set partition_gpus (the partition's GPUs "
                     "per node) in the resource class or slurm section to check it"]

    (path_without_sinfo / "sinfo").write_text("#!/bin/sh\necho 'sinfo: error: Unable to contact slurm controller' >&2"
                                              "\nexit 1\n")
    (path_without_sinfo / "sinfo").chmod(0o755)
    pipeline = load_pipeline("bert-base-90", cluster=profile, tasks=["squad"])
    assert [n.split(";")[0] for n in pipeline.notices] == [
        "partition gpu: GPUs per node not checked (sinfo -p gpu gave no GPU count) for stage(s) teacher, student, "
        "squad-teacher, squad-transfer, squad-qat"]
    assert load_pipeline("bert-base-90", cluster=EXAMPLE, tasks=["squad"]).notices == []   # partition_gpus given


def test_the_partition_notice_comes_before_a_real_submit(newcomer, tmp_path, capsys, path_without_sinfo):
    """A real submit (sbatch, squeue and scontrol are fakes on PATH) prints the notice before the job table."""
    counter = tmp_path / "next"
    counter.write_text("100")
    clients = {"sbatch": f'read n < {counter}; id=$(( n + 1 )); echo $id > {counter}; echo $id',   # builtins only
               "squeue": "exit 0", "scontrol": "exit 0"}
    for name, body in clients.items():
        (path_without_sinfo / name).write_text(f"#!/bin/bash\n{body}\n")
        (path_without_sinfo / name).chmod(0o755)
    profile = profile_copy(tmp_path, text_edit=_no_partition_gpus)
    assert main(["submit", "--pipeline", "bert-base-90", "--cluster", str(profile), "--tasks", "mnli"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("note: partition gpu: GPUs per node not checked (sinfo is not on PATH)")
    assert out[1] == "pipeline bert-base-90: 7 job(s) submitted"


def test_the_submit_hook_takes_a_profiled_pipeline(newcomer, tmp_path):
    """submit_pipeline's runner hook with a profiled pipeline: job names, dependencies, the record."""
    pipeline = load_pipeline("distilbert-90", cluster=profile_copy(tmp_path), tasks=["sst2"])
    calls = []

    def fake(args):
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, f"{100 + len(calls)}\n" if args[0] == "sbatch" else "", "")
    record = submit_pipeline(pipeline, run=fake, echo=lambda line: None)
    assert record["submitted"] == ["prepare", "teacher", "student", "sst2-teacher", "sst2-transfer", "sst2-qat",
                                   "sst2-report"]
    assert record["cluster"] == str(tmp_path / "my-cluster.yaml") and record["tasks"] == ["sst2"]
    squeue = next(c for c in calls if c[0] == "squeue")
    assert "--name=distilbert-90-prepare,distilbert-90-teacher,distilbert-90-student,distilbert-90-sst2-teacher," \
           "distilbert-90-sst2-transfer,distilbert-90-sst2-qat,distilbert-90-sst2-report" in squeue
