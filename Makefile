# Two entry points: `make run` starts the app, `make test` runs the test suite.
# Each creates .venv on first use and installs the pinned requirements (again only when they change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.run-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
TEST_STAMP := $(VENV)/.test-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: run test test-slow lint bench clean

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUN_STAMP): requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(TEST_STAMP): requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

run: $(RUN_STAMP)
	$(PY) app.py $(ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(TEST_STAMP)
	$(PY) -m pytest --run-slow $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check fastcomposer app.py tests benchmarks scripts

bench: $(TEST_STAMP)
	$(PY) benchmarks/bench_pipeline.py --arch tiny
	$(PY) benchmarks/bench_pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache
