"""Prune once, transfer to many: the amortized fidelity study (bench/fidelity/study.py says what it
runs and how cost is counted; bench/fidelity/README.md how to read the result).

    python bench/fidelity/run.py --scale cpu-medium --seeds 0            # one seed, under 2 h on 2 cores
    python bench/fidelity/run.py --scale cpu-medium --summary-only       # the table from results/
    python bench/fidelity/run.py --pack bench/fidelity/bundle            # inputs for the GPU machine
    python bench/fidelity/run.py --scale gpu-window --bundle bench/fidelity/bundle --seeds 0 1
    python bench/fidelity/run.py --smoke                                 # gpu-window's logic on CPU

Every stage is the project's real command (``python -m launcher pretrain|finetune`` with ``key=value``
overrides). A stage whose output exists is reused, so a rerun goes on where one stopped; stages that
do not depend on each other run ``--parallel`` at a time. Each finished stage leaves its JSON in
``results/<scale>/`` at once; checkpoints are dropped after each stage, exported models kept.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.fidelity import inputs as study_inputs
from bench.fidelity.records import record_path, stage_record
from bench.fidelity.study import HERE, ROOT, SCALES, TASK_VARIANTS, Scale, Stage, plan, variants_for
from bench.fidelity.summary import summarize


def stage_env(s: Scale) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(s.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def argv_of(stage: Stage) -> list:
    return [sys.executable, "-m", "launcher", stage.command, "--config", str(stage.config), *stage.overrides]


def finished(stage: Stage) -> bool:
    return stage.done_marker.is_file() and (stage.out / "stage.json").is_file()


def run_stages(stages: list, s: Scale, scale_name: str, results: Path, parallel: int) -> None:
    """Run what is not finished, ``parallel`` at a time, each as soon as what it needs is done (in plan
    order otherwise); write each one's record when it ends. A failure lets the running ones finish,
    starts nothing new and exits with the failed log's tail."""
    by_key = {st.key: st for st in stages}
    done = {st.key for st in stages if finished(st)}
    for key in done:                       # records of stages finished before (another session, say)
        if not record_path(results, by_key[key]).is_file():
            write_record(by_key[key], scale_name, results,
                         json.loads((by_key[key].out / "stage.json").read_text())["seconds"])
    pending = [st for st in stages if st.key not in done]
    running: dict = {}
    failed: list = []
    began = time.perf_counter()
    total = len(pending)
    while (pending and not failed) or running:
        for st in list(pending):
            if failed or len(running) >= parallel:
                break
            if all(n in done for n in st.needs):
                pending.remove(st)
                running[st.key] = start(st, s)
                print(f"[{(time.perf_counter() - began) / 60:6.1f} min] start {st.key} "
                      f"({total - len(pending)}/{total})", flush=True)
        time.sleep(0.5)
        for key, (st, proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            log.close()
            seconds = time.perf_counter() - t0
            if proc.returncode != 0 or not st.done_marker.is_file():
                failed.append((st, proc.returncode))
                continue
            for heavy in ("checkpoints", "state"):
                shutil.rmtree(st.out / heavy, ignore_errors=True)
            (st.out / "stage.json").write_text(json.dumps(
                {"key": st.key, "seconds": round(seconds, 1), "argv": argv_of(st)}, indent=2) + "\n")
            done.add(key)
            record = write_record(st, scale_name, results, seconds)
            result = (f"accuracy {record['accuracy']:.4f}" if "accuracy" in record
                      else f"held-out MLM accuracy {record['mlm_accuracy']:.4f}")
            print(f"[{(time.perf_counter() - began) / 60:6.1f} min] done  {key} in {seconds / 60:.1f} min: "
                  f"{result}", flush=True)
    if failed:
        st, code = failed[0]
        log = st.out.parent / f"{Path(st.key).name}.log"
        raise SystemExit(f"stage {st.key} failed (exit {code}); log {log}:\n{log.read_text()[-3000:]}")


def rows(path: str) -> int:
    return len(Path(path).read_text(encoding="utf-8").splitlines())


def start(st: Stage, s: Scale):
    """Start one stage; its log stays open until it ends (run_stages closes it)."""
    st.out.parent.mkdir(parents=True, exist_ok=True)
    log = open(st.out.parent / f"{Path(st.key).name}.log", "w")  # noqa: SIM115
    log.write("$ " + " ".join(argv_of(st)) + "\n\n")
    log.flush()
    proc = subprocess.Popen(argv_of(st), env=stage_env(s), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return st, proc, time.perf_counter(), log


def write_record(st: Stage, scale_name: str, results: Path, seconds: float) -> dict:
    record = stage_record(st, scale_name, seconds)
    path = record_path(results, st)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu-medium")
    parser.add_argument("--smoke", action="store_true",
                        help="the gpu-window study at the smoke scale on CPU: packs a bundle, runs every stage")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tasks", nargs="+", help="a subset of the scale's tasks")
    parser.add_argument("--variants", nargs="+", choices=list(TASK_VARIANTS), help="a subset (default: all)")
    parser.add_argument("--parallel", type=int, help="stages at once (default: the scale's)")
    parser.add_argument("--bundle", type=Path, help="read the inputs from this bundle (default for gpu-window: "
                        "bench/fidelity/bundle)")
    parser.add_argument("--pack", type=Path, metavar="DIR", help="write a bundle of the inputs to DIR and stop")
    parser.add_argument("--corpus", nargs="+", help="JSON-lines files of documents instead of the scale's "
                        "(data/corpus, `make corpus`)")
    parser.add_argument("--runs", type=Path, help="where the stages write (default runs/fidelity/<scale>)")
    parser.add_argument("--results", type=Path, help="where the JSON goes (default bench/fidelity/results/<scale>)")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the table from the results")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and their commands, run nothing")
    args = parser.parse_args(argv)
    scale_name = "smoke" if args.smoke else args.scale
    s = SCALES[scale_name]
    runs = args.runs or ROOT / "runs" / "fidelity" / scale_name
    results = args.results or HERE / "results" / scale_name
    tasks = args.tasks or list(s.tasks)
    unknown = sorted(set(tasks) - set(s.tasks))
    if unknown:
        parser.error(f"--tasks: {', '.join(unknown)} not in scale {scale_name} ({', '.join(s.tasks)})")
    variants = args.variants or variants_for(s)
    corpus = tuple(str(Path(c).resolve()) if args.corpus else str(ROOT / c) for c in (args.corpus or s.corpus))
    if args.summary_only:
        print(summarize(results, scale_name, s))
        return 0
    if args.pack:
        manifest = study_inputs.pack(args.pack, tuple(s.tasks), corpus)
        print(f"bundle {args.pack}: {len(manifest['files'])} files, "
              f"{study_inputs.bundle_bytes(args.pack) / 2**20:.1f} MiB")
        return 0
    bundle = args.bundle
    if args.smoke and bundle is None:
        bundle = runs / "bundle"
        if not (bundle / "manifest.json").is_file():
            study_inputs.pack(bundle, tuple(s.tasks), corpus)
    if s.bundle and bundle is None:
        bundle = HERE / "bundle"
    runs.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    inputs = (study_inputs.from_bundle(s, bundle, runs) if bundle else study_inputs.from_packages(s, runs, corpus))
    (results / "inputs.json").write_text(json.dumps(
        {"key": "inputs", "model": "packaged:minilm-l6" if not bundle else "bundle (bf16 weights)",
         "task_tokens": inputs.task_tokens, "corpus_tokens_per_row": inputs.corpus_tokens_per_row,
         "validation_rows": {t: rows(f["validation"]) for t, f in inputs.task_files.items()},
         "train_rows": {t: rows(f["train"]) for t, f in inputs.task_files.items()}},
        indent=2) + "\n")
    stages = plan(s, inputs, runs, args.seeds, variants, tasks)
    if args.dry_run:
        for st in stages:
            print(f"{st.key}{' (done)' if finished(st) else ''} <- {', '.join(st.needs) or '-'}\n  "
                  + " ".join(argv_of(st)))
        return 0
    began = time.perf_counter()
    print(f"fidelity study, scale {scale_name} ({s.description}): {len(stages)} stages, "
          f"seeds {args.seeds}, tasks {tasks}", flush=True)
    run_stages(stages, s, scale_name, results, args.parallel or s.parallel)
    print(summarize(results, scale_name, s))
    print(f"total {(time.perf_counter() - began) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
