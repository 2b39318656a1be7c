# vlq: `make demo` sets up and annotates sample images end to end with the tiny model;
# `make test` sets up and runs the test suite. Both work on a fresh CPU machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; on a GPU host install your CUDA build first (see README).
TORCH ?= torch==2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# where the package index would otherwise give a CUDA build.
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install -q -e ".[worker,s3,onnx,dev]"
	touch $@

demo: setup
	PATH="$(VENV)/bin:$$PATH" bash scripts/demo.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo
