# Build and test plumbing. `make test` is what CI runs (through .ci/run) on a clean checkout.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# Touched after a successful install; the venv is re-installed only when pyproject.toml is newer.
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup setup-system setup-python run test bench

setup: setup-system setup-python

setup-system:
	@bash scripts/setup-system.sh

setup-python: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -e '.[all,test]'
	@touch $@

run: setup-python
	$(VENV)/bin/container-exporter run $(ARGS)

# pytest exits 5 when it collects no test; that is not a failure of the build.
test: setup
	@rc=0; $(VENV)/bin/pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5); treating as success"; exit 0; fi; \
	exit $$rc

bench: setup-python
	$(VENV)/bin/python bench/collect.py $(ARGS)
