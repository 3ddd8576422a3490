# Developer shortcuts. Everything goes through scripts/test.sh (THE test command, also run by
# CI via .ci/run) or the first version's venv. `make` or `make help` lists the targets.
#
#   make test ARGS='-k stats'          extra pytest arguments
#   make test-all PYVERSIONS='3.11 3.13'  restrict the CPython versions

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYVERSIONS ?=
export PYVERSIONS
ARGS ?=
# The developers' interpreter: the first version's venv (made by `make build`).
PY ?= .venvs/$(firstword $(PYVERSIONS) 3.11)/bin/python

.PHONY: help deps build build-all test test-all lint regrtest regrtest-baseline bench valgrind clean distclean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

deps: ## what the tests need and nothing else: scripts/test.sh's Debian packages (apt-get; sudo -n if not root) and every version's venv
	bash scripts/test.sh --build-only

build: ## (re)install editable in the first version's venv (.venvs/3.11), recompiling the sampler
	bash scripts/test.sh --quick --build-only

build-all: ## (re)install editable in every version's venv (.venvs/3.11 .. 3.13)
	bash scripts/test.sh --build-only

test: ## quick tests: first version only, lint + pytest, no CPython regrtests (ARGS=... for pytest)
	bash scripts/test.sh --quick $(ARGS)

test-all: ## what CI runs: every version, lint, pytest, CPython regrtests with the engine
	bash scripts/test.sh $(ARGS)

lint: ## ruff check + mypy (first version)
	bash scripts/test.sh --lint-only

regrtest: build ## CPython's regression tests with the engine started (first version)
	$(PY) scripts/cpython_regrtest.py

regrtest-baseline: build ## the same without the engine: what fails anyway on this machine
	$(PY) scripts/cpython_regrtest.py --baseline

bench: build ## run the benchmarks (benchmarks/run_all.py), each prints a table
	@test -f benchmarks/run_all.py || { echo "benchmarks/run_all.py does not exist yet"; exit 1; }
	$(PY) benchmarks/run_all.py

valgrind: build-all ## start/stop the engine under valgrind, every venv: no leak (PYTHONS=... to pick)
	@test -f scripts/valgrind_startstop.sh || { echo "scripts/valgrind_startstop.sh does not exist yet"; exit 1; }
	bash scripts/valgrind_startstop.sh

clean: ## remove build products (compiled sampler, build/, egg-info, caches); keeps .venvs
	rm -rf build src/*.egg-info *.egg-info .pytest_cache .mypy_cache .ruff_cache
	rm -f src/memprof_limits/*.so
	find . -path ./.venvs -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean ## clean, and remove the venvs too
	rm -rf .venvs
