# gptlib workbook: `make run` runs the whole workbook, `make test` runs the tests.
# Both create the virtual environment in .venv when it is missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

# On CPU-only machines whose pip finds a local CPU build of torch 2.13.0 (these workbook machines), use it:
# a plain `torch` requirement would download a multi-GB CUDA build. Elsewhere, take the normal torch.
# Override with `make TORCH_SPEC=torch==2.5.1 ...`.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
TORCH_SPEC ?= $(if $(wildcard $(FIND_LINKS)/torch-2.13.0+cpu-*.whl),torch==2.13.0,torch)

.PHONY: help install data run test test-unit test-notebooks lab clean

help:
	@echo "make run    set up, prepare data, run the notebooks end to end (full sizes)"
	@echo "make test   set up, prepare data, run unit tests and the notebooks in fast mode (nbval)"
	@echo "make lab    open JupyterLab on the notebooks"
	@echo "make data   only prepare the data in dataset/"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[notebooks,dev,hf,serve]"
	@$(PY) -c "import torch, gptlib; print('installed gptlib with torch', torch.__version__)"
	@touch $@

data: install
	$(PY) scripts/prepare_data.py

run: data
	$(PY) scripts/run_workbook.py

test: data
	$(MAKE) test-unit test-notebooks

test-unit: install
	$(PY) -m pytest -q tests

test-notebooks: install
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
		WORKBOOK_FAST=1 $(PY) -m pytest -q --nbval-lax -p no:cacheprovider notebooks; \
	else echo "no notebooks yet"; fi

lab: install
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf $(VENV) .pytest_cache
