# Two entry points a new user needs: `make demo` and `make test`. Both install what they need
# (idempotently) into .venv: torch first, pinned to the CPU build, so pip never pulls CUDA wheels.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install browser demo test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/sfumato generate "a red star above a blue circle under a night sky" --seed 1 --out outputs/

# The web page is tested in a real headless Chromium (Debian's packages; needs root or sudo once).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ( $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -q && \
	    $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q chromium chromium-driver )

# Two processes (pytest-xdist) with one torch thread each: tiny models gain nothing from threads.
test: install browser
	$(BIN)/ruff check src tests
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2

lint: install
	$(BIN)/ruff check src tests
