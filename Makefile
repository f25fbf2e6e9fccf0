# Every target that runs code depends on `venv`, so each works as the first command on a fresh
# machine. `venv` is a no-op while pyproject.toml and constraints.txt are unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-unit test-integration bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(PY) -m pipelines.demo --config pipelines/configs/demo.debug.yaml

test: venv
	$(PY) -m pytest -q tests

test-unit: venv
	$(PY) -m pytest -q tests/unit

test-integration: venv
	$(PY) -m pytest -q tests/integration

bench: venv
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache
