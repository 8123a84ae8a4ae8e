# Quick start:  make audit   (set up .venv, run the safety audit)
#               make test    (set up .venv with the test tools, run the test suite)
# GPU users: make audit TORCH=torch  (or install your own torch build into .venv first).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: audit audit-quick test setup setup-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# what the audit runs on: torch and safetylab. --no-compile: Python compiles the modules it imports when it
# first imports them, instead of pip compiling every file of every package (half of the set-up's time)
PIP := $(BIN)/python -m pip install --quiet --no-compile

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	touch $@

# and the tests' tools (pytest, the peers the tests compare with, inspect-ai to read eval logs, …)
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

audit: setup
	$(BIN)/safetylab audit

audit-quick: setup
	$(BIN)/safetylab audit --quick

test: setup-dev
	$(BIN)/python -m pytest -n 2

clean:
	rm -rf $(VENV) runs
