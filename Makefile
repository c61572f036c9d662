# Two commands for a fresh machine with Python 3.11:  make run  and  make test.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Runs must never reach the network: models load from installed packages only.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
# Stage commands in dvc.yaml call `python`: the one of this virtual environment.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test lint lock clean-data

install: $(STAMP)

# Recreated whenever the pinned set or the project metadata changes.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

# ruff, configured in pyproject.toml: lint rules and the formatter's check (`ruff format .` fixes the latter)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Refresh the pinned set from pyproject.toml's ranges (needs the package index).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e '.[test]'
	( echo '# Pinned, known-good set installed by `make install` (pip install -r requirements.lock).'; \
	  echo '# Regenerate with `make lock` after changing dependencies in pyproject.toml.'; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' ) > requirements.lock
	rm -rf .lock-venv

clean-data:
	rm -rf data/demo data/ingest
