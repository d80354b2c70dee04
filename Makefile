# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: the CPU build on machines that have it locally; elsewhere pip picks the right build.
TORCH ?= torch==2.13.0

.PHONY: demo quick cohort test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/clam demo --out demo-output

quick: $(VENV)/.installed
	$(VENV)/bin/clam demo --quick --out demo-output-quick

cohort: $(VENV)/.installed
	$(PY) CLAM/Testing/Python/cohort_walkthrough.py --out cohort-output

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check CLAM benchmarks

clean:
	rm -rf $(VENV) demo-output demo-output-quick cohort-output
