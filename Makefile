# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (only PyPI is needed).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit integration bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/strata demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -q -n 2 --dist loadfile

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python bench/agent_footprint.py
	$(BIN)/python bench/poll_throughput.py
	$(BIN)/python bench/telemetry_wire.py
	$(BIN)/python bench/optimize_minilm.py
	$(BIN)/python bench/policy_footprint.py
	$(BIN)/python bench/rollout_planner.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
