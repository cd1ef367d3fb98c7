# ztbank — every target is self-describing: `make help`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install up down logs images console status reset certs issuer proto proto-check lint format test test-fast test-unit test-integration test-e2e test-e2e-existing test-compose test-stress bench bench-issuer bench-authz bench-bank clean

help: ## list the targets
	@grep -hE '^[a-z0-9%-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk -F ':.*## ' '{sub(/%/, "NAME", $$1); printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "ztbank needs Python 3.11 (set PYTHON=...)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,vault]'
	touch $(STAMP)

install: $(STAMP) ## create .venv/ with pinned dependencies and the ztbank console script

# compose when a Docker engine AND a compose tool (v2 plugin or v1 docker-compose) answer, else
# native; MODE=native|compose overrides (MODE=compose where it cannot run stops, saying why).
# The compose stack is compose.yaml (COMPOSE_PROFILES=consul,otel,grafana adds its profiles).
# Its images are built offline (local Debian base, host wheelhouse) when no container registry
# answers: OFFLINE=auto|1|0. services/stack/compose.py does the work for both compose tools.
COMPOSE := $(BIN)/python -m services.stack.compose --offline $${OFFLINE:-auto}
STACK_MODE = $$($(BIN)/python -m services.stack.compose mode --requested "$${MODE:-}")
# status and logs: of the compose project when it has containers, else of the native stack
RUNNING_MODE = $$($(BIN)/python -m services.stack.compose mode --running --requested "$${MODE:-}")

# On a running native stack, settings other than its own (ZTBANK_SVID_TTL, ZTBANK_CA_TTL,
# ZTBANK_CRL_TTL, UPSTREAM) are refused in one line, exit 2, nothing changed.
run_up = mode=$(STACK_MODE) || exit 2; \
	if [ "$$mode" = compose ]; then $(COMPOSE) up; else $(BIN)/ztbank up $(if $(UPSTREAM),--upstream $(UPSTREAM)); fi

up: install ## start the stack in the background (native processes, or compose when Docker runs)
	@$(run_up)

down: install ## stop the stack and its lab consoles (native and compose; MODE=native: native only); state is kept (VOLUMES=1: compose volumes too)
	@$(BIN)/ztbank down
	@[ "$${MODE:-}" = native ] || { mode=$$($(BIN)/python -m services.stack.compose mode 2>/dev/null); \
	if [ "$$mode" = compose ]; then $(COMPOSE) down $${VOLUMES:+--volumes}; fi; }

