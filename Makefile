# Two commands on a fresh machine: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Datasets for the tests that use the full copies; tests skip those when it is unset.
export IMGCLS_DATA ?= $(wildcard $(abspath ../shared/datasets))

.PHONY: run test test-slow lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch and torchvision are pinned in pyproject.toml (torch==2.14.1, torchvision==0.29.1).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# A CNN against a ViT on the bundled sample, then the HTML report; rerunning reuses finished runs.
run: $(STAMP)
	$(BIN)/imgcls compare experiments/quickstart.yaml --out runs/quickstart
	$(BIN)/imgcls report runs/quickstart

lint: $(STAMP)
	$(BIN)/ruff check $(wildcard src tests bench scripts)

# Two workers (a file stays on one, so its module fixtures are built once), one torch thread each: on a
# 2-core machine this beats one process with two threads, whose small ops do not split well.
test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

# The longer fuzz, kill and OOD soaks (marked slow); CI runs them after `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
