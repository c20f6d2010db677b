# mim_jax: `make demo` (install + the main job on embedded photos), `make test` (whole suite),
# `make lint` (ruff: formatting and lint rules of ruff.toml, read-only).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip --disable-pip-version-check -q
WORKDIR ?= runs/demo
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: demo test lint install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is pinned first and alone so that the CPU wheel is used, never a CUDA build.
# The test install adds libtpu (the `tpu` extra) and jax's CUDA plugin (`gpu-aot`, no NVIDIA
# libraries) so that the compile-only TPU and GPU tests run. Neither changes a mim_jax run: on
# a machine without the chips `import mim_jax` keeps jax off them, no probe, no warning
# (mim_jax/__init__.py; tests/test_aot.py, tests/test_aot_gpu.py check it). A script that
# imports jax before mim_jax sees their start-up lines.
$(VENV)/.installed: setup.py | $(VENV)/bin/python
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,tpu,gpu-aot]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m mim_jax.train --config=configs/ccvit_demo.py --workdir=$(WORKDIR)
	@echo "demo: metrics in $(WORKDIR)/metrics.jsonl, picture in $(WORKDIR)/visualization.png"

test: $(VENV)/.installed-test
	$(PY) -m pytest -n auto --maxprocesses=4 --dist loadgroup tests

# Checks only; `$(VENV)/bin/ruff format .` and `$(VENV)/bin/ruff check --fix .` apply fixes.
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs *.egg-info
