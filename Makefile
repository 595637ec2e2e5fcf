# Set-up and the two main jobs. Both create .venv when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow lint typecheck bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: a CPU build of 2.13.0 is on local disk; an unpinned torch pulls a CUDA build of several GB.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/forgetless demo --overwrite

test: $(STAMP)
	$(VENV)/bin/pytest -q

# the checks that take minutes (pulls, long organisms, sharded runs): CI runs them after `make test`
test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench tools

typecheck: $(STAMP)
	$(VENV)/bin/mypy src/forgetless

bench: $(STAMP)
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
