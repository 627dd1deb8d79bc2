#!/usr/bin/env bash
# Runs ON THE GPU MACHINE, from the repository root, after bench/gpu/prepare.sh ran here:
#     run(command="bash bench/gpu/run.sh", carry=["bench/gpu/wheels"], timeout_s=560)
# Installs the carried wheels (DeepSpeed, hjson, pydantic and its needs) into a folder of their own,
# offline, puts them and the repository on PYTHONPATH (nothing else is installed), then runs check.py,
# whose JSON records the versions it ran with and where DeepSpeed came from: $OUT/gpu_check.json
# (rewritten after each measurement), $OUT/gpu_check.md (the table, also printed), $OUT/gpu_check.log.
# Arguments go to check.py (e.g. --budget 300, --only 1_dense,2_kd).
set -euo pipefail   # pipefail: check.py's exit status, not tee's
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
source bench/gpu/install_site.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 bench/gpu/check.py --out "$OUT/gpu_check.json" "$@" 2>&1 | tee "$OUT/gpu_check.log"
