"""``prune-ofa submit`` / ``status``: pipeline specs rendered into sbatch scripts (checked line by line,
no SLURM needed), impossible requests refused before anything is queued, and, on a real SLURM
cluster (the ``slurm_cluster`` fixture), a tiny pipeline that runs every stage in order and a failed
stage that cancels everything downstream."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.pipeline import load_pipeline
from launcher.submit import PipelineActive, SubmitError, format_status, stage_status, submit_pipeline

ROOT = Path(__file__).resolve().parents[3]
PIPELINES = ROOT / "configs" / "pipelines"
SPECS = Path(__file__).resolve().parent / "specs"      # specs the tests need that are not shipped
OLD_GPU_SPEC = "old-style-gpu.yaml"      # every site value in the spec, as shipped before cluster profiles


def spec_copy(name: str, tmp_path: Path, edit=None) -> Path:
    """A shipped pipeline spec (or one of tests/unit/launcher/specs/) with workdir = the project and
    output_root under tmp_path; ``edit`` changes the parsed spec."""
    source = PIPELINES / name if (PIPELINES / name).is_file() else SPECS / name
    spec = yaml.safe_load(source.read_text())
    spec["workdir"] = str(ROOT)
    spec["output_root"] = str(tmp_path / spec["name"])
    if edit:
        edit(spec)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sbatch_lines(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def run_line(script: str) -> str:
    """The command the script runs, continuation lines joined."""
    joined = script.replace("\\\n", " ")
    return next(line for line in joined.splitlines() if "srun " in line and not line.lstrip().startswith("#"))


def dry_run(spec: Path, capsys) -> tuple[int, str, str]:
    code = main(["submit", "--pipeline", str(spec), "--dry-run"])
    out = capsys.readouterr()
    return code, out.out, out.err


# -- rendering ------------------------------------------------------------------------------------

def test_gpu_pipeline_renders_the_right_sbatch_and_launch_lines(tmp_path, capsys):
    """A spec written the old way (its own slurm sections, no classes, no cluster profile) renders as it did."""
    spec = spec_copy(OLD_GPU_SPEC, tmp_path)
    code, out, err = dry_run(spec, capsys)
    assert code == 0, err
    root = tmp_path / "bert-base-85-glue"
    scripts = root / "slurm"
    teacher = (scripts / "teacher.sbatch").read_text()
    lines = sbatch_lines(teacher)
    for expected in ("--job-name=bert-base-85-glue-teacher", "--nodes=4", "--ntasks-per-node=1",
                     "--cpus-per-task=64", "--gres=gpu:8", "--partition=gpu", "--account=my-account",
                     "--time=2-00:00:00", "--mem=0", "--exclusive", "--signal=B:USR1@600", "--requeue",
                     "--open-mode=append", "--kill-on-invalid-dep=yes", f"--chdir={ROOT}",
                     f"--output={root}/logs/%x-%j.out", f"--error={root}/logs/%x-%j.err"):
        assert expected in lines, (expected, lines)
    assert "set -euo pipefail" in teacher
    assert f"export PRUNE_OFA_STOP_FILE={root}/teacher/STOP" in teacher
    assert "prune_ofa_preemptible()" in teacher                       # sparse_pretrain.runtime.preemption's snippet
    run = run_line(teacher)
    assert re.search(rf"prune_ofa_preemptible {root}/teacher +srun --nodes=4 --ntasks-per-node=1 "
                     r"--cpus-per-task=64 --kill-on-bad-exit=1 --gres=gpu:8 +prune-ofa launch pretrain "
                     rf"--config {ROOT}/configs/bert-base-uncased-teacher.yaml --nodes 4 --gpus-per-node 8 "
                     r"--launcher deepspeed --partition gpu ", run), run
    assert "training.micro_batch_size=8" in run and f"training.output_dir={root}/teacher" in run

    student = run_line((scripts / "student.sbatch").read_text())
    assert f"model.name_or_path={root}/teacher/model" in student
    assert f"model.teacher_name_or_path={root}/teacher/model" in student

    prepare = (scripts / "prepare.sbatch").read_text()             # a CPU node, no requeue machinery
    lines = sbatch_lines(prepare)
    assert "--partition=cpu" in lines and "--cpus-per-task=32" in lines and "--no-requeue" in lines
    assert not any(line.startswith(("--gres", "--signal", "--exclusive")) for line in lines)
    assert "prune_ofa_preemptible" not in prepare
    assert re.search(r"srun --nodes=1 --ntasks-per-node=1 --cpus-per-task=32 --kill-on-bad-exit=1 +prune-ofa "
                     r"launch prepare-data --config \S+/bert-base-uncased-teacher.yaml --nodes 1 "
                     r"--processes-per-node 1 --partition cpu", run_line(prepare))

    transfer = (scripts / "sst2-transfer.sbatch").read_text()      # a task stage: one GPU, accelerate
    assert "--gres=gpu:1" in sbatch_lines(transfer) and "--exclusive" not in sbatch_lines(transfer)
    assert "launch finetune" in run_line(transfer) and "--launcher accelerate" in run_line(transfer)
    assert f"model.name_or_path={root}/student/model" in run_line(transfer)
    assert f"distillation.teacher={root}/sst2-teacher/model" in run_line(transfer)
    assert "launch qat" in run_line((scripts / "sst2-qat.sbatch").read_text())
    report = run_line((scripts / "squad-report.sbatch").read_text())
    assert (f"prune-ofa report {root}/squad-transfer/model --int8 {root}/squad-qat/model-int8 --metrics "
            f"{root}/squad-qat/metrics.json --baseline {root}/squad-teacher/metrics.json --out {root}/squad-report"
            ) in re.sub(r" +", " ", report)

    # the sbatch commands, in dependency order: the three task chains fan out after pruning
    commands = [line for line in out.splitlines() if "sbatch" in line]
    order = [line.split("=", 1)[0].removeprefix("job_") for line in commands]
    assert order.index("prepare") < order.index("teacher") < order.index("student") < order.index("sst2_transfer")
    for task in ("sst2", "mnli", "squad"):
        line = commands[order.index(f"{task}_transfer")]
        assert f"--dependency=afterok:$job_student:$job_{task}_teacher --kill-on-invalid-dep=yes" in line
        assert f"--dependency=afterok:$job_{task}_transfer " in commands[order.index(f"{task}_qat")]
        assert f"--dependency=afterok:$job_{task}_qat " in commands[order.index(f"{task}_report")]
        assert "--dependency" not in commands[order.index(f"{task}_teacher")]
    assert (scripts / "submit.sh").is_file() and not (scripts / "jobs.json").exists()
    for script in scripts.glob("*.sbatch"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


@pytest.mark.parametrize("name", sorted(p.name for p in PIPELINES.glob("*.yaml")))
def test_shipped_pipelines_load_with_their_own_recipes(tmp_path, name):
    pipeline = load_pipeline(spec_copy(name, tmp_path), check_partition=False)
    assert all(stage.config is None or stage.config.is_file() for stage in pipeline.stages.values())


def test_cpu_pipeline_renders_processes_per_node_and_the_whole_chain(tmp_path, capsys):
    code, out, err = dry_run(spec_copy("minilm-rt.yaml", tmp_path), capsys)
    assert code == 0, err
    root = tmp_path / "minilm-rt"
    scripts = root / "slurm"
    assert sorted(p.stem for p in scripts.glob("*.sbatch")) == sorted(
        ["prepare", "teacher", "student", "rt-teacher", "rt-transfer", "rt-qat", "rt-report"])
    student = (scripts / "student.sbatch").read_text()
    assert "--gres" not in student and "--partition" not in student and "--account" not in student
    assert {"--nodes=1", "--cpus-per-task=2", "--signal=B:USR1@120", "--requeue"} <= set(sbatch_lines(student))
    assert not any(line.startswith("--time") for line in sbatch_lines(student))     # the partition's limit
    assert "launch pretrain --config" in run_line(student) and "--nodes 1 --processes-per-node 2" in run_line(student)
    assert f"source {Path(sys.prefix).resolve()}/bin/activate" in student   # this venv, absolute
    assert "export HF_HUB_OFFLINE=1" in student
    qat = run_line((scripts / "rt-qat.sbatch").read_text())
    assert f"model.name_or_path={root}/rt-transfer/model" in qat and f"training.output_dir={root}/rt-qat" in qat
    report = (scripts / "rt-report.sbatch").read_text()
    assert "--no-requeue" in sbatch_lines(report) and "prune_ofa_preemptible" not in report
    assert "dry run" in out and "nothing submitted" in out
    assert out.count("sbatch --parsable") == 7


# -- refusals before anything is queued -------------------------------------------------------------

def _set(path: str, value):
    def edit(spec):
        node = spec
        keys = path.split("/")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return edit


@pytest.mark.parametrize("name, edit, message", [
    (OLD_GPU_SPEC, _set("slurm/gpus_per_node", 16),
     r"stage teacher \(pretrain\): bert-base-uncased-teacher.yaml: 16 GPUs per node asked, but partition gpu has "
     r"8 per node"),
    (OLD_GPU_SPEC, _set("stages/student/overrides/training.micro_batch_size", 32),
     r"stage student \(pretrain\): bert-base-uncased-85.yaml: training.global_batch_size: 256 is not divisible by "
     r"micro_batch_size 32 x world size 32 = 1024"),
    ("minilm-rt.yaml", _set("stages/teacher/slurm", {"processes_per_node": 3}),
     r"stage teacher \(pretrain\): minilm-l6-teacher.yaml: training.global_batch_size: 16 is not divisible by "
     r"micro_batch_size 8 x world size 3 = 24"),
    ("minilm-rt.yaml", _set("stages/prepare/after", ["rt-report"]),
     r"stages: cycle (\S+ -> )+\S+"),
    ("minilm-rt.yaml", _set("stages/student/after", ["teacher", "techer"]),
     r"stages.student.after: unknown stage 'techer'"),
    ("minilm-rt.yaml", _set("stages/student/gpus", 2),
     r"stages.student.gpus: unknown key \(known: kind, config, overrides, after, slurm, report\)"),
    ("minilm-rt.yaml", _set("stages/student/slurm", {"gpu_per_node": 2}),
     r"stages.student.slurm.gpu_per_node: unknown key"),
    ("minilm-rt.yaml", _set("stages/student/config", "configs/minilm-l6-95.yaml"),
     r"stages.student.config: no such recipe 'configs/minilm-l6-95.yaml'"),
    ("minilm-rt.yaml", _set("stages/student/overrides/pruning.final_sparsity", 1.5),
     r"stage student \(pretrain\): minilm-l6-85.yaml: pruning.final_sparsity"),
    ("minilm-rt.yaml", _set("task_stages/{task}-qat/after", ["student"]),
     r"stages.rt-qat.overrides.model.name_or_path: uses rt-transfer's output but does not run after it"),
    ("minilm-rt.yaml", _set("task_stages/{task}-report/report/int8", "@{task}-qatt/model-int8"),
     r"stages.rt-report.report.int8: '@rt-qatt/model-int8' names no stage"),
    ("minilm-rt.yaml", _set("slurm/time", "2 hours"), r"slurm.time: '2 hours' is not a SLURM time"),
    ("minilm-rt.yaml", _set("stages/student/slurm", {"time": "00:01:00"}),
     r"stages.student.slurm.signal_seconds: the warning \(120 s\) must come before the time limit"),
    ("minilm-rt.yaml", _set("stages/teacher/overrides", {"training.output_dir": "elsewhere"}),
     r"training.output_dir: set by the pipeline"),
], ids=["gpus-per-node", "global-batch-gpu", "global-batch-cpu", "cycle", "unknown-after", "unknown-key",
        "unknown-slurm-key", "missing-recipe", "bad-recipe-value", "not-upstream", "bad-reference", "bad-time",
        "signal-after-limit", "output-dir"])
def test_impossible_or_inconsistent_specs_fail_before_anything_is_queued(tmp_path, capsys, name, edit, message):
    spec = spec_copy(name, tmp_path, edit=edit)
    code, out, err = dry_run(spec, capsys)
    assert code == 2 and re.search(message, err), err
    assert err.startswith("prune-ofa submit: ")
    assert not (tmp_path / yaml.safe_load(spec.read_text())["name"] / "slurm").exists()   # nothing written


def test_gpus_per_node_checked_against_sinfo_when_the_spec_does_not_say(tmp_path, capsys, monkeypatch):
    """Without partition_gpus, sinfo's GRES for the partition is the limit (a fake sinfo here)."""
    from launcher.pipeline import _sinfo_gpus
    _sinfo_gpus.cache_clear()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text("#!/bin/sh\necho 'gpu:a100:4(S:0-1)'\necho 'gpu:a100:4(S:0-1)'\n")
    (bin_dir / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    spec = spec_copy(OLD_GPU_SPEC, tmp_path, edit=_set("slurm/partition_gpus", None))
    code, out, err = dry_run(spec, capsys)
    assert code == 2 and "8 GPUs per node asked, but partition gpu has 4 per node" in err, err


# -- submission and status against recorded sbatch / scontrol answers --------------------------------

class FakeSlurm:
    """Answers sbatch with increasing job ids (failing the ``fail_at``-th call), records scancel."""

    def __init__(self, fail_at=None):
        self.calls, self.next_id, self.fail_at = [], 100, fail_at

    def __call__(self, args):
        self.calls.append(args)
        if args[0] == "sbatch":
            if self.fail_at is not None and sum(c[0] == "sbatch" for c in self.calls) == self.fail_at:
                return subprocess.CompletedProcess(args, 1, "", "sbatch: error: Batch job submission failed: "
                                                                "Invalid account or account/partition combination")
            self.next_id += 1
            return subprocess.CompletedProcess(args, 0, f"{self.next_id}\n", "")
        return subprocess.CompletedProcess(args, 0, "", "")


def test_submission_chains_dependencies_and_records_the_jobs(tmp_path):
    pipeline = load_pipeline(spec_copy("minilm-rt.yaml", tmp_path))
    fake = FakeSlurm()
    record = submit_pipeline(pipeline, run=fake, echo=lambda line: None)
    ids = {name: entry["job_id"] for name, entry in record["stages"].items()}
    assert ids == {"prepare": "101", "teacher": "102", "student": "103", "rt-teacher": "104", "rt-transfer": "105",
                   "rt-qat": "106", "rt-report": "107"}
    deps = {c[-1].rsplit("/", 1)[1]: next((a for a in c if a.startswith("--dependency")), None)
            for c in fake.calls if c[0] == "sbatch"}
    assert deps["prepare.sbatch"] is None and deps["rt-teacher.sbatch"] is None
    assert deps["rt-transfer.sbatch"] == "--dependency=afterok:103:104"
    assert deps["rt-report.sbatch"] == "--dependency=afterok:106"
    saved = json.loads((pipeline.slurm_dir / "jobs.json").read_text())
    assert saved["stages"]["student"]["log"] == str(pipeline.log_dir / "minilm-rt-student-103.out")


def test_a_failed_submission_cancels_the_jobs_already_submitted(tmp_path):
    pipeline = load_pipeline(spec_copy("minilm-rt.yaml", tmp_path))
    fake = FakeSlurm(fail_at=4)
    with pytest.raises(SubmitError, match=r"sbatch for stage rt-teacher failed: .*Invalid account.*; the 3 job\(s\) "
                                          r"already submitted \(101, 102, 103\) were cancelled"):
        submit_pipeline(pipeline, run=fake, echo=lambda line: None)
    assert fake.calls[-1] == ["scancel", "101", "102", "103"]
    assert not (pipeline.slurm_dir / "jobs.json").exists()


def test_only_resubmits_some_stages_and_waits_for_earlier_jobs_still_queued(tmp_path):
    pipeline = load_pipeline(spec_copy("minilm-rt.yaml", tmp_path))
    submit_pipeline(pipeline, run=FakeSlurm(), echo=lambda line: None)

    class Queue(FakeSlurm):
        def __call__(self, args):
            if args[:2] == ["scontrol", "show"]:
                return subprocess.CompletedProcess(args, 0, "JobId=103 JobName=x JobState=RUNNING Reason=None\n"
                                                            "JobId=104 JobName=y JobState=COMPLETED Reason=None\n", "")
            return super().__call__(args)
    fake = Queue()
    fake.next_id = 200
    notes = []
    record = submit_pipeline(pipeline, only=["rt-transfer", "rt-qat"], run=fake, echo=notes.append)
    sbatch = [c for c in fake.calls if c[0] == "sbatch"]
    assert "--dependency=afterok:103" in sbatch[0] and "--dependency=afterok:201" in sbatch[1]
    assert any("waits for student, job 103" in n for n in notes)
    assert record["stages"]["rt-transfer"]["job_id"] == "201" and record["stages"]["prepare"]["job_id"] == "101"


def test_status_reads_scontrol_and_falls_back_to_the_log(tmp_path):
    log = tmp_path / "b.out"
    log.write_text("prune-ofa: stage b start 1.0 job 2\nprune-ofa: stage b done 2.0\n")
    record = {"pipeline": "p", "output_root": str(tmp_path), "stages": {
        "a": {"job_id": "1", "log": "a.out"}, "b": {"job_id": "2", "log": str(log)},
        "c": {"job_id": "3", "log": "c.out"}, "d": {"job_id": "4", "log": "d.out"}}}
    answer = ("JobId=1 JobName=p-a JobState=RUNNING Reason=None Restarts=1 RunTime=00:01:02 NodeList=node[1-2] "
              "ExitCode=0:0\n"
              "JobId=3 JobName=p-c JobState=PENDING Reason=Dependency Restarts=0 ExitCode=0:0\n"
              "JobId=4 JobName=p-d JobState=CANCELLED Reason=DependencyNeverSatisfied Restarts=0 ExitCode=0:0 "
              "RunTime=00:00:00\n")
    rows = stage_status(record, run=lambda args: subprocess.CompletedProcess(args, 0, answer, ""))
    states = {r["stage"]: (r["state"], r["restarts"], r["info"]) for r in rows}
    assert states["a"] == ("RUNNING", "1", "00:01:02 on node[1-2]")
    assert states["b"][0] == "COMPLETED" and "from the log" in states["b"][2]
    assert states["c"] == ("PENDING", "0", "Dependency")
    assert states["d"][0] == "CANCELLED" and "DependencyNeverSatisfied" in states["d"][2]
    assert "pipeline p" in format_status(record, rows)


# -- idempotent submission: what SLURM still holds is never queued twice --------------------------

class FakeQueue(FakeSlurm):
    """A SLURM that remembers its jobs: sbatch queues a job (PENDING, named by the script's
    ``--job-name``), ``squeue --user --name`` lists this user's jobs still queued, ``scontrol show job``
    every job not yet forgotten, ``sacct`` answers from ``accounting`` (None: accounting disabled)."""

    def __init__(self, accounting=None):
        super().__init__()
        self.jobs, self.forgotten, self.accounting = {}, set(), accounting

    def __call__(self, args):
        if args[0] == "sbatch":
            done = super().__call__(args)
            name = re.search(r"^#SBATCH --job-name=(\S+)", Path(args[-1]).read_text(), re.M).group(1)
            self.jobs[str(self.next_id)] = {"name": name, "state": "PENDING", "reason": "None", "user": "me"}
            return done
        self.calls.append(args)
        if args[0] == "squeue":
            options = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
            assert options["--format"] == "%i|%T|%r|%j"
            names = options["--name"].split(",")
            lines = [f"{i}|{j['state']}|{j['reason']}|{j['name']}" for i, j in self.jobs.items()
                     if j["user"] == options["--user"] and j["name"] in names and j["state"] in ("PENDING", "RUNNING")]
            return subprocess.CompletedProcess(args, 0, "".join(line + "\n" for line in lines), "")
        if args[:2] == ["scontrol", "show"]:
            lines = [f"JobId={i} JobName={j['name']} JobState={j['state']} Reason={j['reason']}"
                     for i, j in self.jobs.items() if i not in self.forgotten]
            return subprocess.CompletedProcess(args, 0, "".join(line + "\n" for line in lines), "")
        if args[0] == "sacct":
            if self.accounting is None:
                return subprocess.CompletedProcess(args, 1, "", "Slurm accounting storage is disabled\n")
            ids = next(a for a in args if a.startswith("--jobs=")).split("=", 1)[1].split(",")
            return subprocess.CompletedProcess(args, 0, "".join(f"{i}|{self.accounting[i]}\n" for i in ids
                                                                if i in self.accounting), "")
        return subprocess.CompletedProcess(args, 0, "", "")

    def set(self, job_id, state, reason="None"):
        self.jobs[str(job_id)].update(state=state, reason=reason)


@pytest.fixture
def me(monkeypatch):
    """The user that submits (squeue --user)."""
    monkeypatch.setattr("getpass.getuser", lambda: "me")


def sbatch_calls(fake) -> list[list[str]]:
    return [c for c in fake.calls if c[0] == "sbatch"]


def test_a_second_submit_is_refused_while_the_first_chain_is_queued(tmp_path, capsys, monkeypatch):
    """The finding: `prune-ofa submit` twice queued a second chain into the same directories. Now the
    second is refused (exit 2, one message naming each queued stage, its job id and state, and the ways
    out), nothing is submitted and jobs.json is left as it was. SLURM's clients here are scripts on PATH
    that answer like SLURM and log every call."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    next_id = tmp_path / "next_id"
    next_id.write_text("100")
    queue = tmp_path / "queue"           # what squeue prints: id|state|reason|name, one job per sbatch
    queue.write_text("")
    clients = {
        "sbatch": f'echo "sbatch $*" >> {calls}\nid=$(( $(cat {next_id}) + 1 )); echo $id > {next_id}\n'
                  f'name=$(sed -n "s/^#SBATCH --job-name=//p" "${{@: -1}}")\n'
                  f'state=$([ $id = 101 ] && echo RUNNING || echo PENDING)\n'
                  f'reason=$([ $id = 101 ] && echo None || echo Dependency)\n'
                  f'echo "$id|$state|$reason|$name" >> {queue}\necho $id',
        "squeue": f'echo "squeue $*" >> {calls}\ncat {queue}',
        "scontrol": f'echo "scontrol $*" >> {calls}\n'
                    f'while IFS="|" read id state reason name; do echo "JobId=$id JobName=$name JobState=$state '
                    f'Reason=$reason"; done < {queue}',
        "scancel": f'echo "scancel $*" >> {calls}'}
    for name, body in clients.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    spec = spec_copy("minilm-rt.yaml", tmp_path)
    assert main(["submit", "--pipeline", str(spec)]) == 0
    capsys.readouterr()
    jobs = tmp_path / "minilm-rt" / "slurm" / "jobs.json"
    before = jobs.read_text()
    assert calls.read_text().count("sbatch ") == 7

    code = main(["submit", "--pipeline", str(spec)])
    out = capsys.readouterr()
    assert code == 2
    assert out.out == "" and out.err.count("\n") == 1 and "Traceback" not in out.err, out.err
    message = out.err
    assert message.startswith("prune-ofa submit: pipeline minilm-rt is still queued: prepare (job 101, RUNNING), "
                              "teacher (job 102, PENDING: Dependency), student (job 103, PENDING: Dependency)")
    assert "rt-report (job 107, PENDING: Dependency)" in message
    assert "scancel 101 102 103 104 105 106 107" in message and f"--pipeline {spec} --resume" in message
    assert calls.read_text().count("sbatch ") == 7             # nothing more queued
    assert jobs.read_text() == before                          # the record of what runs is kept
    assert f"squeue --noheader --user={__import__('getpass').getuser()} --name=minilm-rt-prepare," in calls.read_text()


def test_jobs_missing_from_jobs_json_are_found_by_name(tmp_path, me):
    """jobs.json lost (or a submit interrupted before writing it): the jobs SLURM holds under the
    pipeline's job names, for this user, still refuse a second chain; other users' jobs and other
    pipelines' do not."""
    pipeline = load_pipeline(spec_copy("minilm-rt.yaml", tmp_path))
    fake = FakeQueue()
    fake.jobs = {"7": {"name": "minilm-rt-teacher", "state": "RUNNING", "reason": "None", "user": "me"},
                 "8": {"name": "minilm-rt-student", "state": "PENDING", "reason": "Dependency", "user": "me"},
                 "9": {"name": "minilm-rt-rt-teacher", "state": "RUNNING", "reason": "None", "user": "someone"},
                 "10": {"name": "other-teacher", "state": "RUNNING", "reason": "None", "user": "me"}}
    assert not (pipeline.slurm_dir / "jobs.json").exists()
    with pytest.raises(PipelineActive, match=r"still queued: teacher \(job 7, RUNNING\), student \(job 8, PENDING: "
                                             r"Dependency\); submitting it again") as refused:
        submit_pipeline(pipeline, run=fake, echo=lambda line: None)
    assert "job 9" not in str(refused.value) and "job 10" not in str(refused.value)
    assert sbatch_calls(fake) == [] and not pipeline.slurm_dir.exists()     # refused before anything is written

    # --only goes through the same check: a stage still queued is not queued a second time ...
    with pytest.raises(PipelineActive, match=r"--only: student \(job 8, PENDING: Dependency\) still queued"):
        submit_pipeline(pipeline, only=["student", "rt-report"], run=fake, echo=lambda line: None)
    # ... and the stages after it wait for the job found by name
    record = submit_pipeline(pipeline, only=["rt-transfer"], run=fake, echo=lambda line: None)
    assert sbatch_calls(fake)[0][2] == "--dependency=afterok:8"
    assert record["stages"]["student"]["job_id"] == "8" and "squeue" in record["stages"]["student"]["found"]


def test_resume_queues_only_the_stages_that_have_not_finished(tmp_path, me):
    """--resume: finished stages (COMPLETED in sacct once scontrol forgot the job; forgotten by SLURM
    but with the script's 'done' line in the log) are not resubmitted and nobody waits for them; a stage
    still running is kept and its dependents wait for its job; failed and cancelled stages are queued
    again, in order; jobs.json keeps every job."""
    pipeline = load_pipeline(spec_copy("minilm-rt.yaml", tmp_path))
    fake = FakeQueue(accounting={"101": "COMPLETED"})
    submit_pipeline(pipeline, run=fake, echo=lambda line: None)
    #  prepare 101, teacher 102, student 103, rt-teacher 104, rt-transfer 105, rt-qat 106, rt-report 107
    fake.set(101, "COMPLETED")
    fake.set(102, "COMPLETED")
    fake.forgotten |= {"101", "102"}           # MinJobAge passed; only accounting knows 101
    log = Path(json.loads((pipeline.slurm_dir / "jobs.json").read_text())["stages"]["teacher"]["log"])
    log.write_text("prune-ofa: stage teacher start 1.0 job 102\nprune-ofa: stage teacher done 9.0\n")
    fake.set(103, "RUNNING")
    fake.set(104, "FAILED", "NonZeroExitCode")
    for job in (105, 106, 107):
        fake.set(job, "CANCELLED", "DependencyNeverSatisfied")
    fake.calls.clear()
    fake.next_id = 200

    notes = []
    record = submit_pipeline(pipeline, resume=True, run=fake, echo=notes.append)
    queued = {c[-1].rsplit("/", 1)[1].removesuffix(".sbatch"): next((a for a in c if a.startswith("--dep")), None)
              for c in sbatch_calls(fake)}
    assert queued == {"rt-teacher": None,                                  # 201
                      "rt-transfer": "--dependency=afterok:103:201",       # the running student's job
                      "rt-qat": "--dependency=afterok:202", "rt-report": "--dependency=afterok:203"}
    assert record["submitted"] == ["rt-teacher", "rt-transfer", "rt-qat", "rt-report"]
    assert "prepare: finished (job 101 COMPLETED), not resubmitted" in notes
    assert f"teacher: finished ('done' line in {log}), not resubmitted" in notes
    assert "student: still queued (job 103, RUNNING), kept" in notes
    saved = json.loads((pipeline.slurm_dir / "jobs.json").read_text())
    assert {name: e["job_id"] for name, e in saved["stages"].items()} == {
        "prepare": "101", "teacher": "102", "student": "103", "rt-teacher": "201", "rt-transfer": "202",
        "rt-qat": "203", "rt-report": "204"}
    assert [(e["stage"], e["job_id"]) for e in saved["history"]] == [
        ("rt-teacher", "104"), ("rt-transfer", "105"), ("rt-qat", "106"), ("rt-report", "107")]

    # everything queued or finished now: a second --resume queues nothing, a plain submit is refused
    fake.calls.clear()
    assert submit_pipeline(pipeline, resume=True, run=fake, echo=lambda line: None)["submitted"] == []
    with pytest.raises(PipelineActive, match=r"student \(job 103, RUNNING\), rt-teacher \(job 201, PENDING\)"):
        submit_pipeline(pipeline, run=fake, echo=lambda line: None)
    assert sbatch_calls(fake) == []


def test_resume_without_jobs_json_reads_the_newest_log_of_each_stage(tmp_path, me):
    """No record and SLURM holds nothing: a stage has finished when its newest log (highest job id)
    ends with the 'done' line; an older success does not count after a later failure."""
    pipeline = load_pipeline(spec_copy("minilm-rt.yaml", tmp_path))
    pipeline.log_dir.mkdir(parents=True)
    for stage, job, done in (("prepare", 5, False), ("prepare", 12, True), ("teacher", 13, True),
                             ("teacher", 20, False)):
        done_line = f"prune-ofa: stage {stage} done 2.0\n" if done else ""
        (pipeline.log_dir / f"minilm-rt-{stage}-{job}.out").write_text(
            f"prune-ofa: stage {stage} start 1.0\n{done_line}")
    fake = FakeQueue()
    record = submit_pipeline(pipeline, resume=True, run=fake, echo=lambda line: None)
    assert record["submitted"] == ["teacher", "student", "rt-teacher", "rt-transfer", "rt-qat", "rt-report"]
    assert "--dependency" not in " ".join(sbatch_calls(fake)[0])        # teacher: prepare has finished


def test_resume_refuses_to_keep_a_job_that_waits_for_a_stage_that_must_run_again(tmp_path, me):
    """A student still pending on a teacher that failed (no 'done' line) would never start: --resume
    says to cancel it rather than queue a teacher it cannot see."""
    pipeline = load_pipeline(spec_copy("minilm-rt.yaml", tmp_path))
    fake = FakeQueue()
    submit_pipeline(pipeline, run=fake, echo=lambda line: None)
    for job, state in ((101, "COMPLETED"), (102, "FAILED"), (104, "COMPLETED"), (105, "CANCELLED"),
                       (106, "CANCELLED"), (107, "CANCELLED")):
        fake.set(job, state)
    fake.set(103, "PENDING", "DependencyNeverSatisfied")
    fake.calls.clear()
    with pytest.raises(PipelineActive, match=r"--resume: student \(job 103, PENDING: DependencyNeverSatisfied\) "
                                             r"waits for teacher, which has not finished and is not queued, so it "
                                             r"can never start. Cancel it \(scancel 103\)"):
        submit_pipeline(pipeline, resume=True, run=fake, echo=lambda line: None)
    assert sbatch_calls(fake) == []


def test_submit_cli_takes_resume_or_only_not_both(tmp_path, capsys):
    spec = spec_copy("minilm-rt.yaml", tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["submit", "--pipeline", str(spec), "--resume", "--only", "rt-qat"])
    assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert "--resume" in subprocess.run([sys.executable, "-m", "launcher.cli", "submit", "--help"], cwd=ROOT,
                                        capture_output=True, text=True).stdout


# -- a real SLURM cluster (tests/support/slurm_cluster.py): two emulated nodes on this machine ----------------
