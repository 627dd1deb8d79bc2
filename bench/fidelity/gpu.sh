#!/usr/bin/env bash
# The fidelity study's gpu-window scale, ON THE GPU MACHINE, from the repository root. First, here:
#     bash bench/gpu/prepare.sh                                  # bench/gpu/wheels (DeepSpeed and its needs)
#     python bench/fidelity/run.py --pack bench/fidelity/bundle  # model (bf16), corpus, task splits: ~48 MiB
#     bash bench/fidelity/gpu.sh --check-size                    # what travels, against the 64 MiB limit
# then one call, with time for a rerun (a rerun reuses finished stages only on the same machine):
#     run(command="bash bench/fidelity/gpu.sh", carry=["bench/gpu/wheels", "bench/fidelity/bundle"], timeout_s=560)
# At most 8 files come back from $OUT: the results (one JSON per stage, summary.md) in
# $OUT/fidelity-results.tar.gz, unpack it into bench/fidelity/results/ and commit; the stage logs in
# $OUT/fidelity-logs.tar.gz; the run's output in $OUT/fidelity.log. Arguments go to run.py (default:
# --seeds 0 1).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ ${1:-} == --check-size ]]; then
    bytes() { du -cb "$@" 2>/dev/null | tail -1 | cut -f1; }
    tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
    total=$((tree + $(bytes bench/gpu/wheels) + $(bytes bench/fidelity/bundle)))
    echo "working tree + bench/gpu/wheels + bench/fidelity/bundle: $((total / 1024 / 1024)) MiB (the limit: 64 MiB)"
    ((total < 64 * 1024 * 1024)) || { echo "too big to travel" >&2; exit 1; }
    exit 0
fi
[[ -f bench/fidelity/bundle/manifest.json ]] \
    || { echo "bench/fidelity/bundle/ is missing: run python bench/fidelity/run.py --pack bench/fidelity/bundle" \
              "here, and carry it" >&2; exit 2; }
OUT=${OUT:-runs/fidelity-gpu-out}
mkdir -p "$OUT"
source bench/gpu/install_site.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
args=("$@")
((${#args[@]})) || args=(--seeds 0 1)
RUNS=/tmp/fidelity-runs RESULTS=/tmp/fidelity-results/gpu-window
pack() {   # whatever finished, also after a failure or the time limit
    tar -czf "$OUT/fidelity-results.tar.gz" -C /tmp/fidelity-results gpu-window 2>/dev/null || true
    (cd "$RUNS" && find . -name '*.log' -print0 | tar -czf "$OUT/fidelity-logs.tar.gz" --null -T -) 2>/dev/null || true
}
trap pack EXIT
python3 bench/fidelity/run.py --scale gpu-window --bundle bench/fidelity/bundle --runs "$RUNS" \
    --results "$RESULTS" "${args[@]}" 2>&1 | tee "$OUT/fidelity.log"
