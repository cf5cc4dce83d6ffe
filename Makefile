# `make demo` and `make test` each set up .venv first when it is missing or older than requirements.txt
# (then it is made anew, so no package of an older pin set is left behind).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

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

clean:
	rm -rf $(VENV) demo_out .pytest_cache
