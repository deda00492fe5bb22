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

.PHONY: demo drill science test test-slow env ui mlflow-ui screenshots

env:
	@bash scripts/bootstrap.sh
	@mkdir -p "$(DAGSTER_HOME)" "$(TORCH_EXTENSIONS_DIR)"
	@[ -f "$(DAGSTER_HOME)/dagster.yaml" ] || cp orchestration/dagster.yaml "$(DAGSTER_HOME)/dagster.yaml"
	@grep -q '^concurrency:' "$(DAGSTER_HOME)/dagster.yaml" || sed -n '/^concurrency:/,$$p' orchestration/dagster.yaml >> "$(DAGSTER_HOME)/dagster.yaml"
	@# Data Docs web assets from the npm registry (pinned, sha512-checked), so gfm validate's pages work offline
	@$(VENV)/bin/python scripts/vendor_data_docs.py || echo "[data docs] could not vendor the web assets: Data Docs will load them from CDNs" >&2

## Run the whole pipeline end to end on the embedded demo data: every Dagster asset, into $(DAGSTER_HOME).
demo: env
	$(VENV)/bin/python -m orchestration.materialize

## The teacher upgrade drill, after `make demo`: release a newer ImageNet teacher (TEACHER=lite1|lite2) into
## retrain.teacher_dir, tick new_teacher_sensor once, run the retrain it asks for, then fine-tuning and the gate.
TEACHER ?= lite2
drill: env
	$(VENV)/bin/gfm release-teacher $(TEACHER)
	$(VENV)/bin/python -m orchestration.drill

## The paper's claims tested at small scale on real data (55 min on 2 cores): outputs/science/report.md
science: env
	$(VENV)/bin/gfm demo-data
	$(VENV)/bin/gfm science --preset science

## Run the default test suite (slow and GPU tests are opt-in: make test PYTEST_ARGS="-m slow").
test: env
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-slow: env
	$(VENV)/bin/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

## The Dagster UI on 127.0.0.1:3000 (shows the runs of `make demo`).
ui: env
	$(VENV)/bin/dagster dev -h 127.0.0.1 -p 3000  # code location: pyproject [tool.dagster]

## The MLflow UI on 127.0.0.1:5000 over the default store.
mlflow-ui: env
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///outputs/mlflow/mlflow.db -h 127.0.0.1 -p 5000 --workers 1

## Headless Chromium screenshots of both UIs into outputs/screenshots (installs Debian's chromium).
screenshots: env
	bash scripts/screenshot_ui.sh
