# `make test` and `make demo` work on a fresh machine: they build .venv and
# install everything first (a stamp file keeps the second run fast).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Pinned: an unpinned torch pulls a CUDA build of several GB; 2.13.0 is the
# CPU wheel the developer and CI machines carry.
TORCH_PIN := torch==2.13.0

.PHONY: install test test-slow demo lint bench-mask clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[torch,flax,hf,test,bench,lint]"
	touch $(STAMP)

# The multi-device tests need 4 JAX devices, forced on the CPU before JAX starts: their own run.
test: install
	$(PY) -m pytest -q tests
	XLA_FLAGS=--xla_force_host_platform_device_count=4 $(PY) -m pytest -q tests/multidevice

# Long CPU cases of non-default kernel options (marked slow), kept out of `make test`'s 20 minutes.
test-slow: install
	$(PY) -m pytest -q -m slow tests

demo: install
	$(PY) -m flexjax.gym

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-mask: install
	$(PY) bench/bench_create_block_mask.py

clean:
	rm -rf $(VENV) build *.egg-info
