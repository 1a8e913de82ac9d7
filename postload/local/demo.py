"""The README's demo: the whole story on the local stack, watchable in the Prefect UI.

1. Two Fivetran connectors finish their syncs, written as Fivetran writes (simulated: a schema
   per connector, ``crm.customers`` and ``shop.orders``, typed columns, ``_fivetran_synced``
   timezone-aware, no load log), and send signed ``sync_end`` webhooks to the receiver over HTTP
   → one coalesced transform-on-sync run builds what is downstream of both; full-run-when-fresh,
   woken by the same events, says it waits for ``events``.
2. A file of events lands in the stage → the load-and-transform deployment loads it (COPY
   semantics, malformed lines counted and skipped) and builds only the models downstream of
   events.
3. Every tracked source has now loaded and is fresh → full-run-when-fresh (configured with
   ``full_run:`` in postload.yaml) builds the whole project, once.
4. The pipeline status table.

The demo has its own home (``.postload/demo``: warehouse, stage, pipeline config, dbt project),
emptied at the start: the checked-in ``postload.yaml`` and dbt project, except that customers and
orders are the dbt sources of Fivetran connectors ``demo_customers`` and ``demo_orders`` (the
project's copy reads them from the connectors' schemas) instead of staged files.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from postload.config import Settings
from postload.fivetran.simulate import simulate_sync
from postload.local.demo_data import demo_records, write_demo_batch
from postload.local.stack import LocalStack, StackError, free_port, port_is_free, send_sync_end
from postload.report import pipeline_status, render_text_table, status_table
from postload.sources import tables_for
from postload.warehouse import open_warehouse
from postload.writer import warehouse_writer

__all__ = ["FIVETRAN_SOURCES", "demo_settings", "run_demo"]

FIVETRAN_SOURCES = ("customers", "orders")
# Where each simulated connector writes (its destination schema) and its table.
FIVETRAN_SCHEMAS = {"customers": "crm", "orders": "shop"}
TRANSFORM_ON_SYNC = "transform-on-sync"
FULL_RUN = "full-run-when-fresh"
LOAD_AND_TRANSFORM = "load-and-transform"
SETTLE_TIMEOUT_SECONDS = 600.0
# The trigger service can create a run a moment after the others finished: a step counts as
# settled when every run is final and no new one appeared for this long.
QUIET_SECONDS = 4.0


def demo_settings(checkout: Settings) -> tuple[Settings, dict[str, str]]:
    """Settings (and the env for the stack's processes) of the demo's own home."""
    home = checkout.home_path / "demo"
    for stale in ["warehouse.duckdb", "warehouse.duckdb.wal", "stage", "receiver-outbox.sqlite"]:
        path = home / stale
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    dbt_project = _fivetran_dbt_project(checkout.dbt_project_path, home / "dbt_project")
    config = yaml.safe_load(checkout.pipeline_config_path.read_text())
    for source in config["sources"]:
        if source["name"] in FIVETRAN_SOURCES:
            # the dbt source's tables, not a raw table postload loads
            for key in ("raw_table", "stage", "file_format"):
                source.pop(key, None)
            source["loader"] = {"type": "fivetran", "connector_id": f"demo_{source['name']}"}
    demo_config = home / "postload.yaml"
    demo_config.write_text(
        "# Written by `postload demo`: the checked-in postload.yaml with customers and orders\n"
        "# the dbt sources of (simulated) Fivetran connectors.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    env = {
        "POSTLOAD_PROJECT_DIR": str(Path(checkout.project_dir).resolve()),
        "POSTLOAD_HOME": str(home),
        "POSTLOAD_PIPELINE_CONFIG": str(demo_config),
        "POSTLOAD_DBT_PROJECT_DIR": str(dbt_project),
    }
    settings = Settings(
        project_dir=Path(checkout.project_dir).resolve(),
        home=home,
        pipeline_config=demo_config,
        dbt_project_dir=dbt_project,
    )
    return settings, env


def run_demo(
    checkout: Settings,
    *,
    api_port: int = 4200,
    keep_running: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    """Returns a process exit code: 0 when every step did what it should."""
    settings, env = demo_settings(checkout)
    if not port_is_free("127.0.0.1", api_port):
        echo(f"port {api_port} is taken: the demo's Prefect server uses a free port instead")
        api_port = free_port()
    stack = LocalStack(
        settings,
        api_port=api_port,
        receiver_port=free_port(),
        echo=echo,
        schedules=False,  # no sweeps or hourly loads interleaving with the story
        extra_env=env,
    )
    try:
        stack.start()
        echo(stack.banner().replace("Ctrl-C stops everything.", ""))
        echo(f"watch it in the UI: {stack.ui_url}/runs\n")
        ok = _story(stack, settings, echo)
        if keep_running:
            echo("\nthe stack keeps running for you to explore; Ctrl-C stops it")
            for _ in stack.wait_forever():
                pass
        return 0 if ok else 1
    except StackError as exc:
        echo(f"the local stack failed: {exc}")
        return 1
    except KeyboardInterrupt:
        echo("stopping")
        return 130
    finally:
        stack.stop()


def _story(stack: LocalStack, settings: Settings, echo: Callable[[str], None]) -> bool:
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.api_url, PREFECT_API_KEY: None}):
        runs = _Runs(stack)
        pipeline = settings.load_pipeline()
        warehouse = open_warehouse(settings, pipeline)
        ok = True

        echo("1. Fivetran syncs of two sources → one coalesced transform")
        before = runs.known()
        for batch, source in enumerate(FIVETRAN_SOURCES, start=1):
            rows = _fivetran_sync(settings, source, batch)
            echo(
                f"   connector demo_{source} synced {rows} rows into "
                f"{FIVETRAN_SCHEMAS[source]}.{source} (_fivetran_synced, no load log)"
            )
        assert stack.webhook_secret is not None  # stack.start() resolved or created it
        for source in FIVETRAN_SOURCES:
            response = send_sync_end(stack.webhook_url, stack.webhook_secret, f"demo_{source}")
            echo(f"   POST sync_end for demo_{source} (signed) → {response.status_code}")
            ok &= response.status_code == 202
        new = runs.settle(before, want={TRANSFORM_ON_SYNC: 1})
        ok &= _report(new, runs, echo)

        echo("\n2. a file of events lands → load-and-transform (COPY) → only events' models")
        before = runs.known()
        path = write_demo_batch(settings.stage_root_path, "events", 1)
        echo(f"   landed {path.name} (50 lines, 2 of them malformed)")
        from prefect.deployments import run_deployment

        flow_run = run_deployment(
            f"{LOAD_AND_TRANSFORM}/{LOAD_AND_TRANSFORM}",
            parameters={"source": "events"},
            timeout=SETTLE_TIMEOUT_SECONDS,
        )
        loaded = _Run(LOAD_AND_TRANSFORM, flow_run)
        ok &= _report([loaded], runs, echo)

        echo(
            "\n3. every source has loaded and is fresh → full-run-when-fresh builds everything, once"
        )
        new = runs.settle(before, want={LOAD_AND_TRANSFORM: 1, FULL_RUN: 1})
        ok &= _report([r for r in new if r.id != loaded.id], runs, echo)
        full_builds = [r for r in new if r.deployment == FULL_RUN and runs.models(r)]
        ok &= len(full_builds) == 1

        echo("\n4. pipeline status (ops.pipeline_status):")
        tables = tables_for(settings, pipeline)
        echo(render_text_table(status_table(pipeline_status(warehouse, tables))))
        echo(
            f"\nwhere to look next:\n  Prefect UI:  {stack.ui_url}/runs  (flow runs, per-model "
            "tasks, artifacts: pipeline-status, load-to-transform latency, source freshness)\n"
            f"  DuckDB:      duckdb {settings.duckdb_file}  then  select * from "
            "ops.pipeline_status;\n"
            "  plan:        postload plan orders   (what a load of orders would build)\n"
            "  the stack:   postload stack   (server + UI, runner, receiver; Ctrl-C stops it)"
        )
        echo("\ndemo: " + ("every step did what it should" if ok else "SOMETHING WENT WRONG"))
        return ok


def _fivetran_sync(settings: Settings, source: str, batch: int) -> int:
    """What a Fivetran connector does: its rows land in its own schema, no load log."""
    schema = FIVETRAN_SCHEMAS[source]
    id_key = {"customers": "customer_id", "orders": "order_id"}[source]
    rows = [{"id": r[id_key], **r} for r in demo_records(source, batch)]
    with warehouse_writer(settings):
        simulate_sync(settings.duckdb_file, schema, {source: rows})
    return len(rows)


# The demo project's customers and orders as Fivetran connectors deliver them: typed columns in
# the connector's schema, `_fivetran_synced` (TIMESTAMPTZ) as each row's load time. The staging
# models keep their columns, so everything downstream is unchanged.
_FIVETRAN_SOURCE_YML = """# Written by `postload demo`: {name} as its Fivetran connector delivers it.
sources:
  - name: {name}
    schema: {schema}
    config:
      loaded_at_field: _fivetran_synced
      freshness:
        warn_after: {{count: 12, period: hour}}
        error_after: {{count: 24, period: hour}}
    tables:
      - name: {name}
"""
_FIVETRAN_STAGING = {
    "customers": """-- Written by `postload demo`: customers as the demo_customers connector delivers them.
select
    customer_id,
    name as customer_name,
    email,
    cast(created_at as timestamp) as created_at,
    cast(null as varchar) as source_file,
    timezone('UTC', _fivetran_synced) as loaded_at
from {{ source('customers', 'customers') }}
where not _fivetran_deleted
""",
    "orders": """-- Written by `postload demo`: orders as the demo_orders connector delivers them.
select
    order_id,
    customer_id,
    cast(amount as decimal(12, 2)) as amount,
    status,
    cast(ordered_at as timestamp) as ordered_at,
    cast(null as varchar) as source_file,
    timezone('UTC', _fivetran_synced) as loaded_at
from {{ source('orders', 'orders') }}
where not _fivetran_deleted
""",
}


def _fivetran_dbt_project(checked_in: Path, target: Path) -> Path:
    """A copy of the dbt project whose customers and orders sources are Fivetran connectors'."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(
        checked_in, target, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages")
    )
    for source in FIVETRAN_SOURCES:
        folder = target / "models" / "staging" / source
        (folder / f"_{source}__sources.yml").write_text(
            _FIVETRAN_SOURCE_YML.format(name=source, schema=FIVETRAN_SCHEMAS[source])
        )
        (folder / f"stg_{source}.sql").write_text(_FIVETRAN_STAGING[source])
    return target


