# Two commands: `make demo` (the main job) and `make test` (`make test-all` for CI);
# `make docs` builds the API reference. All (re)build .venv from pyproject.toml when it is
# missing or older than it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-all docs lint info bench-gpu clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "attnlab needs Python >= 3.11"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/attnlab demo

# `make test`: everything but the `slow`-marked tests (the developer's loop, under 20 minutes
# on 2 cores); `make test-all`: all of them (what CI runs).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --durations=15 -m "not slow" tests

test-all: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

# The API reference from the docstrings (Sphinx autodoc + napoleon): nitpicky, warnings as
# errors, as tests/test_docs.py builds it. Opens at docs/_build/html/index.html.
docs: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m sphinx -W --keep-going -n -j 1 -b html docs docs/_build/html

lint: $(STAMP)
	$(BIN)/ruff check .

info: $(STAMP)
	$(BIN)/attnlab info

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis docs/_build
