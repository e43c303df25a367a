# `make demo` and `make test` work on a fresh machine: they create .venv and install into it.
# GPU / NPU machines: install your torch (and torch-npu) into .venv first; it is kept.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build; on this project's machines it comes from local disk. Never an unpinned torch:
# that pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint format bench quality device-check clean slurm

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m train.verbs.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Two pytest-xdist workers: much of the suite is process start-up and waiting (README: Tests);
# serially: $(BIN)/python -m pytest
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadgroup

# A one-node SLURM cluster on this machine (root): what tests/launch/test_launch.py submits to.
slurm:
	bash scripts/slurm_local.sh

# Side-by-side measurements, minutes each (see the README's Performance section).
bench: install
	$(BIN)/python bench/attention.py
	$(BIN)/python bench/training.py
	$(BIN)/python bench/prep.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/sft.py

# Model quality per compute against nanoGPT, about 45 minutes: make quality NANOGPT=PATH
# (a checkout of karpathy/nanoGPT).
quality: install
	$(BIN)/python bench/quality.py --nanogpt "$(NANOGPT)"

# The accelerator check (README: Performance): about 8 minutes on one GPU, exit 1 naming the
# first failure; where no GPU or NPU is present, the plan only (a dry run, exit 0).
# Options: make device-check ARGS="--only attention golden" (or --accelerator npu, --lambada FILE).
device-check: install
	$(BIN)/python bench/device_check.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache device_check.json
