# `make demo` and `make test` each set up .venv first when it is missing or older than requirements.txt
# (then it is made anew, so no package of an older pin set is left behind).
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

# PyTorch's CUDA variant. Unset: the registry's torch (the CUDA 13.0 build, which needs an NVIDIA driver of
# the R580 series or newer). cu126 or cu128 install PyTorch's builds for older drivers, and cpu a CPU-only
# one, from PyTorch's own package index; every other pin stays as it is. The choice is kept in the
# environment, so a later `make test` keeps it: make setup TORCH_CUDA=cu126
TORCH_CUDAS := cu126 cu128 cu130 cpu
TORCH_CUDA ?= $(shell cat $(VENV)/torch_cuda 2>/dev/null)
ifneq ($(TORCH_CUDA),)
ifeq ($(filter $(TORCH_CUDA),$(TORCH_CUDAS)),)
$(error TORCH_CUDA=$(TORCH_CUDA) is not one of: $(TORCH_CUDAS) (or leave it unset for the registry's build))
endif
endif
TORCH_INDEX = https://download.pytorch.org/whl/$(TORCH_CUDA)
TORCH_PINS = $(shell grep -E '^(torch|torchaudio)==' requirements.txt)
STAMP = $(VENV)/.installed$(if $(TORCH_CUDA),-$(TORCH_CUDA))

.PHONY: setup test demo bench clean gpu-check wheelhouse doctor

setup: $(STAMP)

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is needed, found " + sys.version.split()[0])'
	@# A new requirements.txt gets a fresh environment: the pins are tested together, not on top of old ones.
	@rm -rf $(VENV) && $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifneq ($(TORCH_CUDA),)
	$(BIN)/python -m pip install --index-url $(TORCH_INDEX) $(TORCH_PINS)
endif
	$(BIN)/python -m pip install -r requirements.txt
	@echo "$(TORCH_CUDA)" > $(VENV)/torch_cuda
	@touch $(STAMP)

# Two workers (pytest-xdist): CI's and the developers' machines have 2 cores, and half the suite waits on
# subprocesses, imports and files, so two take about 0.6x the time of one.
# --dist loadgroup: tests marked with one xdist_group run on one worker, so the demo's two tests share one demo run.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

demo: $(STAMP)
	$(BIN)/python demo.py

bench: $(STAMP)
	$(BIN)/python bench/dataloader.py
	$(BIN)/python bench/bench_pretokenize.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/memory.py --embedding
	$(BIN)/python bench/resample.py
	$(BIN)/python bench/bench_generate.py
	$(BIN)/python bench/bench_dpo.py
	$(BIN)/python bench/low_memory.py

# The GPU acceptance check, on a GPU machine with its own Python and PyTorch (no .venv needed; a missing
# package comes from `make wheelhouse`, see the README). Writes gpu_check.md, .json and .log to GPU_CHECK_OUT.
GPU_CHECK_OUT ?= gpu_check_out
gpu-check:
	$(PYTHON) bench/gpu_check.py --output $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# Wheels of what the GPU check needs beyond a stock PyTorch image, at requirements.txt's versions, for a GPU
# machine of another Python version and no network: make wheelhouse PYTHON_VERSION=3.12
PYTHON_VERSION ?= 3.12
WHEELS = $(shell $(PYTHON) bench/gpu_check.py --print_wheelhouse)
wheelhouse:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version $(PYTHON_VERSION) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(WHEELS)

# One screen about this machine for a bug report: Python, torch and CUDA, the driver and GPUs, the pinned
# packages, hub login, disk space, and the largest max_tokens per GPU. It shows no token.
doctor:
	@$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) doctor.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
