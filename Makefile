# ztbank — every target is self-describing: `make help`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install certs issuer proto proto-check lint format test test-unit test-integration bench clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "ztbank needs Python 3.11 (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv/ with pinned dependencies and the ztbank console script

certs: install ## create the trust domain's root CA in certs/ (only if absent)
	$(BIN)/ztbank certs init

issuer: certs ## run the SPIFFE issuer in the foreground (Ctrl-C stops it)
	$(BIN)/ztbank issuer run

proto: install ## regenerate services/_proto from services/proto
	PYTHON=$(BIN)/python scripts/gen_proto.sh

proto-check: install ## fail if services/_proto is stale
	@tmp=$$(mktemp -d) && PYTHON=$(BIN)/python scripts/gen_proto.sh $$tmp && \
	  diff -r --exclude=__pycache__ $$tmp services/_proto && rm -rf $$tmp && echo "generated code is fresh"

lint: install proto-check ## ruff (lint + format check) and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install ## unit and integration tests (real local issuer processes)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-unit: install ## unit tests only (no processes, no network)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: install ## integration tests only
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

bench: install ## issuer benchmarks: SVIDs issued per second, Workload API latency p50/p99
	$(BIN)/python -m loadtest.bench_issuer

clean: ## remove local state (var/) and caches; keeps certs/ and .venv/
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
