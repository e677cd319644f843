# Two entry points (README): `make demo` and `make test`. Both are idempotent and reuse
# the caches under ~/.cache/first-gguf (patched wheel, sdist, assembled models).
# `make aarch64-check` proves the Raspberry Pi build (examples/raspberry-pi/README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test aarch64-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The patched llama-cpp-python must be installed before this package: its pin
# (llama-cpp-python==0.3.36) is then satisfied instead of building the stock sdist.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m first_gguf.build
	$(BIN)/python -m pip install --quiet -e '.[train,test,eval,server]'
	touch $@

setup: $(VENV)/.installed
	$(BIN)/python -m first_gguf.build

demo: setup
	$(BIN)/first-gguf demo

test: setup
	$(BIN)/python -m pytest -q

# The Raspberry Pi (aarch64) build, proven here: cross-compiles the patched library for a
# Cortex-A76 (cached), installs Debian's cross toolchain and qemu-user with apt-get when
# missing (as root), runs our driver under qemu-user and on this machine, prints the figures.
aarch64-check: setup
	$(BIN)/python -m pytest -q -s tests/test_aarch64.py