class _Run:
    def __init__(self, deployment: str, run: Any) -> None:
        self.deployment = deployment
        self.run = run

    @property
    def id(self) -> Any:
        return self.run.id


class _Runs:
    """The stack's flow runs, read through the Prefect API (what the UI shows)."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.deployments = {
            name: stack.deployment_id(name)
            for name in (TRANSFORM_ON_SYNC, FULL_RUN, LOAD_AND_TRANSFORM)
        }

    def all(self) -> list[_Run]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        names = {v: k for k, v in self.deployments.items()}
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=list(self.deployments.values()))
                )
            )
        return [_Run(names[r.deployment_id], r) for r in runs]

    def known(self) -> set[Any]:
        return {r.id for r in self.all()}

    def settle(self, before: set[Any], *, want: dict[str, int]) -> list[_Run]:
        deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
        quiet_since, last_count = time.monotonic(), -1
        while True:
            self.stack.check_alive()
            new = [r for r in self.all() if r.id not in before]
            if len(new) != last_count:
                quiet_since, last_count = time.monotonic(), len(new)
            enough = all(
                sum(r.deployment == name for r in new) >= count for name, count in want.items()
            )
            final = all(r.run.state and r.run.state.is_final() for r in new)
            if enough and final and time.monotonic() - quiet_since >= QUIET_SECONDS:
                return sorted(new, key=lambda r: r.run.expected_start_time or r.run.created)
            if time.monotonic() > deadline:
                states = [(r.deployment, r.run.state_name) for r in new]
                raise StackError(f"runs did not settle in {SETTLE_TIMEOUT_SECONDS:.0f} s: {states}")
            time.sleep(0.5)

    def models(self, run: _Run) -> list[str]:
        """The dbt models a flow run built: prefect-dbt's per-node task runs."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with get_client(sync_client=True) as client:
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            )
        return sorted(
            t.name.removeprefix("model ")
            for t in tasks
            if t.name.startswith("model ") and t.state_name == "Completed"
        )


def _report(new: list[_Run], runs: _Runs, echo: Callable[[str], None]) -> bool:
    ok = True
    for run in new:
        models = runs.models(run)
        what = f"built {', '.join(models)}" if models else "built nothing"
        if not models and run.deployment == FULL_RUN:
            what += " (a tracked source is not fresh yet: its source-freshness artifact says which)"
        elif not models and run.deployment == TRANSFORM_ON_SYNC:
            what += " (nothing new since the last build)"
        if run.run.state_name == "Cancelled":
            what = "cancelled: superseded by a run that started after its event and covers it"
        echo(f"   {run.deployment} {run.run.name}: {run.run.state_name}, {what}")
        ok &= run.run.state_name in ("Completed", "Cancelled")
    return ok
