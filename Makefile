# Developer entry points (docs/contracts.md: `make run`, `make test`; `.ci/run` calls
# `make test`). Every tool is called by its .venv/bin path: no activated venv needed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG := config/router.yaml
FLAGS := config/flags.json
SOURCES := $(wildcard router tests loadtests setup.py)

SHELL := /bin/bash
# The compiled hot path: its build record and the extension modules beside the sources.
DROP_BUILD := rm -f router/_compiled.py && find router -name "*.so" -delete

.PHONY: venv compile run check test test-unit test-integration test-system lint typecheck \
	pure-if-stale bench loadtest loadtest-smoke soak clean distclean

# The venv is (re)installed only when pyproject.toml is newer than the stamp.
venv: $(STAMP)

# The editable install is pure Python (ROUTER_COMPILE=0); `make compile` builds the hot
# path in place.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=68"  # setuptools: setup.py
	ROUTER_COMPILE=0 $(BIN)/python -m pip install --quiet -e '.[dev,load]'  # load: `make test` runs the load-test smoke
	@touch $@

# The hot path compiled with mypyc, in place beside the sources (setup.py says which modules
# and why): rebuilt only when router.service.native finds no build, or one made from other sources.
# Everything that runs the router depends on it, so tests and benchmarks run what ships.
# `make clean` goes back to pure Python.
compile: $(STAMP)
	@$(BIN)/python -m router.service.native >/dev/null || { \
	  echo "compiling the hot path with mypyc (about a minute)"; \
	  ROUTER_COMPILE=1 $(BIN)/python setup.py --quiet build_ext --inplace >/dev/null && \
	  $(BIN)/python -m router.service.native; }

# Two demo backends in the background (legacy :9001, new :9002), the router in the
# foreground. The trap stops the backends by pid when the router exits, Ctrl-C included.
run: compile
	@$(BIN)/python -m router.demo_backend --side legacy --host 127.0.0.1 --port 9001 & legacy=$$!; \
	$(BIN)/python -m router.demo_backend --side new --host 127.0.0.1 --port 9002 & new=$$!; \
	trap 'kill $$legacy $$new 2>/dev/null; wait $$legacy $$new 2>/dev/null' EXIT; \
	trap 'exit 130' INT TERM; \
	echo "Try, in another terminal:"; \
	echo "  curl -s -H 'X-Tenant-Id: acme' localhost:8080/hello      # acme is on legacy"; \
	echo "  curl -s -H 'X-Tenant-Id: globex' localhost:8080/hello    # globex is on new"; \
	echo "  curl -s localhost:8080/t/globex/hello                    # the same, tenant from the path"; \
	echo "  $(BIN)/router flags set acme new --file $(FLAGS)  # move acme, then repeat the first curl"; \
	echo "  curl -s -H 'Authorization: Bearer demo-admin-token' localhost:8081/admin/tenants/acme"; \
	echo "(acme stays on new once served there: the ratchet. rm router-ledger.db and"; \
	echo " git checkout $(FLAGS) to reset the demo)"; \
	ROUTER_ADMIN_TOKEN=$${ROUTER_ADMIN_TOKEN:-demo-admin-token} $(BIN)/router serve --config $(CONFIG)

# The whole suite, every tier (tests/README.md), on the compiled hot path, then the load
# smoke: what .ci/run runs.
test: compile
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory typecheck
	$(BIN)/pytest -q
	$(MAKE) --no-print-directory loadtest-smoke

# The fast loop, under a minute: lint, types, and the unit tier (no sockets, no processes).
# It never compiles. Unit tests run what is importable: the compiled build when it matches
# the sources, else the pure-Python source, which behaves the same. A stale build would
# shadow the edited sources (and the test session refuses it), so it is dropped first, as
# `make clean` would; `make compile`, `make test` or `make run` build it again.
check: lint typecheck test-unit

test-unit: $(STAMP) pure-if-stale
	$(BIN)/pytest -q tests/unit

# In-process servers on loopback sockets; then subprocesses, redis-server, promtool, the
# wheel. Both run the compiled hot path, as `make test` does.
test-integration: compile
	$(BIN)/pytest -q tests/integration

test-system: compile
	$(BIN)/pytest -q tests/system

# router.service.native exits 1 for a compiled build older than its sources (0: fresh,
# 2: pure Python).
pure-if-stale: $(STAMP)
	@$(BIN)/python -m router.service.native >/dev/null; \
	if [ $$? -eq 1 ]; then \
	  echo "the compiled hot path is older than its sources: dropped; pure Python until make compile"; \
	  $(DROP_BUILD); \
	fi

lint: $(STAMP)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

typecheck: $(STAMP)
	$(BIN)/mypy

# Side-by-side throughput/latency/memory benchmark (issue 3); see loadtests/README.md.
bench: compile
	$(BIN)/python loadtests/bench.py $(BENCH_ARGS)

# Production-scale load test (issue 6): a diurnal day compressed into LOADTEST_DURATION s
# (mean 220 req/s x scale), 20 % of 10,000 tenants cut over under load, a JSON verdict,
# exit 1 if it fails. Output in loadtests/results/<UTC time>/; see loadtests/README.md.
LOADTEST_DURATION ?= 600
LOADTEST_SCALE ?= 1
LOADTEST_ARGS ?=
loadtest: compile
	$(BIN)/python loadtests/harness.py --duration $(LOADTEST_DURATION) --scale $(LOADTEST_SCALE) $(LOADTEST_ARGS)

# The same in 60 s, 5 % of the tenants moved (part of `make test`).
loadtest-smoke: compile
	timeout -k 10 150 $(BIN)/python loadtests/harness.py --duration 60 --move-share 0.05 --singles 6 --shadow-rate 0.05 $(LOADTEST_ARGS)

# Soak with faults (issue 7): steady load for SOAK_DURATION s, the legacy upstream killed
# and restarted twice, the flag file invalid once; verdict in loadtests/results/soak-*/.
# Not part of `make test` (10 minutes).
SOAK_DURATION ?= 600
SOAK_ARGS ?=
soak: compile
	$(BIN)/python loadtests/soak.py --duration $(SOAK_DURATION) $(SOAK_ARGS)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	$(DROP_BUILD)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
