# Two commands: `make demo` (the main job) and `make test`. Both (re)build .venv from
# pyproject.toml when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint info bench-gpu clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "attnlab needs Python >= 3.11"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/attnlab demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

lint: $(STAMP)
	$(BIN)/ruff check .

info: $(STAMP)
	$(BIN)/attnlab info

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
