# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv from nothing.
# CUDA users: make test TORCH_SPEC="torch==2.11.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) benchmarks/paper_table2.py --reduced

test: $(VENV)/.installed
	$(PY) -m pytest -p no:cacheprovider   # -q comes from pyproject's addopts (twice hides "N passed")

clean:
	rm -rf $(VENV) build *.egg-info
