# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.e2kd-installed
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint format bench mutation clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/e2kd demo

test: $(STAMP)
	$(BIN)/python -m pytest

# The lint gate (.ci/run fails on a violation): ruff lint and format check, mypy over the public seams.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Rewrite the files ruff can fix (formatting, import order, ...); then `make lint`.
format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_distill_step.py

# Mutation testing of the whole package (not part of `make test`; hours on 2 cores, see docs/testing.md):
# ARGS="--scope method" (about 20 minutes) or ARGS="--files e2kd/guidance.py --tests tests/test_guidance.py" narrows it.
mutation: $(STAMP)
	$(BIN)/python tools/mutation.py $(ARGS)

clean:
	rm -rf $(VENV) demo_out runs *.egg-info .mutation
