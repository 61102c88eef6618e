# Two commands for a fresh machine: `make demo` and `make test` (both set everything up).
# `make test` is the fast tier (minutes; at least one case of every equivalence claim),
# `make test-all` the whole suite (CI runs it). JOBS test processes side by side.
# The virtual environment sees the system's packages, so a user's own torch (e.g. a CUDA
# build) is kept; torch==2.13.0 (a CPU wheel) is installed only when none is importable.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

JOBS ?= 2
FAST_LIMIT ?= 30

.PHONY: setup demo test test-all bench gpu-check clean

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
	$(BIN)/python -m pytest -q -n $(JOBS) -m "not slow" --fast-limit=$(FAST_LIMIT)

test-all: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n $(JOBS)

bench: setup
	$(BIN)/python benchmarks/partition_sd15.py
	$(BIN)/python benchmarks/runtime_cpu.py

# On a machine with CUDA (a few minutes): stages on the GPU == the whole model, emulator on the
# GPU == sequential (deterministic kernels), every rank's loop on one GPU with its sends lowered
# (threads; == the emulator, CUDA-event round times, no host synchronisation in a parallel
# round), per-stage GPU times of full-size SD 2.1; with two or more GPUs also nccl executor ==
# emulator and the measured speedup next to the plan's.
gpu-check: setup
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device here')"
	$(BIN)/python -m pytest -q -m gpu tests
	$(BIN)/python benchmarks/scaling_sd21.py --time-on cuda --repeats 10
	if [ "$$($(BIN)/python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then \
	  $(BIN)/asyncdiff-bench model=sd21 parallel.n=2 parallel.backend=nccl partition.device=cuda \
	    partition.cost_model=time scheduler.steps=20 bench.repeats=3 wandb.mode=disabled; \
	else echo "gpu-check: one GPU; the nccl executor and its speedup need two"; fi

clean:
	rm -rf $(VENV) outputs multirun
