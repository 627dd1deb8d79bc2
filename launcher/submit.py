"""``prune-ofa submit`` and ``prune-ofa status``: a pipeline spec as a chain of SLURM jobs.

``submit`` renders one self-contained sbatch script per stage from ``slurm/stage.sbatch.in`` into
``output_root/slurm/<stage>.sbatch`` (and ``submit.sh``, the same submissions as a shell script),
submits them in dependency order with ``sbatch --parsable --dependency=afterok:...
--kill-on-invalid-dep=yes`` (a failed stage cancels everything downstream instead of leaving it
pending), and records ``output_root/slurm/jobs.json``. If an ``sbatch`` fails midway, the jobs
already submitted are cancelled. ``status`` reads that record back and asks ``scontrol`` for each job.

Each script runs one task per node (``srun --ntasks-per-node=1``) of ``prune-ofa launch``, which
starts the local processes (one per GPU, or ``processes_per_node`` on CPU nodes) and derives the
rendezvous from SLURM's environment. Training stages are requeueable: SLURM's warning signal becomes
a stop file, the trainer checkpoints and exits with 75, and the script requeues the job
(``sparse_pretrain.preemption``).
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from .pipeline import Pipeline, Stage

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "stage.sbatch.in"
#: states in which a job may still run (a dependency on it can still be satisfied)
ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT")


class SubmitError(RuntimeError):
    """An sbatch call failed; the jobs submitted before it were cancelled."""


# -- rendering ------------------------------------------------------------------------------------

def job_name(pipeline: Pipeline, stage: Stage) -> str:
    return f"{pipeline.name}-{stage.name}"


def script_path(pipeline: Pipeline, stage: Stage) -> Path:
    return pipeline.slurm_dir / f"{stage.name}.sbatch"


def log_paths(pipeline: Pipeline, stage: Stage, job_id: str) -> tuple[Path, Path]:
    """Where SLURM writes the job's stdout and stderr (``%x-%j.out`` / ``.err`` in the log dir)."""
    base = f"{job_name(pipeline, stage)}-{job_id}"
    return pipeline.log_dir / f"{base}.out", pipeline.log_dir / f"{base}.err"


def launch_command(stage: Stage) -> list[list[str]]:
    """What each node's task runs, in groups of arguments (one line each in the script):
    ``prune-ofa launch KIND --config R --nodes N ...`` then one ``key=value`` override per group;
    for a report, ``prune-ofa report MODEL`` then its options."""
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
    stages run it through the preemption function (``sparse_pretrain.preemption``)."""
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
        from sparse_pretrain.preemption import requeue_snippet
        setup.append(f"export PRUNE_OFA_STOP_FILE={shlex.quote(str(stage.output_dir / 'STOP'))}")
        preemption = requeue_snippet().rstrip("\n")
    else:
        preemption = ""
    after = stage.after
    values = {
        "pipeline": pipeline.name, "stage": stage.name, "kind": stage.kind,
        "recipe_comment": f", recipe {stage.config}" if stage.config else "",
        "spec": str(pipeline.spec), "script": str(script_path(pipeline, stage)),
        "dependency_hint": (f" --dependency=afterok:<job ids of {', '.join(after)}>" if after else ""),
        "job_name": job_name(pipeline, stage), "nodes": str(r.nodes), "cpus_per_task": str(r.cpus),
        "resources": "\n".join(f"#SBATCH {line}" for line in sbatch),
        "requeue": "\n".join(f"#SBATCH {line}" for line in requeue),
        "log_dir": str(pipeline.log_dir), "workdir": str(pipeline.workdir),
        "setup": "\n".join(setup), "preemption": preemption, "run": _command_text(stage),
    }
    return fill_template(TEMPLATE.read_text(), values)


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
    return json.loads(Path(path).read_text())


def submit_pipeline(pipeline: Pipeline, only: Optional[Sequence[str]] = None, dry_run: bool = False,
                    run: Runner = _run, echo: Callable[[str], None] = print) -> dict:
    """Write the scripts; unless ``dry_run``, submit the stages (``only``: those stages) in order and
    record them. Returns the job record (``stages``: name -> job_id, script, log, err, after)."""
    selected = list(pipeline.stages) if not only else list(only)
    unknown = [s for s in selected if s not in pipeline.stages]
    if unknown:
        raise ValueError(f"--only: unknown stage(s) {unknown} (stages: {', '.join(pipeline.stages)})")
    scripts = write_scripts(pipeline)
    previous = read_jobs(jobs_file(pipeline)) if only and jobs_file(pipeline).is_file() else {"stages": {}}
    active = _active_jobs(previous, run) if only else {}

    record = {"pipeline": pipeline.name, "spec": str(pipeline.spec), "output_root": str(pipeline.output_root),
              "stages": dict(previous.get("stages", {}))}
    ids: dict[str, str] = {}
    submitted: list[str] = []
    for stage in pipeline.stages.values():
        if stage.name not in selected:
            continue
        dependencies = []
        for up in stage.after:
            if up in ids:
                dependencies.append(ids[up])
            elif up in active:
                dependencies.append(active[up])
                echo(f"{stage.name}: waits for {up}, job {active[up]} of an earlier submission")
            elif only:
                echo(f"{stage.name}: {up} is not submitted (--only); its output is expected in "
                     f"{pipeline.output_root / up}")
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
        record["stages"][stage.name] = {"job_id": job_id, "script": str(scripts[stage.name]), "log": str(out),
                                        "err": str(err), "after": stage.after, "dependencies": dependencies,
                                        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not dry_run:
        record["stages"] = {n: record["stages"][n] for n in pipeline.stages if n in record["stages"]}
        jobs_file(pipeline).write_text(json.dumps(record, indent=2) + "\n")
    return record


def _active_jobs(record: dict, run: Runner) -> dict[str, str]:
    """Stages of an earlier submission whose job may still run: name -> job id."""
    states = job_states([e["job_id"] for e in record.get("stages", {}).values()], run)
    return {name: e["job_id"] for name, e in record.get("stages", {}).items()
            if states.get(e["job_id"], {}).get("JobState") in ACTIVE_STATES}


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
    text = log.read_text(errors="replace")
    if re.search(r"^prune-ofa: stage \S+ done ", text, re.M):
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
