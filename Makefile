# One entry point for a fresh machine (Python 3.11, pip, apt):
#   make run    set up, build the demo bundle if missing (synthetic data), serve it
#   make test   set up (virtualenv + redis-server/prometheus via apt), lint, type-check, test
#   make bench  the latency benchmark (docs/BENCHMARKS.md)
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-10)
BUNDLE ?= bundles/demo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv system-deps run serve bundle test lint bench evaluate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[train,dev,loadtest]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# Services the integration tests start themselves: redis-server, prometheus/promtool.
system-deps:
	@if ! command -v redis-server >/dev/null || ! command -v promtool >/dev/null; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server prometheus >/dev/null; \
	fi

$(BUNDLE)/manifest.json: | venv
	$(BIN)/unicorn build-bundle --source synthetic --out $(BUNDLE)

bundle: $(BUNDLE)/manifest.json

run: venv $(BUNDLE)/manifest.json
	$(BIN)/unicorn serve --bundle $(BUNDLE)

lint: venv
	$(BIN)/ruff check app model_export tests loadtest
	$(BIN)/mypy

test: venv system-deps lint
	$(BIN)/pytest -q

evaluate: venv
	$(BIN)/unicorn evaluate --source synthetic --seeds 7 8 9
	$(BIN)/unicorn evaluate --source movielens --path ../shared/datasets/ml-latest-small --seeds 7 8 9

clean:
	rm -rf $(VENV) bundles data .pytest_cache .mypy_cache .ruff_cache
