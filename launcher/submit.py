"""``prune-ofa submit`` and ``prune-ofa status``: a pipeline spec as a chain of SLURM jobs.

``submit`` renders one self-contained sbatch script per stage from ``slurm/stage.sbatch.in`` into
``output_root/slurm/<stage>.sbatch`` (and ``submit.sh``, the same submissions as a shell script),
submits them in dependency order with ``sbatch --parsable --dependency=afterok:...
--kill-on-invalid-dep=yes`` (a failed stage cancels everything downstream instead of leaving it
pending), and records ``output_root/slurm/jobs.json``. If an ``sbatch`` fails midway, the jobs
already submitted are cancelled. ``status`` reads that record back and asks ``scontrol`` for each job.

Submitting is idempotent: before anything is queued, SLURM is asked which jobs of the pipeline may still
run (``squeue`` by job name ``<pipeline>-<stage>`` for this user, which also finds jobs that
``jobs.json`` lacks, and ``scontrol`` for the jobs it records), and a pipeline with any is refused
(:class:`PipelineActive`): a second chain would train into the same directories. ``resume=True``
(``--resume``) queues only the stages that have not finished (SLURM says COMPLETED, or, once SLURM has
forgotten the job, its log has the script's ``done`` line), keeps those still queued and makes their
dependents wait for the existing jobs. ``jobs.json`` is updated, never replaced: a resubmitted stage's
earlier entry moves to ``history``.

Each script runs one task per node (``srun --ntasks-per-node=1``) of ``prune-ofa launch``, which
starts the local processes (one per GPU, or ``processes_per_node`` on CPU nodes) and derives the
rendezvous from SLURM's environment. Training stages are requeueable: SLURM's warning signal becomes
a stop file, the trainer checkpoints and exits with 75, and the script requeues the job (the bash
function of ``slurm/preemption.sh``, pasted into the script; the ranks' side:
``sparse_pretrain.runtime.preemption``).

Where a pipeline was loaded with a cluster profile (``--cluster``, :mod:`launcher.cluster`), the scripts
carry its account, partitions, time limits, HF_HOME, offline and NCCL variables, and every command
printed for the user names the profile and the tasks again (:func:`pipeline_arguments`), since the
profile's scratch decides where the pipeline writes.
"""
from __future__ import annotations

import getpass
import json
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from launcher.pipeline import Pipeline, Stage

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"
TEMPLATE = SLURM_DIR / "stage.sbatch.in"
#: the bash side of preemption (USR1 -> stop file -> exit 75 -> requeue; sparse_pretrain/runtime/preemption.py)
PREEMPTION_SNIPPET = SLURM_DIR / "preemption.sh"
#: states in which a job may still run (a dependency on it can still be satisfied)
ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT")
#: states of a job that has ended (squeue lists none of them by default; a listed one is not waited for)
ENDED_STATES = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
                "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED")
#: the line slurm/stage.sbatch.in prints when the stage's command succeeded
DONE_LINE = re.compile(r"^prune-ofa: stage \S+ done ", re.M)


class SubmitError(RuntimeError):
    """A SLURM client call failed (an sbatch: the jobs submitted before it were cancelled)."""


class PipelineActive(ValueError):
    """Jobs of the pipeline are still pending or running; the message names them and the ways out."""


# -- rendering ------------------------------------------------------------------------------------

def job_name(pipeline: Pipeline, stage: Stage) -> str:
    return f"{pipeline.name}-{stage.name}"


def pipeline_arguments(pipeline: Pipeline) -> str:
    """``--pipeline SPEC`` and the ``--cluster`` and ``--tasks`` it was loaded with: how a command
    printed for the user names this very pipeline (the profile's scratch decides where it writes)."""
    args = ["--pipeline", str(pipeline.spec)]
    if pipeline.cluster is not None:
        args += ["--cluster", str(pipeline.cluster.path)]
    if pipeline.tasks != pipeline.all_tasks:
        args += ["--tasks", *pipeline.tasks]
    return shlex.join(args)


def script_path(pipeline: Pipeline, stage: Stage) -> Path:
    return pipeline.slurm_dir / f"{stage.name}.sbatch"


