# Two commands for a fresh machine: `make quickstart` and `make test`.
# torch is installed first from a pin so that pip never resolves an unpinned
# (multi-GB CUDA) build; override it: make test TORCH="torch==2.6.0"
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip

.PHONY: install test quickstart clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

quickstart: install
	$(VENV)/bin/lmlab quickstart $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
