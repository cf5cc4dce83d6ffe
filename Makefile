# `make demo` and `make test` each set up .venv first when it is missing or older than requirements.txt
# (then it is made anew, so no package of an older pin set is left behind).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean gpu-check wheelhouse

setup: $(STAMP)

$(STAMP): requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is needed, found " + sys.version.split()[0])'
	@# A new requirements.txt gets a fresh environment: the pins are tested together, not on top of old ones.
	@rm -rf $(VENV) && $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	@touch $(STAMP)

# Two workers (pytest-xdist): CI's and the developers' machines have 2 cores, and half the suite waits on
# subprocesses, imports and files, so two take about 0.6x the time of one.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

demo: $(STAMP)
	$(BIN)/python demo.py

bench: $(STAMP)
	$(BIN)/python bench/dataloader.py
	$(BIN)/python bench/pretokenize.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/memory.py --embedding
	$(BIN)/python bench/resample.py

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

clean:
	rm -rf $(VENV) demo_out .pytest_cache
