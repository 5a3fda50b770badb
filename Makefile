# Comptoir: `make run` starts everything on the embedded database; `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run migrate test lint pytest format lock bench bench-gateway bench-catalogue bench-orders bench-audit bench-login bench-guessing audit-deps fuzz docs up clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/comptoir run

migrate: install
	$(BIN)/comptoir migrate

test: install
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/bandit -q -r common comptoir gateway services -x '*/migrations/versions/*' --severity-level high
	$(BIN)/vulture

# Known vulnerabilities in the locked dependencies. Needs PyPI's JSON API (or OSV), which the
# development machine this was built on cannot reach; run it in CI that can.
audit-deps: install
	$(BIN)/pip-audit -r requirements.lock --strict --progress-spinner off

pytest: install
	$(BIN)/pytest

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Re-pin every dependency (run after changing pyproject.toml, commit the result).
lock:
	rm -rf /tmp/comptoir-lock && $(PYTHON) -m venv /tmp/comptoir-lock
	/tmp/comptoir-lock/bin/pip install --quiet --upgrade pip
	/tmp/comptoir-lock/bin/pip install --quiet -e '.[dev]'
	/tmp/comptoir-lock/bin/pip freeze --exclude-editable | grep -v '^comptoir' > requirements.lock

# A long fuzzing run: every phase (stateful too) for every role (make test runs 3 examples per operation).
fuzz: install
	FUZZ_LONG=1 FUZZ_MAX_EXAMPLES=$${FUZZ_MAX_EXAMPLES:-200} $(BIN)/pytest tests/e2e/test_fuzz.py -v

# The API reference, generated from the public OpenAPI document (a test fails when it is stale).
docs: install
	$(BIN)/comptoir openapi --markdown --output docs/api.md

# Benchmarks print a table; they are never part of `make test`.
# `make bench` runs them all, then prints one table: every goal, its measured figure, met or not.
BENCH_RESULTS ?= $(CURDIR)/.bench-results.jsonl
export BENCH_RESULTS

bench: install
	rm -f $(BENCH_RESULTS)
	-$(MAKE) --no-print-directory -k bench-gateway bench-catalogue bench-orders bench-audit bench-login bench-guessing
	$(BIN)/python -m bench.results $(BENCH_RESULTS)

bench-gateway: install
	$(BIN)/python -m bench.gateway

bench-catalogue: install
	$(BIN)/python -m bench.catalogue

bench-orders: install
	$(BIN)/python -m bench.orders

bench-audit: install
	$(BIN)/python -m bench.audit

bench-login: install
	$(BIN)/python -m bench.login

# Distributed password guessing against one account (an hour of injected clock, embedded PostgreSQL).
bench-guessing: install
	$(BIN)/python -m bench.login_guessing

up:
	docker compose up --build

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
