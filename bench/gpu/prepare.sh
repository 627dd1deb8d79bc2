#!/usr/bin/env bash
# Run HERE (a machine with the project's venv and PyPI), before a device run: builds bench/gpu/wheels/,
# what the GPU machine lacks and run.sh installs there offline: a DeepSpeed wheel (PyPI has only its
# source archive; built without ops, which DeepSpeed JIT-builds where they are used) and DeepSpeed's
# pure-Python needs the device image has not (hjson, pydantic and its own), and datasets with the two of
# its needs the image lacks, as Python 3.12 x86-64 wheels.
# Versions: DeepSpeed and pydantic from constraints.txt, the rest as the venv has them (pydantic-core
# must be the one this pydantic pins). Idempotent: a wheel already there is kept, one of another version
# removed (two versions of a package in the folder would stop run.sh's install).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
WHEELS=bench/gpu/wheels
mkdir -p "$WHEELS"
export PIP_DISABLE_PIP_VERSION_CHECK=1

pinned() { sed -n "s/^$1==//p" constraints.txt; }
installed() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# $1: the name as a wheel's file spells it (underscores), $2: the version wanted
have() {
    local wheel
    for wheel in "$WHEELS/$1"-*.whl; do
        [[ -e $wheel && $wheel != "$WHEELS/$1-$2-"* ]] && rm -v "$wheel"
    done
    compgen -G "$WHEELS/$1-$2-*.whl" >/dev/null
}

ds=$(pinned deepspeed)
if ! have deepspeed "$ds"; then
    # --no-build-isolation: its setup.py imports torch; an isolated build would download one
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "deepspeed==$ds"
fi

declare -A versions=([hjson]=$(installed hjson) [pydantic]=$(pinned pydantic) [pydantic_core]=$(installed pydantic-core)
                     [annotated_types]=$(installed annotated-types) [typing_inspection]=$(installed typing-inspection)
                     [typing_extensions]=$(installed typing-extensions)
                     # the fidelity study's data (bench/fidelity/gpu.sh): datasets and what the image lacks of
                     # its needs (it has pyarrow, pandas, fsspec, xxhash, huggingface-hub)
                     [datasets]=$(installed datasets) [dill]=$(installed dill) [multiprocess]=$(installed multiprocess))
for name in "${!versions[@]}"; do
    have "$name" "${versions[$name]}" && continue
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${name//_/-}==${versions[$name]}"
done

ls -1 "$WHEELS"
bytes() { du -cb "$@" 2>/dev/null | tail -1 | cut -f1; }
wheels=$(bytes "$WHEELS")
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "bench/gpu/wheels: $((wheels / 1024)) KiB; with the working tree that travels: $(((tree + wheels) / 1024)) KiB" \
     "(the limit: 64 MiB)"
