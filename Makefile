# attnserve: one command serves, one command tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
TORCH_VERSION ?= 2.13.0

.PHONY: setup serve test lint bench train-shakespeare train-multi30k docker-build docker-run clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[dev,train]"
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(BIN)/python -m service --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check model service tests benchmarks
	$(BIN)/mypy model service

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