def log_paths(pipeline: Pipeline, stage: Stage, job_id: str) -> tuple[Path, Path]:
    """Where SLURM writes the job's stdout and stderr (``%x-%j.out`` / ``.err`` in the log dir)."""
    base = f"{job_name(pipeline, stage)}-{job_id}"
    return pipeline.log_dir / f"{base}.out", pipeline.log_dir / f"{base}.err"


def launch_command(stage: Stage) -> list[list[str]]:
    """What each node's task runs, in groups of arguments (one line each in the script):
    ``prune-ofa launch KIND --config R --nodes N ...`` then one ``key=value`` override per group;
    for a report, ``prune-ofa report MODEL`` then its options. ``prune-ofa demo`` runs the same
    commands on this machine (``launcher.demo_pipeline``)."""
    r = stage.resources
    if stage.kind == "report":
        groups = [["prune-ofa", "report", stage.report["model"]]]
        groups += [[f"--{key}", stage.report[key]] for key in ("int8", "metrics", "baseline") if key in stage.report]
        return groups + [["--out", str(stage.output_dir)]]
    head = ["prune-ofa", "launch", stage.kind, "--config", str(stage.config), "--nodes", str(r.nodes)]
    if r.gpus_per_node:
        head += ["--gpus-per-node", str(r.gpus_per_node)]
    else:
        head += ["--processes-per-node", str(r.local_processes)]
    if r.launcher != "auto":
        head += ["--launcher", r.launcher]
    if r.partition:
        head += ["--partition", r.partition]
    return [head] + [[arg] for arg in stage.override_args()]


def srun_command(stage: Stage) -> list[str]:
    """One task per node, with the job's CPUs (srun 22.05+ does not inherit --cpus-per-task) and GPUs;
    a task that fails ends the others (ranks on other nodes would wait in a collective)."""
    r = stage.resources
    args = ["srun", f"--nodes={r.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={r.cpus}", "--kill-on-bad-exit=1"]
    if r.gpus_per_node:
        args.append(f"--gres=gpu:{r.gpus_per_node}")
    return args


def command_argv(stage: Stage) -> list[str]:
    """The whole command the script runs (srun included), as one argument list."""
    return srun_command(stage) + [arg for group in launch_command(stage) for arg in group]


def _command_text(stage: Stage) -> str:
    """srun on one line, the launch command on the next, one override per line after it; training
    stages run it through the preemption function (``slurm/preemption.sh``)."""
    groups = launch_command(stage)
    lines = [shlex.join(srun_command(stage)), "    " + shlex.join(groups[0])]
    lines += ["        " + shlex.join(group) for group in groups[1:]]
    if stage.requeue:
        lines = [f"prune_ofa_preemptible {shlex.quote(str(stage.output_dir))}"] + ["    " + line for line in lines]
    return " \\\n".join(lines)


def render_script(pipeline: Pipeline, stage: Stage) -> str:
    r = stage.resources
    sbatch = []
    if r.gpus_per_node:
        sbatch.append(f"--gres=gpu:{r.gpus_per_node}")
    for key, value in (("partition", r.partition), ("account", r.account), ("time", r.time), ("mem", r.mem)):
        if value is not None:
            sbatch.append(f"--{key}={value}")
    sbatch += r.extra
    requeue = [f"--signal=B:USR1@{r.signal_seconds}", "--requeue"] if stage.requeue else ["--no-requeue"]
    setup = r.setup_lines() + [f"export {k}={shlex.quote(str(v))}" for k, v in r.env.items()]
    if stage.requeue:
        setup.append(f"export PRUNE_OFA_STOP_FILE={shlex.quote(str(stage.output_dir / 'STOP'))}")
        preemption = requeue_snippet().rstrip("\n")
    else:
        preemption = ""
    after = stage.after
    values = {
        "pipeline": pipeline.name, "stage": stage.name, "kind": stage.kind,
        "recipe_comment": f", recipe {stage.config}" if stage.config else "",
        "spec": pipeline_arguments(pipeline), "script": str(script_path(pipeline, stage)),
        "dependency_hint": (f" --dependency=afterok:<job ids of {', '.join(after)}>" if after else ""),
        "job_name": job_name(pipeline, stage), "nodes": str(r.nodes), "cpus_per_task": str(r.cpus),
        "resources": "\n".join(f"#SBATCH {line}" for line in sbatch),
        "requeue": "\n".join(f"#SBATCH {line}" for line in requeue),
        "log_dir": str(pipeline.log_dir), "workdir": str(pipeline.workdir),
        "setup": "\n".join(setup), "preemption": preemption, "run": _command_text(stage),
    }
    return fill_template(TEMPLATE.read_text(), values)


