# `make demo` and `make test` do all setup on a fresh machine: a virtual environment in .venv (the local
# CPU torch wheel first, so nothing pulls a CUDA build), the package, and the offline Fashion-MNIST.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MALLOC_TRIM_THRESHOLD_ := 4294967296
export MALLOC_TOP_PAD_ := 1073741824
# glibc serves blocks above this from fresh mmaps, zero-filled page by page on every allocation (a third of a
# trajectory-matching iteration's time: benchmarks/results/mtt_iteration.json); 32 MiB, its largest value, keeps tensors in the heap
export MALLOC_MMAP_THRESHOLD_ := 33554432
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup data demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed data

data:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
		{ apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

demo: setup
	$(BIN)/accelerate launch --num_processes 1 --num_cpu_threads_per_process $(shell nproc) --num_machines 1 \
		--mixed_precision no --dynamo_backend no \
		recipes/distill.py --config recipes/configs/fashion_mnist.yaml

test: setup
	$(BIN)/ruff check src recipes tests
	$(BIN)/pytest tests -q

lint: setup
	$(BIN)/ruff check src recipes tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