logs: install ## follow the stack's logs
	@mode=$(RUNNING_MODE) || exit 2; \
	if [ "$$mode" = compose ]; then $(COMPOSE) logs; \
	else tail -n 20 -F var/log/*.log; fi

images: install ## build every image of the compose stack (OFFLINE=1: local Debian base + host wheelhouse)
	@$(COMPOSE) images

console: install ## the live lab console on http://127.0.0.1:8190/ (ZTBANK_CONSOLE_PORT; `make up` first)
	@mode=$(RUNNING_MODE) || exit 2; \
	if [ "$$mode" = compose ]; then $(COMPOSE) console; else $(BIN)/ztbank console; fi

status: install ## trust domain, issuer and each service's SVID serial, expiry and health (JSON)
	@mode=$(RUNNING_MODE) || exit 2; \
	if [ "$$mode" = compose ]; then $(COMPOSE) status; else $(BIN)/ztbank status --json; fi

reset: install ## stop everything and wipe var/ (balances, history, entries); certs/ is kept
	$(BIN)/ztbank reset

certs: install ## create the trust domain's root CA in certs/ (only if absent)
	$(BIN)/ztbank certs init

issuer: certs ## run the SPIFFE issuer in the foreground (Ctrl-C stops it)
	$(BIN)/ztbank issuer run

proto: install ## regenerate services/_proto from services/proto
	PYTHON=$(BIN)/python scripts/gen_proto.sh

proto-check: install ## fail if services/_proto is stale
	@tmp=$$(mktemp -d) && PYTHON=$(BIN)/python scripts/gen_proto.sh $$tmp && \
	  diff -r --exclude=__pycache__ $$tmp services/_proto && rm -rf $$tmp && echo "generated code is fresh"

lint: install proto-check ## ruff (lint + format check), mypy --strict, and no import circle in services/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python scripts/check_imports.py

format: install ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Test modules run in parallel, TEST_WORKERS at a time (pytest-xdist); a module stays on one
# worker (--dist loadfile), so one that owns a stack keeps it to itself.
TEST_WORKERS ?= 2
PARALLEL = -n $(TEST_WORKERS) --dist loadfile

test: install ## everything: unit, integration and e2e tests, then the e2e suites once more against an existing stack
	$(BIN)/python -m pytest tests $(PARALLEL) $(PYTEST_ARGS)
	$(BIN)/python -m tests.e2e.run_existing $(PYTEST_ARGS)

test-fast: install ## unit and integration tests only (no stack), in parallel
	$(BIN)/python -m pytest tests/unit tests/integration $(PARALLEL) $(PYTEST_ARGS)

test-unit: install ## unit tests only (no processes, no network)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: install ## integration tests only
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: install ## end-to-end tests on a private native stack (always torn down)
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

test-e2e-existing: install ## e2e suites in "existing stack" mode, against a native stack started first
	$(BIN)/python -m tests.e2e.run_existing $(PYTEST_ARGS)

test-compose: install ## e2e suites inside the compose network on a fresh compose stack (needs Docker)
	$(BIN)/python -m tests.compose_run --offline $${OFFLINE:-auto} $(PYTEST_ARGS)

test-stress: install ## the formerly timing-bound tests, 20 runs while busy loops hold every core
	$(BIN)/python -m tests.stress $(STRESS_ARGS)

bench: bench-issuer bench-authz bench-bank ## all benchmarks

bench-issuer: install ## issuer: SVIDs issued per second, Workload API latency p50/p99
	$(BIN)/python -m loadtest.bench_issuer

bench-authz: install ## one authorization decision for a known peer, in process: p50/p99 (target 50 us)
	$(BIN)/python -m loadtest.bench_authz

# BENCH_ARGS: e.g. "--seconds 5", "--repeat 3 --json var/bench.json", "--revocation"; see --help.
BENCH_ARGS ?=
bench-bank: install ## bank vs a bare mTLS pipeline: p50/p99, max req/s, CPU ms/request (BENCH_ARGS=...)
	$(BIN)/python -m loadtest.bench_bank $(BENCH_ARGS)

# Load tests against the running stack; `make up` runs first (it is idempotent).
PROFILE ?= mixed
USERS ?= 20
DURATION ?= 30s
CHAOS_DURATION ?= 60s

.PHONY: load load-chaos lab

load: up ## locust on the stack: PROFILE=reads|transfers|mixed USERS=20 DURATION=30s
	$(BIN)/python -m loadtest.run --profile $(PROFILE) --users $(USERS) --duration $(DURATION)

load-chaos: up ## mixed load while SVIDs rotate and one client's SVID is revoked (loadtest/README.md)
	$(BIN)/python -m loadtest.chaos --users $(USERS) --duration $(CHAOS_DURATION)

# A lab runs where the stack runs: natively, or in compose.yaml's `lab` job beside the compose
# stack (it needs that stack's volumes and network).
run_lab = mode=$(RUNNING_MODE) || exit 2; \
	if [ "$$mode" = compose ]; then $(COMPOSE) lab $(1); else $(BIN)/ztbank lab $(1); fi

lab: install ## list the labs for trainers, one line each (ztbank lab)
	@$(BIN)/ztbank lab

# `make lab-revocation` and the others: the labs are listed once, in services/labs/registry.py.
# An unknown lab, or a lab while another one runs, is refused before `make up` changes anything.
lab-%: install ## lab: run lab NAME where the stack runs (`make lab` lists them), e.g. make lab-revocation
	@$(BIN)/ztbank lab $* --check
	@$(run_up)
	@$(call run_lab,$*)

.PHONY: class lab-all

# The class profile (services/labs/class_profile.py): the native stack stopped and started again
# (balances, history and entries kept) with the lifetimes under which every lab runs in seconds,
# which it prints with the reason for each. Refused while a lab runs.
class: install ## restart the native stack with the class profile (20 s SVIDs ...), under which every lab takes seconds; balances kept
	@$(BIN)/ztbank lab class $(if $(UPSTREAM),--upstream $(UPSTREAM))

# Every lab of services/labs/registry.py in turn, on the running stack (it starts none: `make
# class` first), under one lab lock for the whole run, then a summary table; exit 0: all passed.
lab-all: install ## run every lab in turn on the running stack (`make class` first), one lab lock, then a summary table
	@$(call run_lab,all)

clean: ## remove local state (var/) and caches; keeps certs/ and .venv/
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
