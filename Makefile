# The two set-up commands of README.md:
#   make demo   venv + install, synthetic demo data, a tracked smoke training run, registered model
#   make test   venv + install, ruff check and format check, the test suite (make test-fast: in-process, quick tests only)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= data/demo

.PHONY: demo test test-fast lint format install install-dev ui docs clean-demo

# The demo and the UI need the package alone; the tests also need its test, team, docs and slides extras.
install: $(VENV)/.installed $(VENV)/.mlflow-env
install-dev: $(VENV)/.installed-dev $(VENV)/.mlflow-env

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e .
	touch $@

# `mlflow run . -e ENTRY` then runs in this venv as typed: MLflow has no setting for a default env manager.
$(VENV)/.mlflow-env: python_env.yaml $(VENV)/.installed
	$(BIN)/python -m detection.mlflow_env
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -e '.[test,team,docs,slides]'
	touch $@

$(DEMO)/images:
	$(BIN)/python -m detection synth $(DEMO) --images 16 --seed 0

demo: install $(DEMO)/images
	@echo "Training the smoke model on $(DEMO): 5 epochs, each 8 training steps then 20 validation patches"
	@echo "(the line after each epoch gives its validation detection rate and FDR). About 3 minutes on"
	@echo "2 CPU cores after the install; the first install of torch adds about 4."
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mlflow run . -e train --experiment-name brecahad \
		-P config=experiments/smoke.yaml -P data_dir=$(DEMO)
	@echo
	@echo "Done: the run is in the experiment 'brecahad', its model registered as brecahad-faster-rcnn@challenger."
	@echo "See it in the MLflow UI with: make ui   (it prints the URL of the runs table)"

# CI runs this: lint and format check first (a second), then the whole suite on two pytest-xdist
# workers, a module each at a time, one torch thread each: 28.8 minutes on 2 cores against 40.0 in
# one process (`make test WORKERS=0`), because many tests wait on servers, processes and clocks.
WORKERS ?= 2
test: install-dev lint
	$(BIN)/python -m pytest -n $(WORKERS) --dist loadfile

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Fix what ruff can: import order, formatting.
format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The developers' loop: no test that trains, serves, races real processes or starts the CLI (a fresh interpreter).
test-fast: install-dev
	$(BIN)/python -m pytest -m "not slow and not subprocess"

ui: install
	$(BIN)/python -m detection ui

# The docs site in build/site (tests/test_docs.py builds it too); parameters.md is generated.
docs: install-dev
	$(BIN)/python docs/gen_parameters.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean-demo:
	rm -rf $(DEMO) mlflow.db mlruns/[0-9]* mlruns/models
