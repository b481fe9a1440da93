# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench lint

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install -q -c constraints.txt -e ".[test,demo]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/fxquant demo

test: setup
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check fxquant tests benchmarks

# The peers: Brevitas from the `bench` extra; DiffQ's setup.py imports Cython without declaring it, so it
# is built without build isolation after Cython is in.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints.txt -e ".[bench]"
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation diffq
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/compare_peers.py
