# SensorFleet — every entry point a contributor or CI needs.
# `make test` is the test command (CI calls it); `make run` runs the example fleet.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test run bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

test: install
	$(BIN)/pytest

run: install
	$(BIN)/sensorfleet run examples/fleet.yaml

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info
