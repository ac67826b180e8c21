# tokenwire: `make run` starts the service on the bundled model; `make test` checks everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BUF_VERSION := 1.75.0
BUF := npx --yes @bufbuild/buf@$(BUF_VERSION)
HOST ?= 127.0.0.1
PORT ?= 50051
HTTP_PORT ?= 8000

.PHONY: install system-deps bench bench-env bench-quick run test lint typecheck imports proto proto-lint pytest model fixtures clean help

help:
	@echo "make run    - install (first time) and start the server on the bundled model"
	@echo "make test   - install (first time) and run lint, types, contracts and tests"
	@echo "make proto  - regenerate Python stubs from protos/"
	@echo "make model  - rebuild the bundled model (separate build env with torch)"
	@echo "make bench  - benchmark against the plain ORT loop and ORT GenAI (docs/benchmarks.md)"

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	@echo "starting tokenwire (gRPC $(HOST):$(PORT), HTTP $(HOST):$(HTTP_PORT)) on models/tiny-py ..."
	$(BIN)/tokenwire up --host $(HOST) --grpc-port $(PORT) --http-port $(HTTP_PORT)

test: install system-deps lint typecheck imports proto-lint pytest

# Headless Chromium for the browser-page tests (Debian package; CI runs as root).
system-deps:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

lint: install
	$(BIN)/ruff check service clients tokenwire_cli tests scripts
	$(BIN)/ruff format --check service clients tokenwire_cli tests scripts

typecheck: install
	$(BIN)/mypy

imports: install
	$(BIN)/lint-imports

proto-lint:
	cd protos && $(BUF) lint

pytest: install
	$(BIN)/pytest

proto: install
	$(BIN)/python scripts/gen_proto.py

# Benchmarks: a separate environment (torch, transformers, onnxruntime + onnxruntime-genai),
# because onnxruntime and onnxruntime-gpu must not share one.
BENCH_PY := bench/.venv/bin/python
BENCH_STAMP := bench/.venv/.installed-stamp

$(BENCH_STAMP): bench/requirements.txt
	$(PY) -m venv bench/.venv
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q -r bench/requirements.txt
	touch $(BENCH_STAMP)

bench-env: $(BENCH_STAMP)

bench: install bench-env
	$(BENCH_PY) bench/build_models.py bench-56m
	$(BIN)/python bench/run.py
	$(BENCH_PY) bench/report.py

bench-quick: install bench-env
	$(BENCH_PY) bench/build_models.py bench-56m
	$(BIN)/python bench/run.py --quick
	$(BENCH_PY) bench/report.py

model:
	$(PY) -m venv models/.venv
	models/.venv/bin/python -m pip install -q -r models/requirements-build.txt
	models/.venv/bin/python models/build_tiny.py --out models/tiny-py

fixtures:
	$(PY) -m venv models/.venv-fixtures
	models/.venv-fixtures/bin/python -m pip install -q -r models/requirements-fixtures.txt
	models/.venv-fixtures/bin/python models/build_fixtures.py --out models/fixtures

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
