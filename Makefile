# The two commands of the README: `make demo` (install, then train the bundled demo) and `make test`.
#
# They use the active virtual environment when there is one, else the project's own `.venv`, created on first use
# with the system's `python3` (Debian and Ubuntu refuse `pip install` outside a virtual environment: PEP 668).
# torch is named with its version so that pip takes the CPU build instead of resolving a multi-GB CUDA build; on a GPU
# machine install the torch build for your CUDA first and run `make install TORCH=torch`.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,onnx,lora
ifdef VIRTUAL_ENV
PYTHON ?= python
STAMP := $(VIRTUAL_ENV)/.clip-trainer-installed
else
PYTHON ?= .venv/bin/python
STAMP := .venv/.clip-trainer-installed
NEW_VENV := .venv/bin/python
endif

.PHONY: install demo test test-slow test-all lint

.venv/bin/python:
	@python3 -m venv .venv || { echo "make: python3 cannot create a virtual environment; on Debian/Ubuntu: sudo apt install python3-venv" >&2; exit 1; }

# Installed again only when pyproject.toml changes.
$(STAMP): pyproject.toml | $(NEW_VENV)
	$(PYTHON) -m pip install --disable-pip-version-check $(TORCH) -e ".[$(EXTRAS)]"
	@touch $@

install: $(STAMP)

demo: install
	$(PYTHON) run_clip.py configs/demo.json --overwrite_output_dir true

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest

test-slow: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -m slow

test-all: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -m "slow or not slow"

lint: install
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .
