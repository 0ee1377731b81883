# Two commands for a fresh machine: `make quickstart` and `make test`.
# torch is installed first from a pin so that pip never resolves an unpinned
# (multi-GB CUDA) build; override it: make test TORCH="torch==2.6.0"
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip

.PHONY: install install-dev test quickstart clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	touch $@

# lmlab and what the main job needs
$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e .
	touch $@

# plus transformers, datatrove, ray, pytest, ... for the tests
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

test: install-dev
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

# ARGS="--minutes 5 --out runs/mine" to change the budget or the output directory
quickstart: install
	$(VENV)/bin/lmlab quickstart $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
