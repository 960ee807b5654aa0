# Two entry points for a fresh machine (Python 3.11, as in requirements.lock, with venv):
#   make demo   install everything into .venv, run the main job: a schedule search on the demo
#               corpus (local Ray, local outputs/)
#   make test   install everything into .venv (and Chromium, PostgreSQL and rsync for the tests that
#               use them), lint, run the test suite
#   make ui     the MLflow UI over outputs/ on http://127.0.0.1:5000
# torch is installed first and on its own so that pip keeps the build you ask for
# (TORCH=torch==2.13.0 is the CPU build on our dev machines; pass e.g. TORCH=torch for CUDA).
# The rest is installed at the versions in requirements.lock (`make lock` refreshes it).

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install lock demo test lint browser postgres rsync ui clean

# One line per install step; pip's output goes to $(INSTALL_LOG), whose end is shown when a
# step fails.
INSTALL_LOG := $(VENV)/install.log
step = @echo "$(1)"; { $(2); } >>$(INSTALL_LOG) 2>&1 || \
  { tail -n 25 $(INSTALL_LOG); echo "make: failed: $(1) (the whole log: $(INSTALL_LOG))"; exit 1; }

$(VENV)/.installed: pyproject.toml requirements.lock
	@mkdir -p $(VENV) && : >$(INSTALL_LOG)
	$(call step,install 1/4: a virtual environment in $(VENV),$(PYTHON) -m venv $(VENV))
	$(call step,install 2/4: pip,$(PY) -m pip install --upgrade pip)
	$(call step,install 3/4: $(TORCH) on its own,$(PY) -m pip install "$(TORCH)")
	$(call step,install 4/4: apollo_ray and the versions in requirements.lock,\
	  $(PY) -m pip install -c requirements.lock -e ".[dev]")
	@touch $@

install: $(VENV)/.installed

# requirements.lock: the exact versions the test suite passed with, for Python 3.11 on Linux
# x86_64 (the cluster nodes' aws and gcp extras too), torch and its own dependencies left out
# (`--excludes`; PyPI's torch brings CUDA wheels).
# Keeps each locked version that pyproject.toml still allows (delete the file to take the newest).
# Needs no install, so it also runs after a lower bound in pyproject.toml was raised past the lock.
LOCK_PYTHON := 3.11

lock: $(VENV)/bin/uv
	echo torch | $(VENV)/bin/uv pip compile -q pyproject.toml --extra dev --extra demo --extra aws \
	  --extra gcp --excludes - --python-version $(LOCK_PYTHON) \
	  --python-platform x86_64-unknown-linux-gnu \
	  --custom-compile-command "make lock" -o requirements.lock
	sed -i -e '1i # Versions the test suite passed with, for Python $(LOCK_PYTHON) on Linux x86_64.' \
	  -e '1i # torch is left out: make installs it first, on its own.' requirements.lock

$(VENV)/bin/uv:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv

demo: $(VENV)/.installed
	$(PY) -m apollo_ray.tune search_spaces/small.yaml --resume

# ruff, and the package's layers (pyproject.toml's import-linter contracts)
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# Debian's Chromium + ChromeDriver for the MLflow UI browser test (skipped without them, except
# in CI, where .ci/run sets CI=true and a missing browser fails the test).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "chromium not installed: the MLflow UI browser test will be skipped"

# Debian's PostgreSQL server for the MLflow-on-PostgreSQL test, which starts a throwaway one
# on 127.0.0.1 (skipped without it, except in CI, where a missing server fails the test).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $(SUDO) apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "postgresql not installed: the MLflow-on-PostgreSQL test will be skipped"

# rsync, for the dry run of the cluster files' filters (tests/launch/test_cluster_commands.py)
rsync:
	@command -v rsync >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $(SUDO) apt-get install -y -qq rsync >/dev/null; } || \
	  echo "rsync not installed: the cluster files' rsync dry run will be skipped"

test: lint browser postgres rsync
	$(VENV)/bin/pytest -n 2

ui: $(VENV)/.installed
	$(PY) -m apollo_ray.ui

clean:
	rm -rf $(VENV) runs data outputs
