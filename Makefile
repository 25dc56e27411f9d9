# The two commands a newcomer runs: `make demo` and `make test`. Each creates .venv with pip when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fxforge-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[onnx,tvm,vision,nlp,tune,dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/python -m fxforge.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py
