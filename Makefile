# The two commands the README starts with. Both create .venv on first use (scripts/bootstrap.sh).
SHELL := /bin/bash
VENV ?= .venv
ROOT := $(abspath .)
export TORCH_EXTENSIONS_DIR ?= $(ROOT)/.cache/torch_extensions
export DAGSTER_HOME ?= $(ROOT)/.dagster_home
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
PYTEST_ARGS ?=

.PHONY: demo test test-slow env

env:
	@bash scripts/bootstrap.sh
	@mkdir -p "$(DAGSTER_HOME)" "$(TORCH_EXTENSIONS_DIR)"
	@[ -f "$(DAGSTER_HOME)/dagster.yaml" ] || printf 'telemetry:\n  enabled: false\n' > "$(DAGSTER_HOME)/dagster.yaml"

## Run the whole pipeline end to end on the embedded demo data.
demo: env
	$(VENV)/bin/gfm demo

## Run the default test suite (slow and GPU tests are opt-in: make test PYTEST_ARGS="-m slow").
test: env
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-slow: env
	$(VENV)/bin/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)
