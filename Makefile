# DuanFlow — `make help` lists the targets. Everything runs from the repository root of a clone.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the virtualenv is (re)synced when the lock or any pyproject changes
SYNCED := $(VENV)/.duanflow-synced
MANIFESTS := uv.lock pyproject.toml $(wildcard proto/pyproject.toml sdk/pyproject.toml services/*/pyproject.toml)

# tests: a hard per-test limit (pytest-timeout; the signal method fails the test and still runs fixture teardown,
# so no server is orphaned), and pytest-xdist workers only when it is installed
TEST_TIMEOUT ?= 120
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
BENCH_ARGS ?=
# mypy --strict on everything (CONVENTIONS.md): every package, the tests, scripts and benchmarks
MYPY_PATHS ?= proto/src sdk/src $(wildcard services/*/src) tests scripts bench examples

COMPOSE ?= docker compose
DUANFLOW_HOME ?= $(HOME)/.duanflow
COMPOSE_ENV ?= $(DUANFLOW_HOME)/compose.env

HELLO := examples/hello.py
HELLO_TEXT := 我的模型接口超时了

.PHONY: help install dev dev-down down-dev test test-unit lint schemas nats-conf docs bench up down

help: ## list the targets
	@echo "DuanFlow make targets:"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Variables: PYTHON=$(PYTHON) TEST_TIMEOUT=$(TEST_TIMEOUT) PYTEST_ARGS='$(PYTEST_ARGS)' BENCH_ARGS='$(BENCH_ARGS)'"

$(SYNCED): $(MANIFESTS) scripts/install.sh
	PYTHON=$(PYTHON) scripts/install.sh
	@touch $@

install: ## create .venv with every package and the dev tools (uv sync --frozen; installs uv if missing)
	@rm -f $(SYNCED)
	@$(MAKE) $(SYNCED)

dev: $(SYNCED) ## start the local stack, deploy examples/hello.py and call it
	@$(BIN)/duanflow dev status >/dev/null 2>&1 || $(BIN)/duanflow dev up --detach
	$(BIN)/duanflow deploy $(HELLO)
	$(BIN)/duanflow run $(HELLO)::classify_ticket --text "$(HELLO_TEXT)"
	@echo
	@echo "The local stack keeps running. Stop it with: make dev-down  (or: $(BIN)/duanflow dev down)"

dev-down: ## stop the local stack that `make dev` started
	@if [ -x $(BIN)/duanflow ]; then $(BIN)/duanflow dev down; else echo "no .venv: nothing was started"; fi

down-dev: dev-down

test: $(SYNCED) ## unit, integration and e2e tests (real NATS, Postgres and S3 on free loopback ports)
	@PYTHON=$(PYTHON) scripts/install.sh --docker
	@workers=""; if $(BIN)/python -c 'import xdist' 2>/dev/null; then workers="-n $(TEST_WORKERS)"; fi; \
	set -x; $(BIN)/pytest tests -p no:cacheprovider --timeout=$(TEST_TIMEOUT) -q -ra --durations=10 \
		$$workers $(PYTEST_ARGS)

test-unit: $(SYNCED) ## unit tests only (no I/O, seconds)
	$(BIN)/pytest tests/unit -p no:cacheprovider --timeout=$(TEST_TIMEOUT) -q $(PYTEST_ARGS)

lint: $(SYNCED) ## ruff, ruff format --check, mypy --strict; fails on a stale lock, schema, NATS config or doc
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(MYPY_PATHS)
	PYTHON=$(PYTHON) scripts/install.sh --check-lock
	$(BIN)/python scripts/schemas.py --check
	$(BIN)/python scripts/nats_conf.py --check
	$(BIN)/python scripts/arch_doc.py --check

schemas: $(SYNCED) ## write the JSON Schema of every wire message to proto/schemas/
	$(BIN)/python scripts/schemas.py

nats-conf: $(SYNCED) ## write docker/nats/nats.conf (per-role NATS users) from the local stack's permissions
	$(BIN)/python scripts/nats_conf.py

docs: $(SYNCED) ## regenerate the generated sections of docs/ARCHITECTURE.md (NATS layout, roles)
	$(BIN)/python scripts/arch_doc.py

BENCHES ?= remote_latency map_throughput cold_start router_sim gateway logs queue durability queue_durability

# the peers (Ray, Celery with Debian's redis-server) come with `scripts/install.sh --peers`; one that cannot be
# installed is skipped by the benches with a JSON line saying why
bench: $(SYNCED) ## every benchmark (BENCHES=...), each printing JSON lines with its floor and peers measured in the same run
	@PYTHON=$(PYTHON) scripts/install.sh --peers >&2 || echo "warning: the peers could not be installed" >&2
	@for b in $(BENCHES); do echo "== bench/$$b.py" >&2; $(BIN)/python bench/$$b.py $(BENCH_ARGS); done

up: ## start the docker-compose stack (writes ~/.duanflow/compose.env with fresh secrets once)
	@command -v docker >/dev/null || { echo "make up needs docker with the compose plugin" >&2; exit 1; }
	$(PYTHON) scripts/compose_env.py $(COMPOSE_ENV)
	$(COMPOSE) --env-file $(COMPOSE_ENV) up -d --build
	@$(COMPOSE) --env-file $(COMPOSE_ENV) ps
	@echo "Point the SDK and CLI at it with:"
	@$(PYTHON) scripts/compose_env.py --client $(COMPOSE_ENV)

down: ## stop the docker-compose stack (volumes are kept; `docker compose down -v` drops them)
	@command -v docker >/dev/null || { echo "make down needs docker with the compose plugin" >&2; exit 1; }
	@$(PYTHON) scripts/compose_env.py $(COMPOSE_ENV)
	$(COMPOSE) --env-file $(COMPOSE_ENV) down
