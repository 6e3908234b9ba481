# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The installed marker is rebuilt when pyproject.toml changes.
STAMP_DEMO := $(VENV)/.installed-demo
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: demo test test-light install clean benchmarks

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP_DEMO): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[full,demo]"
	touch $@

$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[full,dev]"
	touch $@ $(STAMP_DEMO)

install: $(STAMP_DEMO)

demo: $(STAMP_DEMO)
	$(BIN)/fewvision demo

test: $(STAMP_DEV)
	bash .ci/system-deps.sh
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 -m "not light"

# The light install (no torch) in a fresh environment, running the packed-model commands; CI runs it after test.
test-light: $(STAMP_DEV)
	bash .ci/light.sh

benchmarks: $(STAMP_DEV)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
