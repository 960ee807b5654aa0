# Two entry points for a fresh machine (Python 3.10+ with venv):
#   make demo   install everything into .venv, run the main job: a schedule search on the demo
#               corpus (local Ray, local outputs/)
#   make test   install everything into .venv, lint, run the test suite
# torch is installed first and on its own so that pip keeps the build you ask for
# (TORCH=torch==2.13.0 is the CPU build on our dev machines; pass e.g. TORCH=torch for CUDA).

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m apollo_ray.tune search_spaces/small.yaml --resume

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) runs data outputs
