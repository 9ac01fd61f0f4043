# The two set-up commands of the README: `make demo` and `make test`.
# Each builds its own virtual environment from the project's files alone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test test-all bench gpu-test mutation clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

# dev + train extras; torch pinned to the CPU build (constraints/ci.txt).
$(VENV)/.dev: pyproject.toml constraints/ci.txt $(VENV)/.runtime
	$(PIP) install -q -c constraints/ci.txt -e '.[dev,train]'
	touch $@

demo: $(VENV)/.runtime
	$(VENV)/bin/coilsight demo

test: $(VENV)/.dev
	bash scripts/ensure-system-tools.sh
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-all: $(VENV)/.dev
	$(PY) -m pytest -q --run-slow

bench: $(VENV)/.runtime
	$(VENV)/bin/coilsight bench --out bench.json

# On a GPU box with the gpu extra installed: the TensorRT tests (skipped everywhere else).
gpu-test: $(VENV)/.dev
	$(PIP) install -q -e '.[gpu]'
	$(PY) -m pytest -q -m gpu

# Mutation testing over the modules that carry the promises (docs/testing.md); tens of minutes,
# never part of `make test`. Narrow it with MUTATE=..., TESTS=..., BUDGET_S=..., JOBS=...
$(VENV)/.mutation: pyproject.toml $(VENV)/.dev
	$(PIP) install -q -c constraints/ci.txt -e '.[mutation]'
	touch $@

mutation: $(VENV)/.mutation
	PY=$(abspath $(PY)) bash scripts/mutation.sh

clean:
	rm -rf $(VENV) .pytest_cache mutants mutation-out
