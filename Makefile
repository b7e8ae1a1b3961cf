# chronorisk: `make demo` sets everything up and runs the whole chain;
# `make test` sets everything up and runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
WORK ?= $(CURDIR)/work

# Health data: every tool's telemetry off, every tool's state in the work folder.
export CHRONORISK_WORK := $(WORK)
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export FLWR_TELEMETRY_ENABLED := 0
export BENTOML_DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export BENTOML_HOME := $(WORK)/bentoml
export FLWR_HOME := $(WORK)/flwr
export DVC_SITE_CACHE_DIR := $(WORK)/dvc-site-cache
export MPLCONFIGDIR := $(WORK)/matplotlib
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
# Cache compiled bytecode: without it every process (each CLI call, each test subprocess) recompiles
# mlflow, evidently and the rest on import, seconds each time.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup browser-deps mqtt-deps demo repro test test-fast lint bench clean distclean

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

$(VENV)/.installed: requirements.lock pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip sync --quiet --compile-bytecode --python $(BIN)/python requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup mqtt-deps
	$(BIN)/chronorisk demo

# The DVC pipeline (dvc.yaml): generate, ingest, features, train, evaluate; the stages call `chronorisk`.
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Debian packages some tests need (headless Chromium for the browser tests).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing: run 'sudo apt-get install chromium' (browser tests will fail)"; fi; }

# The Mosquitto broker: the device-stream tests, benchmark and demo start private instances of it.
mqtt-deps:
	@{ command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	  else echo "mosquitto missing: run 'sudo apt-get install mosquitto' (device-stream tests will fail)"; fi; }

test: setup browser-deps mqtt-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser and not deployment" $(PYTEST_ARGS)

# ruff's linter is the style gate (line length 120, isort); the code is not laid out by `ruff format`.
lint: setup
	$(BIN)/ruff check .

# Every benchmark, one after another (BENCH_ARGS=--quick for small sizes); JSON in benchmarks/results/.
bench: setup
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

# Regenerate the lock file after changing pyproject.toml.
lock: | $(BIN)/uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 --generate-hashes -q -o requirements.lock

clean:
	rm -rf $(WORK)

distclean: clean
	rm -rf $(VENV)
