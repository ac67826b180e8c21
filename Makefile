# tokenwire: `make run` starts the service on the bundled model; `make test` checks everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
# Two distributions: the server (pyproject.toml) and tokenwire-client (clients/pyproject.toml),
# which the server depends on. Both are installed editable, so code changes need no re-install.
DISTS := pyproject.toml clients/pyproject.toml
INSTALL := $(BIN)/python -m pip install -q -e './clients[edge]'
# A venv made before the split holds a `tokenwire` that owns bin/tokenwire (now tokenwire-client's):
# replacing it after tokenwire-client is in would delete the command, so it goes first.
LEGACY := if [ -f $(VENV)/.installed-stamp ]; then \
	$(BIN)/python -m pip uninstall -q -y tokenwire && rm $(VENV)/.installed-stamp; fi
BUF_VERSION := 1.75.0
BUF := npx --yes @bufbuild/buf@$(BUF_VERSION)
# `make run HOST=0.0.0.0 PORT=... HTTP_PORT=... METRICS_PORT=...`; unset, `tokenwire up` reads
# TOKENWIRE_HOST, TOKENWIRE_PORT, TOKENWIRE_EDGE_PORT and TOKENWIRE_METRICS_PORT, then its
# defaults (common/defaults.py).
UP_FLAGS := $(if $(HOST),--host $(HOST)) $(if $(PORT),--grpc-port $(PORT)) $(if $(HTTP_PORT),--http-port $(HTTP_PORT)) $(if $(METRICS_PORT),--metrics-port $(METRICS_PORT))

.PHONY: install system-deps bench bench-env bench-quick run test lint typecheck imports proto proto-lint proto-breaking proto-baseline pytest model fixtures genai-fixtures clean help

help:
	@echo "make run    - install (runtime only, first time) and start the server and edge on the bundled model"
	@echo "make test   - add the test tools (first time) and run lint, types, contracts and tests"
	@echo "make proto  - regenerate Python stubs from protos/"
	@echo "make model  - rebuild the bundled model (separate build env with torch)"
	@echo "make fixtures, make genai-fixtures - rebuild the model-family test fixtures"
	@echo "make bench  - benchmark against the plain ORT loop and ORT GenAI (docs/benchmarks.md)"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# What `make run` needs: runtime dependencies only (no pytest, mypy or playwright).
$(RUN_STAMP): $(DISTS) | $(BIN)/python
	@$(LEGACY)
	$(INSTALL) -e .
	touch $@

# What `make test` needs: the same plus the test extras.
$(TEST_STAMP): $(DISTS) | $(BIN)/python
	@$(LEGACY)
	$(INSTALL) -e '.[test]'
	touch $@ $(RUN_STAMP)

install: $(TEST_STAMP)

run: $(RUN_STAMP)
	@echo "starting tokenwire on models/tiny-py ..."
	$(BIN)/tokenwire up $(UP_FLAGS)

test: install system-deps lint typecheck imports proto-lint proto-breaking pytest

# Debian packages the tests start (CI runs as root): headless Chromium for the browser-page
# tests, redis-server for the edge's shared resume store.
system-deps:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

lint: install
	$(BIN)/ruff check service clients common tests scripts bench models
	$(BIN)/ruff format --check service clients common tests scripts bench models

# mypy finds a module by its folder, and the folders keep their short names (service/ is
# tokenwire.server), so it reads the code through links named as the code is imported.
# Its messages name files under build/typecheck/tokenwire/{server,client,edge,v1}/.
TYPES := build/typecheck/tokenwire

typecheck: install
	mkdir -p $(TYPES)
	ln -sfn ../../../protos/tokenwire/v1 $(TYPES)/v1
	ln -sfn ../../../service $(TYPES)/server
	ln -sfn ../../../clients $(TYPES)/client
	ln -sfn ../../../clients/edge $(TYPES)/edge
	ln -sfn ../../../common $(TYPES)/common
	$(BIN)/mypy
	# bench/ scripts import their siblings (`peers`), so they are checked from inside bench/.
	cd bench && MYPYPATH=../build/typecheck ../$(BIN)/mypy --config-file ../pyproject.toml *.py
	# models/ build scripts import no siblings, so they are checked from the root.
	$(BIN)/mypy models/*.py

imports: install
	$(BIN)/lint-imports

proto-lint:
	cd protos && $(BUF) lint

# Wire compatibility with the last published contract (protos/baseline.binpb, a buf image):
# field numbers, names and types never change meaning. `make proto-baseline` moves it forward
# when a release is published.
proto-breaking:
	cd protos && $(BUF) breaking --against baseline.binpb

proto-baseline:
	cd protos && $(BUF) build -o baseline.binpb

# Tests that time things run alone; the CPU-bound ones marked `compute` then run one worker
# per core (pytest-xdist). `.venv/bin/pytest` alone runs every test in one process.
pytest: install
	$(BIN)/pytest -m "not compute"
	$(BIN)/pytest -m compute -n auto

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

# Tiny ONNX Runtime GenAI folders (fp32, int4) with GenAI's own greedy references.
genai-fixtures: bench-env
	$(BENCH_PY) models/build_genai_fixtures.py

model:
	$(PY) -m venv models/.venv
	models/.venv/bin/python -m pip install -q -r models/requirements-build.txt
	models/.venv/bin/python models/build_tiny.py --out models/tiny-py

fixtures:
	$(PY) -m venv models/.venv-fixtures
	models/.venv-fixtures/bin/python -m pip install -q -r models/requirements-fixtures.txt
	models/.venv-fixtures/bin/python models/build_fixtures.py --out models/fixtures
	models/.venv-fixtures/bin/python models/build_int8_fixture.py

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
