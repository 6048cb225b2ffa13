# Two commands for a fresh clone: `make run` and `make test`. The Makefile makes its own virtualenv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two stamps: `make run` installs only the runtime package; `make test` (and lint, typecheck, bench) adds
# the test extra on top. Each is redone when pyproject.toml changes.
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed-test

.PHONY: run test test-slow lint typecheck check bench bench-quick clean

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(RUN_STAMP)  ## serve ./routes.yaml on the embedded SQLite store
	$(BIN)/hookyard serve -c routes.yaml

# A test that hangs fails after this many seconds (pytest-timeout), with the stacks of every thread, instead
# of holding CI until its limit. Generous: the longest slow test takes about a minute.
TEST_TIMEOUT ?= 600

# Most tests wait on servers, sockets and timers rather than compute: on two cores, four workers
# (pytest-xdist) keep them about half busy and run the suite in about 4 minutes (6.5 on two workers).
# `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 4

test: $(STAMP)  ## the suite (torture tests marked slow are skipped; `make test-slow` runs them)
	$(BIN)/pytest -m "not slow" -n $(TEST_WORKERS) --timeout=$(TEST_TIMEOUT) $(PYTEST_ARGS)

# One at a time: each measures what the gateway does under a fault or a load of its own.
test-slow: $(STAMP)  ## only the slow torture tests (CI runs them before `make test`)
	$(BIN)/pytest -m slow --timeout=$(TEST_TIMEOUT) $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: $(STAMP)
	$(BIN)/ruff check gateway plugins tests bench
	$(BIN)/ruff format --check gateway plugins tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

bench: $(STAMP)  ## the whole benchmark in one run (10 to 15 min): ingest, end to end, scale, profiles, clients, hot path -> bench/RESULTS.md; BENCH_ARGS="--against REV" also counts REV's hot path
	$(BIN)/python -m bench.run --profile $(BENCH_ARGS)

bench-quick: $(STAMP)  ## a shorter benchmark run, no profiles; results in /tmp/hookyard-bench-quick
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)
