# A newcomer needs two commands: `make serve` (install and start the service on its embedded defaults)
# and `make test` (install everything and run the test suite). The other targets are steps they use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# torch is pinned exactly on every install step: a range or an unpinned dependent pulls a CUDA build (GBs).
CONSTRAINTS := -c constraints.txt
PORT ?= 3000
DEPS := pyproject.toml requirements/serve.txt constraints.txt

.PHONY: serve test install-serve install-dev synth models lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.serve-installed: $(BIN)/python $(DEPS)
	$(PIP) install -q $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.dev-installed: $(BIN)/python $(DEPS)
	$(PIP) install -q $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q $(CONSTRAINTS) -e ".[train,dev]"
	touch $@ $(VENV)/.serve-installed

install-serve: $(VENV)/.serve-installed
install-dev: $(VENV)/.dev-installed

# Loopback only: this machine's user (or a reverse proxy on it). Another address needs a token (or
# PTX_ALLOW_ANONYMOUS=true): `PTX_API_TOKEN_FILE=... make serve HOST=0.0.0.0` (docs/security.md, "Exposure").
HOST ?= 127.0.0.1
serve: $(VENV)/.serve-installed
	$(BIN)/bentoml serve --host $(HOST) --port $(PORT)

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest

# 200 synthetic SIIM-format radiographs into data/synth (see `python -m training synth --help`).
synth: $(VENV)/.dev-installed
	$(BIN)/python -m training synth --out data/synth --count 200 --seed 1

# The bundled demo models: synthetic data, training, export and evaluation (< 30 min on 2 CPU cores).
models: $(VENV)/.dev-installed
	$(BIN)/python -m training demo

# The image's exact versions (bentofile.yaml installs requirements/serve.lock.txt): run after editing serve.txt.
lock: $(BIN)/python
	$(BIN)/python requirements/lock.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
