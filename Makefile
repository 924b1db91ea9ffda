# Quick start:   make run    (main job on the embedded synthetic dataset)
#                make test   (default test suite)
# Both create .venv and install the package on first use; later calls reuse it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The stamp is named after pyproject.toml's hash: editing dependencies reinstalls.
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

export FLWR_TELEMETRY_ENABLED ?= 0

.PHONY: install run test test-slow lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# librosa compiles its numba kernels when its modules first load (about 13 s of CPU)
	@# and keeps them in the venv: done once here, not in the first test run.
	$(BIN)/python -c "import numpy, librosa; librosa.feature.melspectrogram(y=numpy.zeros(16000, 'float32'))"
	@rm -f $(VENV)/.installed-*
	@touch $@

# The main job (conf/experiment/main.yaml): the 2020 collapse and its fixes side by side
# (centralised, params_only in eval / train / recalibrated mode, FedBN, GroupNorm), one
# sweep; the table at the end compares them.
run: install
	$(BIN)/fedkws-train -m experiment=main

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

# The benchmark suite: every ratio with its target; rewrites benchmarks/RESULTS.md.
# One benchmark: $(BIN)/python benchmarks/run.py --only NAME (--list names them).
bench: install
	$(BIN)/python benchmarks/run.py

lint: install
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/ruff format --check src tests benchmarks experiments

clean:
	rm -rf outputs/* data/cache
