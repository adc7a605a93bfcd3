# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs: PyPI for both; `make test` also installs swtpm and tpm2-tss from
# Debian's packages for the TPM attestation tests (tools/install-tpm-deps), and PostgreSQL's server for the control
# plane's tests on PostgreSQL (tools/install-pg-deps; the tests start their own throwaway cluster), and Prometheus for
# the monitoring-stack test (tools/install-prometheus-deps; the test starts its own server), and Chromium for the
# console's browser test (tools/install-browser-deps; Playwright from PyPI drives it headless), and QEMU's user mode
# for the tests under an emulated AVX2-only CPU (tools/install-qemu-deps, tools/test-under-isa).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := $(VENV)/.installed-demo
TPM    := $(VENV)/.tpm
PG     := $(VENV)/.pg

.PHONY: demo test lint typecheck unit integration bench clean

# Bytecode once, in parallel, at both levels the processes use (the agent and its helpers run with -OO): left to the
# first imports, every process a fresh clone's test run starts at once compiled the same modules again (pytest took
# 711 s on a clean clone against 583 s with the bytecode there).
COMPILE := $(BIN)/python -m compileall -q -j 0 -o 0 -o 2 $(VENV)/lib src >/dev/null || echo "some files did not compile; imports will"

# `make test`: strata with every extra the tests use and the test tools (about 1.5 GB).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]'
	$(COMPILE)
	touch $(STAMP)

# `make demo`: strata with what the demo and the README's tour run (the control plane, scikit-learn; about 600 MB).
# After `make test` it finds everything there already.
$(DEMO): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[demo]'
	$(COMPILE)
	touch $(DEMO)

# tpm2-pytss (strata[tpm]) builds against tpm2-tss; without libtss2-dev it is left out and the TPM tests skip.
$(TPM): $(STAMP) tools/install-tpm-deps
	tools/install-tpm-deps
	if pkg-config --exists tss2-esys 2>/dev/null; then \
		$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[tpm]'; \
	else echo "tpm2-tss not found: skipping strata[tpm]; the TPM tests will skip"; fi
	touch $(TPM)

# Without it the PostgreSQL variants of the control plane's tests fail, saying what is missing (they never skip).
$(PG): $(STAMP) tools/install-pg-deps
	tools/install-pg-deps
	if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || test -n "$${STRATA_PG_BIN:-}"; then touch $(PG); fi

demo: $(DEMO)
	$(BIN)/strata demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck $(TPM) $(PG)
	tools/install-lb-deps $(VENV)  # HAProxy, systemd-analyze, kustomize: load-balancer and deploy/ tests
	tools/install-prometheus-deps  # prometheus and promtool: deploy/prometheus, deploy/grafana and their e2e test
	tools/install-browser-deps  # chromium: the console's browser test (tests/e2e/test_console_browser.py)
	tools/install-qemu-deps  # qemu-user: the ISA-dependent tests under an emulated AVX2-only CPU (tools/test-under-isa)
	$(BIN)/pytest -q -n 4 --dist loadfile  # 4 workers on 2 cores: much of e2e time is waiting on real processes

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

bench: $(STAMP) $(TPM)
	$(BIN)/python bench/agent_footprint.py
	$(BIN)/python bench/poll_throughput.py
	$(BIN)/python bench/telemetry_wire.py
	$(BIN)/python bench/optimize_minilm.py
	$(BIN)/python bench/policy_footprint.py
	$(BIN)/python bench/rollout_planner.py
	$(BIN)/python bench/tpm_attestation.py
	$(BIN)/python bench/grpc_vs_rest.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
