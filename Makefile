# Every target that runs code depends on `venv`, so each works as the first command on a fresh
# machine. `venv` is a no-op while pyproject.toml and constraints.txt are unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv prometheus demo lint test test-unit test-integration bench clean

venv: $(STAMP)

# Debian's Prometheus (prometheus + promtool) for the alert-rule tests; installed when missing.
# Where apt cannot run, the tests that need it skip and say why.
prometheus:
	@command -v promtool >/dev/null 2>&1 || { echo "installing Debian's prometheus (promtool) for the tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
	  || echo "could not install prometheus with apt-get: the tests that need promtool will skip"; }

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# urllib3-future (via grafana-client -> niquests) would overwrite urllib3 in site-packages
	# when installed from its wheel; built from source with this switch it sits beside it.
	URLLIB3_NO_OVERRIDE=1 $(PY) -m pip install -q -c constraints.txt --no-binary urllib3-future -e '.[dev]'
	touch $(STAMP)

# ARGS passes options and overrides through, e.g. make demo ARGS=--keep-serving
demo: venv
	$(PY) -m pipelines.demo --config pipelines/configs/demo.debug.yaml $(ARGS)

# ruff (lint + format check) and mypy over platform/, pipelines/, bench/, tests/ (config in pyproject.toml).
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Lint first: a finding fails the run before the slower tests start. Two pytest workers
# (pytest-xdist), one per core, each taking whole test modules (`--dist loadfile`), so a module's
# Ray cluster and fixtures stay in one process. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
test: venv prometheus lint
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile tests

test-unit: venv prometheus
	$(PY) -m pytest -q tests/unit

test-integration: venv prometheus
	$(PY) -m pytest -q tests/integration

bench: venv
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache .mypy_cache .ruff_cache
