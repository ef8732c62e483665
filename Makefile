# `make up` runs scaletune on this machine; `make test` runs the test suite. Both install into .venv first;
# `make test` also starts PostgreSQL and Redis and installs Chromium + chromedriver when they are missing.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION := 2.13.0
# Re-installs only when pyproject.toml changes, so repeated `make up` / `make test` start at once.
INSTALLED := $(VENV)/.installed

.PHONY: install up test test-prerequisites

install: $(INSTALLED)

$(PY):
	python3 -m venv $(VENV)

# torch first and pinned, so the editable install finds it satisfied instead of resolving a build of its own.
$(INSTALLED): pyproject.toml | $(PY)
	$(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install -e '.[dev]'
	touch $@

up: $(INSTALLED)
	$(VENV)/bin/scaletune up

# PostgreSQL, Redis (started if not running) and Chromium + chromedriver (installed if missing).
test-prerequisites:
	bash scripts/test-prerequisites.sh

# Two test processes (pytest-xdist), one per core: most tests wait on subprocesses or run single-threaded;
# tests marked `alone` (a PostgreSQL restart) still run with nothing beside them (tests/conftest.py).
test: $(INSTALLED) test-prerequisites
	$(VENV)/bin/pytest -q -n 2 --dist worksteal
