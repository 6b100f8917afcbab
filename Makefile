# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs the first time.
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU wheel; on a GPU machine use e.g. `make install TORCH=torch` for the CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# Test files run in this many processes (pytest-xdist; a file's tests stay together, so its
# module fixtures are built once; tests/conftest.py names the files that share one). Most tests
# wait on one-thread work: 2 on 2 cores is 1.4x.
TEST_WORKERS ?= 2

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,fast]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gpt2repro demo --out demo_out --overwrite  # make's own folder: a rerun replaces it

test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) demo_out .pytest_cache
