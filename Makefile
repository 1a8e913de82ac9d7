# The two README commands: `make demo` and `make test`. Both set up everything on a fresh machine
# with Python 3.11 and pip: a .venv with the locked dependencies (uv, bootstrapped with pip).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
# Prefect's server analytics phone home; the embedded default runs offline.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
# Without PREFECT_API_URL the demo uses Prefect's temporary local server; its default 20 s start-up
# budget is too tight on a 2-core machine (~25 s measured).
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: setup demo test test-fast test-worker lint lock bench bench-quick faults faults-quick image clean

$(BIN)/postload: pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/uv pip sync --quiet --python $(BIN)/python requirements-dev.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

setup: $(BIN)/postload

## Run the load-and-transform pipeline end to end on the embedded default (DuckDB + dbt-core + local Prefect).
demo: setup
	$(BIN)/postload demo

## Lint, then the whole test suite (a real Prefect test server, DuckDB and dbt; fakes only for cloud services).
## One worker per core (pytest-xdist), each with its own Prefect test server; a test file stays on
## one worker, so its module-scoped fixtures (a running stack) are started once.
PYTEST_PARALLEL := -n auto --dist loadfile
test: setup lint
	$(BIN)/pytest -q $(PYTEST_PARALLEL)

## The edit-test loop: the unit tier only (no Prefect server; any API call fails fast), no lint.
test-fast: setup
	PREFECT_API_URL=http://127.0.0.1:9/api $(BIN)/pytest -q -m unit $(PYTEST_PARALLEL)

## The work-pool path (tests/system/test_worker_path.py): `prefect deploy --all` to a process pool,
## a real worker, a webhook's build and a worker killed mid-run; 1-3 min, so not in `make test`.
test-worker: setup
	$(BIN)/pytest -q -m worker tests/system/test_worker_path.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Re-pin dependencies after editing pyproject.toml.
lock: setup
	$(BIN)/uv pip compile --quiet pyproject.toml --extra snowflake --python-version 3.11 -o requirements.lock
	$(BIN)/uv pip compile --quiet pyproject.toml --extra dev --extra snowflake --python-version 3.11 -o requirements-dev.lock

## Benchmarks (bench/README.md): they report, they never fail a build; CI does not run them.
bench: setup
	$(BIN)/python bench/load.py
	$(BIN)/python bench/orchestration.py
	$(BIN)/python bench/receiver.py
	$(BIN)/python bench/sync.py
	$(BIN)/python bench/alerts.py
	$(BIN)/python bench/plan.py

## Smoke run of the loader and orchestration benchmarks (their ratios mean little at this size).
bench-quick: setup
	$(BIN)/python bench/load.py --quick
	$(BIN)/python bench/orchestration.py --quick

## Prove it under faults: 1,200 signed webhooks, a receiver SIGKILL, a 60 s API outage and the
## Prefect server SIGKILLed mid-burst and restarted (3-7 min)
## (tests/system/faults.py, a system test: exit 1 when an invariant fails; tests/system/README.md).
faults: setup
	$(BIN)/python tests/system/faults.py

## The short version CI runs (.ci/run), ~4 min: fewer deliveries, both SIGKILLs, a 10 s outage.
faults-quick: setup
	$(BIN)/python tests/system/faults.py --quick

## Build the image with podman (no Docker engine needed) and smoke-test it inside
## (tests/system/image_smoke.sh): the CLI, the demo plan, the flows' imports, a Snowflake dbt parse.
## Where containers can be built but not run (a sandbox), PODMAN_BUILD_FLAGS=--isolation=chroot.
IMAGE ?= postload:local
PODMAN_BUILD_FLAGS ?=
image:
	@start=$$(date +%s) \
	  && podman build $(PODMAN_BUILD_FLAGS) -t $(IMAGE) . \
	  && echo "image $(IMAGE) built in $$(( $$(date +%s) - start )) s"
	tests/system/image_smoke.sh $(IMAGE)

clean:
	rm -rf .postload dbt_project/target dbt_project/logs
