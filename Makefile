# One entry point for a fresh machine (Python 3.11, pip, apt):
#   make run    set up, build the demo bundle if missing (synthetic data), serve it
#   make test   set up (virtualenv + redis-server/prometheus via apt), lint, type-check, test
#   make test-fast  the fast lane: pytest -m 'not slow', no training (under 30 s)
#   make bench  the latency benchmark (docs/BENCHMARKS.md)
#   make loop   the closed feedback loop: serve, simulate members, retrain from the events, compare
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-10)
BUNDLE ?= bundles/demo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv system-deps run serve bundle test test-fast lint bench evaluate loop lock audit faults soak clean

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

# (Re)builds the demo bundle when it is missing or this code would refuse it (an older
# bundle format, a damaged file): verify_bundle checks the manifest and every file's hash.
bundle: venv
	@$(BIN)/python -c "from app.core.bundle import verify_bundle; verify_bundle(__import__('pathlib').Path('$(BUNDLE)'))" 2>/dev/null \
	  || $(BIN)/unicorn build-bundle --source synthetic --out $(BUNDLE)

run: bundle
	$(BIN)/unicorn serve --bundle $(BUNDLE)

lint: venv
	$(BIN)/ruff check app model_export tests loadtest
	$(BIN)/mypy
	$(BIN)/lint-imports

test: venv system-deps lint
	$(BIN)/pytest -q

# The fast lane (under 30 s on 2 cores): every test not marked slow, on a bundle made without
# training; UNICORN_TEST_NO_TRAINING makes any test that would train fail instead.
test-fast: venv system-deps
	UNICORN_TEST_NO_TRAINING=1 $(BIN)/pytest -q -m "not slow"

# The latency benchmark (docs/BENCHMARKS.md): builds the bundles it lacks (bundles/demo;
# bundles/ml when ../shared/datasets/ml-latest-small exists; bundles/big, the 1M-user
# world), then runs every measurement once and rewrites the generated block of
# docs/BENCHMARKS.md. BENCH_ARGS=--quick: demo bundle only, 1 s cells. The peer it times
# (BentoML, loadtest/peer.py) is the `peers` extra, installed here when missing.
bench: venv system-deps
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk >/dev/null; }
	@$(BIN)/python -c "from importlib.metadata import version as v; assert v('bentoml')[:4] == '1.4.'" \
	  2>/dev/null || $(BIN)/pip install -q -e '.[peers]'
	BENCH_COMMAND="make bench$(if $(BENCH_ARGS), BENCH_ARGS='$(BENCH_ARGS)')" \
	  $(BIN)/python -m loadtest.bench $(BENCH_ARGS)

# A hashed lock of the serving install, and a vulnerability audit of it. pip-audit needs
# PyPI's JSON API or OSV; where neither answers it FAILS (--strict) rather than passing
# having audited nothing, so it is not part of `make test` on machines without them.
lock: venv
	$(BIN)/pip install -q 'pip-tools>=7.4'
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe \
	  --strip-extras --no-emit-index-url --no-emit-find-links --index-url https://pypi.org/simple -o requirements.lock pyproject.toml

audit: venv
	$(BIN)/pip-audit -r requirements.lock --require-hashes --disable-pip --strict --progress-spinner off

# Fault injection under load and the 10-minute soak (docs/RELIABILITY.md). A part or a short
# look: FAULTS_ARGS='--only redis_killed --fault-seconds 2', SOAK_ARGS='--minutes 1
# --warmup-seconds 0' (each still rewrites its block: restore it from git if it was a look).
faults: system-deps bundle
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python -m loadtest.faults --bundle $(BUNDLE) --write docs/RELIABILITY.md $(FAULTS_ARGS)

soak: system-deps bundle
	$(BIN)/python -m loadtest.soak --bundle $(BUNDLE) --write docs/RELIABILITY.md $(SOAK_ARGS)

evaluate: venv
	$(BIN)/unicorn evaluate --source synthetic --seeds 7 8 9
	$(BIN)/unicorn evaluate --source movielens --path ../shared/datasets/ml-latest-small --seeds 7 8 9

# The closed feedback loop (docs/EVALUATION.md, "The closed loop"): serve $(BUNDLE) with events
# on, simulated members of its synthetic world engage over HTTP, a bundle is built from the
# events (under data/loop) and both are compared on fresh sessions; rewrites the loop block.
# A quick look: LOOP_ARGS='--seeds 1 --log-sessions 500' (restore the block from git after).
loop: venv bundle
	LOOP_COMMAND="make loop$(if $(LOOP_ARGS), LOOP_ARGS='$(LOOP_ARGS)')" \
	  $(BIN)/python -m loadtest.loop --bundle $(BUNDLE) --write docs/EVALUATION.md $(LOOP_ARGS)

clean:
	rm -rf $(VENV) bundles data .pytest_cache .mypy_cache .ruff_cache
