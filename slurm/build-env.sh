#!/usr/bin/env bash
# The project's environment on a GPU cluster: one virtualenv on the shared filesystem, which the jobs on
# every node activate (the scripts `prune-ofa submit` renders do, by default), holding the CUDA build of the
# torch that constraints.txt pins and everything else `make venv` installs, pinned the same way.
#
# Run it from the project root on a compute node of the kind the jobs use: its NVIDIA driver decides the
# torch CUDA build, and its nvcc (if DeepSpeed ops are to be built ahead) builds them.
#   sbatch --partition=gpu slurm/build-env.sh /shared/envs/prune-ofa
#   srun --partition=gpu --gres=gpu:1 bash slurm/build-env.sh /shared/envs/prune-ofa
#   make venv-cuda VENV=/shared/envs/prune-ofa          # the same, on the node you are logged in to
# The path must be the same on every node (a shared filesystem). Default: .venv in the project root.
#
# Settings, as environment variables (or make variables after `make venv-cuda`):
#   TORCH_CUDA        cu130 | cu128 | cu126 | cpu: the torch build (default: the newest that this node's
#                     driver runs, from `python -m launcher.env_report --torch-index-url`)
#   TORCH_INDEX_URL   the wheel index for torch (default: PyTorch's, https://download.pytorch.org/whl/$TORCH_CUDA)
#   DeepSpeed ops     JIT by default: an op is compiled on first use, on the node that uses it, which needs
#                     the nvcc of torch's CUDA major version and ninja there (the recipes' torch AdamW
#                     uses none; DeepSpeedCPUAdam, for ZeRO-Offload, needs cpu_adam). To build ops ahead
#                     instead (here, with this node's nvcc): DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 (one
#                     DS_BUILD_<OP>=1 per op; under make, DS_BUILD_OPS=1 only as `make venv-cuda DS_BUILD_OPS=1`);
#                     TORCH_CUDA_ARCH_LIST="8.0;9.0" builds them for GPUs other than this node's (A100, H100).
#   PYTHON            the interpreter the virtualenv is made from (default python3)
#
#SBATCH --job-name=prune-ofa-build-env
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --time=01:00:00
#SBATCH --output=build-env-%j.log
set -euo pipefail

die() { echo "build-env: $*" >&2; exit 1; }

# the project root: beside this script, or (under sbatch, which runs a copy) where the job was submitted
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for ROOT in "$here" "${SLURM_SUBMIT_DIR:-}" ""; do
    [ -n "$ROOT" ] && [ -f "$ROOT/constraints.txt" ] && [ -f "$ROOT/setup.py" ] && break
done
[ -n "$ROOT" ] || die "run it from the project root (no constraints.txt beside it nor in ${SLURM_SUBMIT_DIR:-.})"
cd "$ROOT"
VENV=$(realpath -m "${1:-$ROOT/.venv}")
PYTHON=${PYTHON:-python3}
MAKE=${MAKE:-make}

torch_pin=$(grep -E '^torch==' constraints.txt) || die "constraints.txt pins no torch"
deepspeed_pin=$(grep -E '^deepspeed==' constraints.txt) || die "constraints.txt pins no deepspeed"
if [ -z "${TORCH_INDEX_URL:-}" ]; then
    if [ -n "${TORCH_CUDA:-}" ]; then
        TORCH_INDEX_URL=https://download.pytorch.org/whl/$TORCH_CUDA
    else   # stdlib only: it asks nvidia-smi which CUDA the driver runs
        TORCH_INDEX_URL=$("$PYTHON" -m launcher.env_report --torch-index-url) || die "no torch build for this driver"
    fi
fi
build=${TORCH_INDEX_URL##*/}
torch_spec=$torch_pin
if [[ $build =~ ^(cu[0-9]+|cpu)$ ]]; then
    torch_spec=$torch_pin+$build      # PyTorch's index: ask for that build by its local version (2.13.0+cu130)
fi
want_cuda=$([ "$build" = cpu ] && echo 0 || echo 1)
ahead=$(env | grep -E '^DS_BUILD_[A-Z0-9_]+=1$' | cut -d= -f1 | sort | paste -sd' ' - || true)

echo "build-env: host $(hostname), GPUs: $(nvidia-smi -L 2>/dev/null | wc -l), venv $VENV"
echo "build-env: $torch_spec from $TORCH_INDEX_URL; DeepSpeed ops: ${ahead:-JIT (none built ahead)}"
if [ -n "$ahead" ]; then
    nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
    [ -x "$nvcc" ] || die "$ahead needs nvcc on this node (module load cuda, or set CUDA_HOME), \
or leave the ops to JIT: unset $ahead"
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py=$VENV/bin/python
export PIP_CONSTRAINT=$ROOT/constraints.txt PIP_DISABLE_PIP_VERSION_CHECK=1
is_cuda() { "$py" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; }
if "$py" -c 'import torch' 2>/dev/null && [ "$(is_cuda && echo 1 || echo 0)" != "$want_cuda" ]; then
    "$py" -m pip uninstall -y -q torch      # a CPU torch satisfies torch==2.13.0 too: replace it
fi
"$py" -m pip install -q "$torch_spec" --index-url "$TORCH_INDEX_URL"
if [ "$want_cuda" = 1 ] && ! is_cuda; then
    die "$("$py" -c 'import torch; print(torch.__version__)') is a CPU build: pip preferred another wheel of \
$torch_pin (a find-links or a mirror in pip.conf?); set TORCH_INDEX_URL to an index with the CUDA build"
fi

# everything else, as `make venv` installs it (DS_BUILD_OPS=0: DeepSpeed's Python only); torch is kept
"$MAKE" --no-print-directory -C "$ROOT" venv VENV="$VENV" PYTHON="$PYTHON"

if [ -n "$ahead" ]; then (   # rebuild DeepSpeed from source against this torch, with the ops asked for
    # DeepSpeed builds the ops of the accelerator it detects, which is the CPU where no GPU is visible
    # (CPU ops, and the GPU nodes would JIT theirs): name it
    export DS_ACCELERATOR=${DS_ACCELERATOR:-$([ "$want_cuda" = 1 ] && echo cuda || echo cpu)}
    export PATH=$VENV/bin:$PATH DS_BUILD_OPS=${DS_BUILD_OPS:-0}      # ninja is in the venv
    # headers of the CUDA libraries torch's wheels bring (cusparse.h, cublas_v2.h, ...), for a toolkit that
    # lacks them (nvcc from PyPI's nvidia-cuda-nvcc); searched after the toolkit's own
    for include in "$VENV"/lib/python3*/site-packages/nvidia/cu*/include; do
        [ -d "$include" ] && export CPATH=${CPATH:+$CPATH:}$include
    done
    "$py" -m pip install -q --no-build-isolation --force-reinstall --no-deps --no-cache-dir "$deepspeed_pin"
    ds_report --hide_errors_and_warnings      # the ops built ahead say [YES]
) fi

require=$([ "$want_cuda" = 1 ] && nvidia-smi -L >/dev/null 2>&1 && echo --require-gpu || true)
"$VENV/bin/prune-ofa" env $require
echo "build-env: done; jobs use it with: source $VENV/bin/activate"