def requeue_snippet() -> str:
    """The bash function ``prune_ofa_preemptible OUTPUT_DIR COMMAND...`` a preemptible stage runs under
    (``slurm/preemption.sh``, pasted whole into its script)."""
    return PREEMPTION_SNIPPET.read_text()


def fill_template(text: str, values: dict[str, str]) -> str:
    """``{{name}}`` -> value; a line that is only a placeholder whose value is empty goes away."""
    missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", text)) - set(values))
    if missing:
        raise KeyError(f"template placeholders without a value: {missing}")
    lines = []
    for line in text.splitlines():
        only = re.fullmatch(r"\{\{(\w+)\}\}", line.strip())
        if only and not values[only.group(1)]:
            continue
        lines.append(re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], line))
    return "\n".join(lines) + "\n"


def _variable(stage_name: str) -> str:
    return "job_" + re.sub(r"\W", "_", stage_name)


def sbatch_command(script: Path, dependencies: Sequence[str]) -> list[str]:
    args = ["sbatch", "--parsable"]
    if dependencies:
        args += [f"--dependency=afterok:{':'.join(dependencies)}", "--kill-on-invalid-dep=yes"]
    return args + [str(script)]


def shell_line(stage: Stage, script: Path, dependencies: Sequence[str]) -> str:
    """``job_<stage>=$(sbatch ... SCRIPT)``: the submission as a shell line (dependencies may be
    ``$job_<stage>`` variables of earlier lines)."""
    command = sbatch_command(script, dependencies)
    return f"{_variable(stage.name)}=$({' '.join(command[:-1])} {shlex.quote(command[-1])} | cut -d';' -f1)"


def write_scripts(pipeline: Pipeline) -> dict[str, Path]:
    """Every stage's script, and ``submit.sh`` (the whole chain for ``bash submit.sh``)."""
    pipeline.slurm_dir.mkdir(parents=True, exist_ok=True)
    pipeline.log_dir.mkdir(parents=True, exist_ok=True)
    scripts = {}
    chain = ["#!/bin/bash", f"# Submits pipeline {pipeline.name} as prune-ofa submit does (ids in shell variables).",
             "set -euo pipefail"]
    for stage in pipeline.stages.values():
        path = script_path(pipeline, stage)
        path.write_text(render_script(pipeline, stage))
        path.chmod(0o755)
        scripts[stage.name] = path
        chain.append(shell_line(stage, path, [f"${_variable(a)}" for a in stage.after]))
        chain.append(f'echo "{stage.name}: job ${_variable(stage.name)}"')
    submit_sh = pipeline.slurm_dir / "submit.sh"
    submit_sh.write_text("\n".join(chain) + "\n")
    submit_sh.chmod(0o755)
    return scripts


# -- submitting -----------------------------------------------------------------------------------

