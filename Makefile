# convnet-serving. Every target installs what it needs into .venv from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 3000
export BENTOML_DO_NOT_TRACK := true
export ORT_DISABLE_TELEMETRY := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup models serve test lint train-lenet clean help

help:
	@echo "make serve        build the default models if missing and serve them on 127.0.0.1:$(PORT)"
	@echo "make test         run the whole test suite (what CI runs)"
	@echo "make models       build models/ (LeNet-5 is shipped; AlexNet's ONNX is built here)"
	@echo "make train-lenet  train LeNet-5 on MNIST (MNIST_DIR=...) and export it to models/lenet5"
	@echo "make lint         ruff"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade "pip>=25.1"
	$(VENV)/bin/pip install -q -e . --group training --group load --group dev
	touch $@

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
