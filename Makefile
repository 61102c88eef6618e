# Two commands for a fresh machine: `make demo` and `make test` (both set everything up).
# The virtual environment sees the system's packages, so a user's own torch (e.g. a CUDA
# build) is kept; torch==2.13.0 (a CPU wheel) is installed only when none is importable.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/python -m experiments.demo

test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/partition_sd15.py
	$(BIN)/python benchmarks/runtime_cpu.py

clean:
	rm -rf $(VENV) outputs multirun