Runner = Callable[[list[str]], subprocess.CompletedProcess]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    """A SLURM client command; a missing or hanging client is a failed call, not an exception."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return subprocess.CompletedProcess(args, 127, "", f"{args[0]}: {err}")


def jobs_file(pipeline: Pipeline) -> Path:
    return pipeline.slurm_dir / "jobs.json"


def read_jobs(path: Path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no job record {path} (written by prune-ofa submit)")
    try:
        record = json.loads(Path(path).read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not a job record ({err}); move it away to submit the pipeline again") from None
    if not isinstance(record, dict) or not isinstance(record.get("stages", {}), dict):
        raise ValueError(f"{path}: not a job record (no 'stages' mapping); move it away to submit the pipeline again")
    return record


def _write_jobs(path: Path, record: dict) -> None:
    """Write the record whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def submit_pipeline(pipeline: Pipeline, only: Optional[Sequence[str]] = None, dry_run: bool = False,
                    run: Runner = _run, echo: Callable[[str], None] = print, resume: bool = False) -> dict:
    """Write the scripts; unless ``dry_run``, submit the stages in order and record them.

    Which stages: all of them (refused with :class:`PipelineActive` while any job of the pipeline is
    pending or running), ``only`` those (refused while one of them is; they wait for the jobs of
    upstream stages still queued), or with ``resume`` those that have not finished (stages still queued
    are kept and waited for, finished ones are neither resubmitted nor waited for). Returns the job
    record (``stages``: name -> job_id, script, log, err, after; ``submitted``: the stages queued now;
    ``history``: the entries they replaced)."""
    if only and resume:
        raise ValueError("--only and --resume: give one (--resume picks the unfinished stages itself)")
    selected = list(pipeline.stages) if not only else list(only)
    unknown = [s for s in selected if s not in pipeline.stages]
    if unknown:
        raise ValueError(f"--only: unknown stage(s) {unknown} (stages: {', '.join(pipeline.stages)})")
    previous = read_jobs(jobs_file(pipeline)) if jobs_file(pipeline).is_file() else {"stages": {}}
    # ask SLURM before anything is written; a dry run of the whole chain needs no SLURM
    queued: dict[str, list[StageJob]] = {}
    if not dry_run or only or resume:
        try:
            queued = queued_jobs(pipeline, previous, run)
        except SubmitError as err:
            if not dry_run:
                raise
            echo(f"dry run: {err}; assuming none is queued")
    if resume:
        selected = _unfinished_stages(pipeline, previous, queued, run, echo)
    else:
        busy = {name: jobs for name, jobs in queued.items() if name in selected}
        if busy:
            raise PipelineActive(_busy_message(pipeline, busy, only))
    scripts = write_scripts(pipeline)

    record = {"pipeline": pipeline.name, "spec": str(pipeline.spec), "output_root": str(pipeline.output_root),
              "cluster": str(pipeline.cluster.path) if pipeline.cluster is not None else None, "tasks": pipeline.tasks,
              "stages": dict(previous.get("stages", {})), "history": list(previous.get("history", []))}
    ids: dict[str, str] = {}
    submitted: list[str] = []
    for stage in pipeline.stages.values():
        if stage.name not in selected:
            continue
        dependencies = []
        for up in stage.after:
            if up in ids:
                dependencies.append(ids[up])
            elif up in queued:
                waits = [job.job_id for job in queued[up]]
                dependencies += waits
                echo(f"{stage.name}: waits for {up}, job {', '.join(waits)} of an earlier submission")
            elif only:
                echo(f"{stage.name}: {up} is not submitted (--only); its output is expected in "
                     f"{pipeline.stages[up].output_dir}")
            # with resume, an upstream stage neither queued nor resubmitted has finished: nothing to wait for
        if dry_run:
            echo(shell_line(stage, scripts[stage.name], dependencies))
            ids[stage.name] = f"${_variable(stage.name)}"
            continue
        done = run(sbatch_command(scripts[stage.name], dependencies))
        job_id = done.stdout.strip().split(";")[0]
        if done.returncode != 0 or not job_id.isdigit():
            message = f"sbatch for stage {stage.name} failed: {(done.stderr or done.stdout).strip()}"
            if submitted:
                cancelled = run(["scancel", *submitted])
                how = "cancelled" if cancelled.returncode == 0 else f"scancel failed ({cancelled.stderr.strip()})"
                message += f"; the {len(submitted)} job(s) already submitted ({', '.join(submitted)}) were {how}"
            raise SubmitError(message)
        ids[stage.name] = job_id
        submitted.append(job_id)
        out, err = log_paths(pipeline, stage, job_id)
        _replace_entry(record, stage.name, {
            "job_id": job_id, "script": str(scripts[stage.name]), "log": str(out), "err": str(err),
            "after": stage.after, "dependencies": dependencies, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
    record["submitted"] = [name for name in pipeline.stages if name in ids]
    if not dry_run:
        for name, jobs in queued.items():     # jobs found by name that the record lacks: record them too
            if record["stages"].get(name, {}).get("job_id") not in [job.job_id for job in jobs]:
                out, err = log_paths(pipeline, pipeline.stages[name], jobs[-1].job_id)
                _replace_entry(record, name, {"job_id": jobs[-1].job_id, "script": str(scripts[name]),
                                              "log": str(out), "err": str(err), "after": pipeline.stages[name].after,
                                              "found": "squeue (not in jobs.json)"})
        for name in [n for n in record["stages"] if n not in pipeline.stages]:   # stages the spec dropped
            _replace_entry(record, name, None)
        record["stages"] = {n: record["stages"][n] for n in pipeline.stages if n in record["stages"]}
        _write_jobs(jobs_file(pipeline), record)
    return record


def _replace_entry(record: dict, stage: str, entry: Optional[dict]) -> None:
    """Set a stage's entry; the one it replaces goes to ``history`` (``jobs.json`` keeps every job)."""
    old = record["stages"].pop(stage, None)
    if old is not None:
        record["history"].append({"stage": stage, **old})
    if entry is not None:
        record["stages"][stage] = entry


# -- what is already queued -----------------------------------------------------------------------

@dataclass
class StageJob:
    """A job of one stage that SLURM still holds (pending, running, requeued, ...)."""
    stage: str
    job_id: str
    state: str
    reason: str = ""

    def where(self) -> str:
        """``job 102, PENDING: Dependency`` (the reason only for a pending job)."""
        why = f": {self.reason}" if self.state == "PENDING" and self.reason not in ("", "None") else ""
        return f"job {self.job_id}, {self.state}{why}"

    def describe(self) -> str:
        return f"{self.stage} ({self.where()})"


def queued_jobs(pipeline: Pipeline, record: dict, run: Runner = _run) -> dict[str, list[StageJob]]:
    """The jobs of the pipeline's stages that may still run: stage -> jobs, oldest first.

    ``squeue --name <pipeline>-<stage>,... --user $USER`` finds them by job name, so also those that
    ``jobs.json`` lacks (a lost record, a submit interrupted before writing it, a script sbatch'ed by
    hand); ``scontrol`` answers for the jobs the record names (whoever submitted them). A job name is
    all that ties a job to the pipeline: give each pipeline its own ``name``."""
    names = {job_name(pipeline, stage): stage.name for stage in pipeline.stages.values()}
    done = run(["squeue", "--noheader", f"--user={getpass.getuser()}", f"--name={','.join(names)}",
                "--format=%i|%T|%r|%j"])
    if done.returncode != 0:
        raise SubmitError(f"squeue failed ({(done.stderr or done.stdout).strip()}): cannot tell which jobs of "
                          f"pipeline {pipeline.name} are still queued; nothing submitted")
    found: dict[str, StageJob] = {}
    for line in done.stdout.splitlines():
        fields = line.strip().split("|", 3)
        if len(fields) == 4 and fields[3] in names and fields[1] not in ENDED_STATES:
            found[fields[0]] = StageJob(names[fields[3]], fields[0], fields[1], fields[2])
    recorded = {entry["job_id"]: name for name, entry in record.get("stages", {}).items() if name in pipeline.stages}
    for job_id, fields in job_states(list(recorded), run).items():
        if job_id not in found and fields.get("JobState") in ACTIVE_STATES:
            found[job_id] = StageJob(recorded[job_id], job_id, fields["JobState"], fields.get("Reason", ""))
    by_stage: dict[str, list[StageJob]] = {}
    for job in sorted(found.values(), key=lambda j: (len(j.job_id), j.job_id)):
        by_stage.setdefault(job.stage, []).append(job)
    return {name: by_stage[name] for name in pipeline.stages if name in by_stage}


def _busy_message(pipeline: Pipeline, busy: dict[str, list[StageJob]], only: Optional[Sequence[str]]) -> str:
    jobs = [job for stage_jobs in busy.values() for job in stage_jobs]
    listed = ", ".join(job.describe() for job in jobs)
    cancel = f"scancel {' '.join(job.job_id for job in jobs)}"
    if only:
        return (f"--only: {listed} still queued; a second job would write into the same directory. Wait until "
                f"it ends (prune-ofa status {pipeline_arguments(pipeline)}), cancel it ({cancel}), or leave it out "
                f"of --only (stages after it then wait for it)")
    return (f"pipeline {pipeline.name} is still queued: {listed}; submitting it again would start a second chain "
            f"writing into the same directories under {pipeline.output_root}. Wait until its jobs end (prune-ofa "
            f"status {pipeline_arguments(pipeline)}), cancel them ({cancel}), or queue only the stages that have not "
            f"finished: prune-ofa submit {pipeline_arguments(pipeline)} --resume")


def finished_stages(pipeline: Pipeline, record: dict, run: Runner = _run) -> dict[str, str]:
    """Stages whose last job succeeded: stage -> how that is known. SLURM's word first (``scontrol``,
    then ``sacct`` where accounting keeps forgotten jobs); for a job SLURM no longer knows, or a stage
    the record lacks (its newest log by job id), the ``done`` line the script prints last."""
    entries = {name: entry for name, entry in record.get("stages", {}).items() if name in pipeline.stages}
    states = {job_id: fields.get("JobState", "") for job_id, fields in
              job_states([e["job_id"] for e in entries.values()], run).items()}
    states.update(_sacct_states([e["job_id"] for e in entries.values() if e["job_id"] not in states], run))
    finished = {}
    for name, stage in pipeline.stages.items():
        entry = entries.get(name)
        if entry is not None and entry["job_id"] in states:
            if states[entry["job_id"]] == "COMPLETED":
                finished[name] = f"job {entry['job_id']} COMPLETED"
            continue
        log = Path(entry["log"]) if entry is not None and entry.get("log") else _newest_log(pipeline, stage)
        if log is not None and log.is_file() and DONE_LINE.search(log.read_text(errors="replace")):
            finished[name] = f"'done' line in {log}"
    return finished


def _sacct_states(job_ids: Sequence[str], run: Runner) -> dict[str, str]:
    """Final states from SLURM's accounting; nothing where there is none ("accounting storage is
    disabled") or it does not answer."""
    if not job_ids:
        return {}
    done = run(["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={','.join(job_ids)}",
                "--format=JobID,State"])
    if done.returncode != 0:
        return {}
    states = {}
    for line in done.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id in job_ids and state:
            states[job_id] = state.split()[0]          # "CANCELLED by 1000" -> CANCELLED
    return states


def _newest_log(pipeline: Pipeline, stage: Stage) -> Optional[Path]:
    """The stage's log of the highest job id in the log directory (``<pipeline>-<stage>-<id>.out``)."""
    pattern = re.compile(rf"{re.escape(job_name(pipeline, stage))}-(\d+)\.out")
    logs = [(int(m.group(1)), p) for p in pipeline.log_dir.glob(f"{job_name(pipeline, stage)}-*.out")
            if (m := pattern.fullmatch(p.name))]
    return max(logs)[1] if logs else None


def _unfinished_stages(pipeline: Pipeline, record: dict, queued: dict[str, list[StageJob]], run: Runner,
                       echo: Callable[[str], None]) -> list[str]:
    """``--resume``: the stages to queue again (neither still queued nor finished), saying what
    happens to each stage; refused when a queued job waits for a stage that must run again."""
    finished = finished_stages(pipeline, record, run)
    again = [name for name in pipeline.stages if name not in queued and name not in finished]
    stuck = [(job, up) for name, jobs in queued.items() for job in jobs
             for up in pipeline.stages[name].after if up in again]
    if stuck:
        waits = "; ".join(f"{job.describe()} waits for {up}, which has not finished and is not queued"
                          for job, up in stuck)
        cancel = " ".join(sorted({job.job_id for job, _ in stuck}))
        raise PipelineActive(f"--resume: {waits}, so it can never start. Cancel it (scancel {cancel}) and run "
                             f"prune-ofa submit {pipeline_arguments(pipeline)} --resume again")
    for name in pipeline.stages:
        if name in queued:
            jobs = queued[name]
            echo(f"{name}: still queued ({'; '.join(job.where() for job in jobs)}), kept")
            if len(jobs) > 1:
                echo(f"{name}: warning: {len(jobs)} jobs write into {pipeline.stages[name].output_dir}; cancel all "
                     f"but one (scancel {' '.join(j.job_id for j in jobs[1:])})")
        elif name in finished:
            echo(f"{name}: finished ({finished[name]}), not resubmitted")
    return again


def format_plan(pipeline: Pipeline) -> str:
    """What ``submit --dry-run`` shows before the sbatch lines: the pipeline, its tasks, the cluster
    profile, where it writes, and one row per stage with the resources its job asks for."""
    tasks = f", tasks {' '.join(pipeline.tasks)}" if pipeline.tasks else ""
    lines = [f"pipeline {pipeline.name} ({pipeline.spec}){tasks}: {len(pipeline.stages)} stages",
             pipeline.cluster.describe() if pipeline.cluster is not None else "no cluster profile (--cluster): "
             "the spec's own slurm values", f"output_root {pipeline.output_root}"]
    rows = [("stage", "kind", "nodes x GPUs", "CPUs", "partition", "account", "time", "after")]
    for stage in pipeline.stages.values():
        r = stage.resources
        rows.append((stage.name, stage.kind, f"{r.nodes} x {r.gpus_per_node}", str(r.cpus), r.partition or "default",
                     r.account or "-", r.time or "default", ",".join(stage.after) or "-"))
    return "\n".join(lines) + "\n" + _table(rows)


def format_submitted(pipeline: Pipeline, record: dict, stages: Sequence[str]) -> str:
    rows = [("stage", "job", "after", "log")]
    for name in stages:
        entry = record["stages"][name]
        rows.append((name, entry["job_id"], ",".join(entry["after"]) or "-", entry["log"]))
    return _table(rows) + (f"\nTensorBoard: tensorboard --logdir {pipeline.output_root}"
                           f"\nscripts:     {pipeline.slurm_dir}/*.sbatch"
                           f"\nstatus:      prune-ofa status --jobs {jobs_file(pipeline)}")


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


# -- status ---------------------------------------------------------------------------------------

def job_states(job_ids: Sequence[str], run: Runner = _run) -> dict[str, dict[str, str]]:
    """``scontrol show job -o`` for the jobs slurmctld still knows: id -> fields (JobState, Reason,
    Restarts, ExitCode, RunTime, NodeList, ...). One call for all jobs."""
    if not job_ids:
        return {}
    done = run(["scontrol", "show", "job", "-o"])
    wanted, states = set(map(str, job_ids)), {}
    for line in done.stdout.splitlines():
        fields = dict(token.split("=", 1) for token in line.split() if "=" in token)
        if fields.get("JobId") in wanted:
            states[fields["JobId"]] = fields
    return states


def _from_log(entry: dict) -> tuple[str, str]:
    """For a job slurmctld has forgotten (MinJobAge): what its log says."""
    log = Path(entry.get("log", ""))
    if not log.is_file():
        return "UNKNOWN", "not in slurmctld any more, no log"
    if DONE_LINE.search(log.read_text(errors="replace")):
        return "COMPLETED", "(from the log)"
    return "ENDED", "no 'done' line in the log: failed or killed"


def stage_status(record: dict, run: Runner = _run) -> list[dict]:
    entries = record.get("stages", {})
    states = job_states([e["job_id"] for e in entries.values()], run)
    rows = []
    for name, entry in entries.items():
        fields = states.get(entry["job_id"])
        if fields is None:
            state, info = _from_log(entry)
            restarts = ""
        else:
            state, restarts = fields.get("JobState", "?"), fields.get("Restarts", "0")
            reason = fields.get("Reason", "None")
            if state == "PENDING":
                info = reason
            elif state == "RUNNING":
                info = f"{fields.get('RunTime', '')} on {fields.get('NodeList', '')}"
            else:
                info = f"exit {fields.get('ExitCode', '?')}, ran {fields.get('RunTime', '?')}" + \
                    (f", {reason}" if reason not in ("None", "") else "")
        rows.append({"stage": name, "job_id": entry["job_id"], "state": state, "restarts": restarts,
                     "info": info, "log": entry.get("log", "")})
    return rows


def format_status(record: dict, rows: list[dict]) -> str:
    table = [("stage", "job", "state", "requeued", "details", "log")]
    table += [(r["stage"], r["job_id"], r["state"], r["restarts"] or "-", r["info"], r["log"]) for r in rows]
    return f"pipeline {record.get('pipeline', '?')} ({record.get('output_root', '?')})\n" + _table(table)
