# Sourced ON THE GPU MACHINE by bench/gpu/run.sh and bench/fidelity/gpu.sh: installs the carried wheels
# (bench/gpu/prepare.sh built them here: DeepSpeed, hjson, pydantic and its needs) into a folder of their
# own, offline, and puts them and the repository on PYTHONPATH (nothing else is installed).
SITE=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
compgen -G "bench/gpu/wheels/deepspeed-*.whl" >/dev/null \
    || { echo "bench/gpu/wheels/ has no DeepSpeed wheel: run bench/gpu/prepare.sh first, and carry the folder" >&2
         exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    bench/gpu/wheels/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
