# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test quick bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/ipasdctl train --recipe demo

# the whole suite, with its 15 slowest tests listed at the end (CI runs this)
test: $(VENV)/.installed-test
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --durations=15 tests

# the edit-test loop: the suite without the tests marked slow
quick: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(VENV)/.installed-test
	$(BIN)/python -m pytest benchmarks --benchmark-only -s

clean:
	rm -rf $(VENV) runs comparisons .pytest_cache
