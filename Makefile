# Two commands a newcomer needs: `make demo` and `make test` (both create .venv on first use).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) pipelines/demo.py $(DEMO_ARGS)

bench: setup
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache
