# `make demo` installs fedtrust into .venv and runs the default simulation;
# `make test` installs it (with the test tools) and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/fedtrust: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[all,dev]"
	touch $@

install: $(BIN)/fedtrust

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/fedtrust simulate

test: install
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests/test_layers.py  # import-linter contract, house rules

.PHONY: install demo test lint
