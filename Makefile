# Two entry points a new user needs: `make demo` and `make test`. Both install what they need
# (idempotently) into .venv: torch first, pinned to the CPU build, so pip never pulls CUDA wheels.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/sfumato generate "a red star above a blue circle under a night sky" --seed 1 --out outputs/

test: install
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests
