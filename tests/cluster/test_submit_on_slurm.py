"""prune-ofa submit on a real SLURM cluster on this machine: a whole pipeline in dependency order, a failed
stage cancelling its dependents, a second submit refused and --resume (tests/support/slurm_cluster.py)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PRUNE_OFA = Path(sys.executable).parent / "prune-ofa"
TINY_PRETRAIN = {"max_seq_length": 32, "validation_fraction": 0.1}
TINY_STEPS = {"global_batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 1,
              "log_interval": 1, "eval_batches": 1, "dataloader_workers": 0}


def tiny_spec(root: Path, name: str, stages: dict) -> Path:
    """A pipeline of tiny stages: one CPU process per node, short time limits, offline."""
    spec = {"name": name, "output_root": str(root / "runs"), "workdir": str(ROOT),
            "slurm": {"time": "00:10:00", "signal_seconds": 30, "processes_per_node": 1, "cpus_per_task": 1,
                      "partition": "debug", "env": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                                    "TOKENIZERS_PARALLELISM": "false"}},
            "stages": stages}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def submit_and_wait(cluster, spec: Path, timeout: float) -> tuple[dict, dict]:
    """``prune-ofa submit`` as a user runs it; then each job's final state, in submission order."""
    done = subprocess.run([str(PRUNE_OFA), "submit", "--pipeline", str(spec)], env=cluster.env, capture_output=True,
                          text=True, timeout=120, cwd=spec.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    root = Path(yaml.safe_load(spec.read_text())["output_root"])
    record = json.loads((root / "slurm" / "jobs.json").read_text())
    for entry in record["stages"].values():
        assert entry["job_id"] in done.stdout and entry["log"] in done.stdout
    assert f"tensorboard --logdir {root}" in done.stdout
    import time
    deadline = time.monotonic() + timeout
    states = {name: cluster.wait(entry["job_id"], max(1.0, deadline - time.monotonic()))
              for name, entry in record["stages"].items()}
    return record, states


def logs(record: dict) -> str:
    return "".join(f"\n--- {name}\n" + "".join(Path(entry[k]).read_text(errors="replace")[-3000:]
                                                for k in ("log", "err") if Path(entry[k]).is_file())
                   for name, entry in record["stages"].items())


def stage_times(entry: dict) -> tuple[float, float]:
    text = Path(entry["log"]).read_text()
    start = float(re.search(r"^prune-ofa: stage \S+ start (\S+)", text, re.M).group(1))
    end = float(re.search(r"^prune-ofa: stage \S+ done (\S+)", text, re.M).group(1))
    return start, end


@pytest.mark.slow
def test_pipeline_runs_every_stage_in_order_on_slurm(slurm_cluster, tmp_path_factory):
    """prepare-data -> teacher -> student (2 nodes) -> transfer (KD from a task teacher) -> QAT -> report,
    each a SLURM job started by its dependencies, ending with the compression report."""
    from finetune.tasks.classification import load_rt_sentiment
    from pretrain_fixtures import make_corpus, make_tiny_bert
    root = tmp_path_factory.mktemp("pipeline")
    bert, corpus = make_tiny_bert(root / "tiny-bert"), make_corpus(root / "corpus.jsonl", documents=40)
    rt = load_rt_sentiment(seed=0)
    files = {}
    for split, n in (("train", 64), ("validation", 32)):
        files[split] = str(root / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps({"text": r["sentence"], "polarity": r["label"]}) + "\n"
                                              for r in rt[split].select(range(n))))
    pretrain = root / "pretrain.yaml"
    pretrain.write_text(yaml.safe_dump({
        "stage": "teacher", "model": {"name_or_path": str(bert)},
        "data": {"data_files": [str(corpus)], "cache_dir": str(root / "prepared"), **TINY_PRETRAIN},
        "training": {"total_steps": 4, "save_interval": 4, "eval_interval": 4, **TINY_STEPS}}))
    task = root / "task.yaml"
    task.write_text(yaml.safe_dump({
        "task": {"name": "rt-small", "data_files": files, "text_columns": ["text"], "label_column": "polarity",
                 "num_labels": 2, "max_seq_length": 32},
        "model": {"name_or_path": str(bert), "pattern_lock": False},
        "distillation": {"teacher": None, "lambda_task": 1.0},
        "training": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-3, "warmup_ratio": 0.0}}))
    kd = {"model.pattern_lock": True, "distillation.teacher": "@task-teacher/model", "distillation.lambda_task": 0.0}
    spec = tiny_spec(root, "tiny", {
        "prepare": {"kind": "prepare-data", "config": str(pretrain)},
        "teacher": {"kind": "pretrain", "config": str(pretrain), "after": ["prepare"]},
        "student": {"kind": "pretrain", "config": str(pretrain), "after": ["teacher"], "slurm": {"nodes": 2},
                    "overrides": {"stage": "student", "model.name_or_path": "@teacher/model",
                                  "model.teacher_name_or_path": "@teacher/model", "training.total_steps": 6,
                                  "pruning.final_sparsity": 0.5, "pruning.policy_end": 3, "pruning.end": 4,
                                  "pruning.interval": 1}},
        "task-teacher": {"kind": "finetune", "config": str(task)},
        "transfer": {"kind": "finetune", "config": str(task), "after": ["student", "task-teacher"],
                     "overrides": {"model.name_or_path": "@student/model", **kd}},
        "qat": {"kind": "qat", "config": str(task), "after": ["transfer"],
                "overrides": {"model.name_or_path": "@transfer/model", "training.max_steps": 2, **kd}},
        "report": {"kind": "report", "after": ["qat"],
                   "report": {"model": "@transfer/model", "int8": "@qat/model-int8", "metrics": "@qat/metrics.json",
                              "baseline": "@task-teacher/metrics.json"}},
    })
    record, states = submit_and_wait(slurm_cluster, spec, timeout=900)
    assert set(states.values()) == {"COMPLETED"}, (states, logs(record))

    times = {name: stage_times(entry) for name, entry in record["stages"].items()}
    for name, entry in record["stages"].items():      # each started after everything it waited for ended
        for up in entry["after"]:
            assert times[name][0] >= times[up][1], (name, up, times)
    student_log = Path(record["stages"]["student"]["log"]).read_text()
    assert "node[1-2]" in student_log                  # the student ran on both nodes
    out = root / "runs"
    sparsity = json.loads((out / "student" / "model" / "sparsity.json").read_text())
    assert sparsity["global"] == pytest.approx(0.5, abs=0.01)
    assert (out / "report" / "report.md").is_file()
    report = json.loads((out / "report" / "report.json").read_text())
    assert report and "nominal" in json.dumps(report)

    done = subprocess.run([str(PRUNE_OFA), "status", "--jobs", str(out / "slurm" / "jobs.json")], env=slurm_cluster.env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert {row[0]: row[2] for row in rows} == {name: "COMPLETED" for name in record["stages"]}, done.stdout


@pytest.mark.slow
def test_a_failed_stage_cancels_its_dependents_on_slurm(slurm_cluster, tmp_path):
    """A stage that fails at run time (a model directory that does not exist) ends its downstream
    jobs (--kill-on-invalid-dep): CANCELLED for DependencyNeverSatisfied, not pending forever."""
    recipe = tmp_path / "teacher.yaml"
    recipe.write_text(yaml.safe_dump({"stage": "teacher", "model": {"name_or_path": str(tmp_path / "no-such-model")},
                                      "data": {"data_files": [str(recipe)], **TINY_PRETRAIN},
                                      "training": {"total_steps": 4, **TINY_STEPS}}))
    spec = tiny_spec(tmp_path, "broken", {
        "teacher": {"kind": "pretrain", "config": str(recipe)},
        "student": {"kind": "pretrain", "config": str(recipe), "after": ["teacher"],
                    "overrides": {"model.name_or_path": "@teacher/model"}},
        "report": {"kind": "report", "after": ["student"], "report": {"model": "@student/model"}},
    })
    record, states = submit_and_wait(slurm_cluster, spec, timeout=300)
    assert states == {"teacher": "FAILED", "student": "CANCELLED", "report": "CANCELLED"}, (states, logs(record))
    for name in ("student", "report"):
        assert slurm_cluster.job(record["stages"][name]["job_id"])["Reason"] == "DependencyNeverSatisfied"
    assert "no-such-model" in logs(record)
    done = subprocess.run([str(PRUNE_OFA), "status", "--jobs", str(tmp_path / "runs" / "slurm" / "jobs.json")],
                          env=slurm_cluster.env, capture_output=True, text=True, timeout=60)
    assert re.search(r"^student +\d+ +CANCELLED .*DependencyNeverSatisfied", done.stdout, re.M), done.stdout


@pytest.mark.slow
def test_a_second_submit_is_refused_and_resume_queues_only_what_ended_on_slurm(slurm_cluster, tmp_path):
    """On a real SLURM: a pipeline whose first stage is held (nothing runs) is refused a second time
    and squeue still shows one chain; once its second job is cancelled, --resume queues that stage
    alone, waiting for the held job that is still queued."""
    spec = tiny_spec(tmp_path, "twice", {
        "first": {"kind": "report", "report": {"model": str(tmp_path / "model")}, "slurm": {"extra": ["--hold"]}},
        "second": {"kind": "report", "after": ["first"], "report": {"model": "@first/model"}}})

    def submit(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(PRUNE_OFA), "submit", "--pipeline", str(spec), *extra], env=slurm_cluster.env,
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    def chain() -> list[str]:
        done = subprocess.run(["squeue", "--noheader", "--format=%j %i"], env=slurm_cluster.env, capture_output=True,
                              text=True, check=True)
        return sorted(line for line in done.stdout.splitlines() if line.startswith("twice-"))

    done = submit()
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = tmp_path / "runs" / "slurm" / "jobs.json"
    ids = {name: e["job_id"] for name, e in json.loads(jobs.read_text())["stages"].items()}
    try:
        again = submit()
        assert again.returncode == 2 and again.stdout == "", again.stdout + again.stderr
        assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr, again.stderr
        assert (f"first (job {ids['first']}, PENDING: JobHeldUser), second (job {ids['second']}, PENDING: "
                f"Dependency)") in again.stderr and f"scancel {ids['first']} {ids['second']}" in again.stderr
        assert chain() == [f"twice-first {ids['first']}", f"twice-second {ids['second']}"]

        subprocess.run(["scancel", ids["second"]], env=slurm_cluster.env, check=True)
        assert slurm_cluster.wait(ids["second"], 30) == "CANCELLED"
        resumed = submit("--resume")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"first: still queued (job {ids['first']}, PENDING: JobHeldUser), kept" in resumed.stdout
        assert "1 job(s) submitted" in resumed.stdout
        record = json.loads(jobs.read_text())
        second = record["stages"]["second"]["job_id"]
        assert record["stages"]["first"]["job_id"] == ids["first"] and second != ids["second"]
        assert [(e["stage"], e["job_id"]) for e in record["history"]] == [("second", ids["second"])]
        assert slurm_cluster.job(second)["Dependency"] == f"afterok:{ids['first']}(unfulfilled)"
        assert chain() == [f"twice-first {ids['first']}", f"twice-second {second}"]
    finally:
        queued = [line.split()[1] for line in chain()]
        if queued:
            subprocess.run(["scancel", *queued], env=slurm_cluster.env)
