# Two entry points for a fresh machine (Python 3.10+ with venv):
#   make demo   install everything into .venv, prepare the demo corpus, run the main job
#   make test   install everything into .venv, lint, run the test suite
# torch is installed first and on its own so that pip keeps the build you ask for
# (TORCH=torch==2.13.0 is the CPU build on our dev machines; pass e.g. TORCH=torch for CUDA).

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo-bert

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(DEMO_DATA)/manifest.json: | $(VENV)/.installed
	$(PY) -m apollo_ray.data prepare demo --kind bert --out $(DEMO_DATA) --vocab-size 8192 --val-fraction 0.05

demo: $(VENV)/.installed $(DEMO_DATA)/manifest.json
	$(PY) -m apollo_ray.train configs/bert-tiny.yaml

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) runs data
