# Developer entry points (DESIGN.md contracts: `make run`, `make test`; `.ci/run` calls
# `make test`). Every tool is called by its .venv/bin path: no activated venv needed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG := config/router.yaml
FLAGS := config/flags.json
SOURCES := $(wildcard router tests loadtests)

SHELL := /bin/bash

.PHONY: venv run test lint typecheck bench clean distclean

# The venv is (re)installed only when pyproject.toml is newer than the stamp.
venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# Two demo backends in the background (legacy :9001, new :9002), the router in the
# foreground. The trap stops the backends by pid when the router exits, Ctrl-C included.
run: $(STAMP)
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

test: $(STAMP)
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory typecheck
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

typecheck: $(STAMP)
	$(BIN)/mypy

# Side-by-side throughput/latency/memory benchmark (issue 3); see loadtests/README.md.
bench: $(STAMP)
	$(BIN)/python loadtests/bench.py $(BENCH_ARGS)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
