# The two commands of the README: `make demo` (install + train the bundled demo) and `make test`.
PYTHON ?= python
TORCH ?= torch==2.13.0

.PHONY: install demo test test-slow test-all lint

install:
	$(PYTHON) -m pip install $(TORCH) -e ".[dev]"

demo: install
	$(PYTHON) run_clip.py configs/demo.json

test:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest

test-slow:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -m slow

test-all:
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -m "slow or not slow"

lint:
	ruff check . && ruff format --check .
