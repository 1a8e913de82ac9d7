"""dbt Core on Snowflake, end to end on fakesnow: the real flows, the real Prefect test server,
the Snowflake connector block saved on it, dbt-snowflake run in-process by postload's Core runner
(node task runs recorded by its forked child), the ops tables in "Snowflake".

fakesnow is patched into ``snowflake.connector.connect``, which both prefect-snowflake (the loads,
the ops tables) and dbt-snowflake (the build) call; its three COPY gaps are filled as in
tests/warehouse/test_snowflake.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect_snowflake import SnowflakeConnector, SnowflakeCredentials

from flows.load_and_transform import load_and_transform
from flows.transform_on_sync import transform_on_sync
from postload.config import Settings
from postload.local.demo_data import write_demo_batch
from postload.warehouse._snowflake import SnowflakeWarehouse
from tests.conftest import PostloadHome, recorded_task_runs, suite_secret
from tests.warehouse.test_snowflake import (  # noqa: F401 (fixtures)
    CopyGaps,
    fake_snowflake,
    fakesnow_copy_gaps,
)

pytestmark = pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning")

PASSWORD = suite_secret("Snowflake e2e: block password", "sf-e2e-pw-93c1d")

# A Fivetran connector's schema, as Fivetran lays it out in Snowflake, and a model on it.
FIVETRAN_FILES = {
    "models/staging/salesforce/_salesforce__sources.yml": """\
sources:
  - name: salesforce
    schema: salesforce
    config:
      loaded_at_field: _fivetran_synced
    tables:
      - name: account
""",
    "models/staging/salesforce/stg_salesforce__account.sql": (
        "select id as account_id, name as account_name, _fivetran_synced as synced_at\n"
        "from {{ source('salesforce', 'account') }}\n"
    ),
}


def connector() -> SnowflakeConnector:
    return SnowflakeConnector(
        credentials=SnowflakeCredentials(account="acct", user="loader", password=PASSWORD),
        database="DB",
        warehouse="WH",
        schema="ANALYTICS",
    )


def query(sql: str) -> list[dict[str, Any]]:
    with connector() as c:
        return [
            {k.lower(): v for k, v in row.items()} for row in c.fetch_all(sql, cursor_type=_dict())
        ]


def _dict() -> Any:
    from snowflake.connector import DictCursor

    return DictCursor


@pytest.fixture
def snowflake_home(
    prefect_server: str,
    postload_home: PostloadHome,
    fake_snowflake: None,  # noqa: F811
    fakesnow_copy_gaps: CopyGaps,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> PostloadHome:
    """The checkout on Snowflake: the block on the server, a Fivetran source beside the COPY ones."""
    block = f"snowflake-e2e-{uuid.uuid4().hex[:8]}"
    connector().save(block)
    monkeypatch.setenv("POSTLOAD_WAREHOUSE", "snowflake")
    monkeypatch.setenv("POSTLOAD_SNOWFLAKE_BLOCK", block)
    monkeypatch.setenv("POSTLOAD_SYNC_DEBOUNCE_SECONDS", "0")
    for relative, text in FIVETRAN_FILES.items():
        path = postload_home.root / "dbt_project" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    config_path = postload_home.root / "postload.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["sources"].append(
        {"name": "salesforce", "loader": {"type": "fivetran", "connector_id": "sf_conn"}}
    )
    config_path.write_text(yaml.safe_dump(config))
    return postload_home


def stage_orders(home: PostloadHome) -> None:
    """The orders and customers files a COPY source finds in its Snowflake stage."""
    settings = Settings()
    SnowflakeWarehouse(connector, settings.load_pipeline()).ensure_schema()
    with connector() as c:
        for source in ("customers", "orders"):
            path: Path = write_demo_batch(home.stage, source, 1, rows=20, malformed=0)
            c.fetch_all(f"PUT file://{path} @raw.{source}")


def test_copy_and_fivetran_sources_build_with_dbt_snowflake_on_the_block(
    snowflake_home: PostloadHome,
) -> None:
    stage_orders(snowflake_home)

    # COPY source: load → watermark → selective build (source:orders+) → ops tables → status
    state = load_and_transform("orders", return_state=True)
    result = state.result()
    flow_run_id = str(state.state_details.flow_run_id)
    assert (result["outcome"], result["rows_loaded"], result["dbt_status"]) == (
        "loaded",
        20,
        "success",
    ), result
    built = query(
        "select name, status from ops.dbt_run_results "
        f"where flow_run_id = '{flow_run_id}' and resource_type = 'model'"
    )
    # stg_customers: a parent outside the selection, missing on a young warehouse, built first
    assert {(r["name"], r["status"]) for r in built} == {
        ("stg_customers", "success"),
        ("stg_orders", "success"),
        ("fct_orders", "success"),
        ("customer_orders", "success"),
    }
    assert query("select count(*) as n from analytics.fct_orders") == [{"n": 20}]
    tables = query("select source, table_name from ops.transform_tables")
    assert {(r["source"], r["table_name"]) for r in tables} == {("orders", "orders")}
    status = {r["source"]: r for r in result["status"]}
    assert (status["orders"]["transform_status"], status["orders"]["rows_loaded"]) == (
        "success",
        20,
    )

    # node task runs recorded (by the forked child in process mode) on the flow run
    expected = {"model stg_orders", "model fct_orders"}

    def names(runs: list[Any]) -> set[str]:
        return {t.name.rsplit("-", 1)[0] for t in runs}

    task_runs = recorded_task_runs(flow_run_id, lambda runs: expected <= names(runs))
    assert expected <= names(task_runs)

    # Fivetran source: a sync lands rows in its own schema; transform-on-sync builds its models
    with connector() as c:
        c.fetch_all("create schema if not exists DB.SALESFORCE")
        c.fetch_all(
            "create table DB.SALESFORCE.ACCOUNT "
            "(id int, name varchar, _fivetran_synced timestamp_tz)"
        )
        c.fetch_all(
            "insert into DB.SALESFORCE.ACCOUNT values "
            "(1, 'Acme', '2026-12-04 10:00:00+00:00'::timestamp_tz)"
        )
    synced = transform_on_sync(connector_id="sf_conn", sync_id="s-1", reason="fivetran sync")
    assert [b["sources"] for b in synced["builds"]] == [["salesforce"]], synced
    assert synced["builds"][0]["status"] == "success"
    assert query("select account_name from analytics.stg_salesforce__account") == [
        {"account_name": "Acme"}
    ]
    account = query(
        "select source, table_name from ops.transform_tables where source = 'salesforce'"
    )
    assert account == [{"source": "salesforce", "table_name": "account"}]
    # the same sync again: its watermark is covered, nothing is built
    assert transform_on_sync(connector_id="sf_conn", reason="fivetran sync")["builds"] == []

    # dbt's artifacts and logs (manifest, run results, partial parse, dbt.log) hold no credential
    written = [p for p in (snowflake_home.root / "dbt_project").rglob("*") if p.is_file()]
    assert any(p.name == "run_results.json" for p in written)
    assert [p for p in written if PASSWORD.encode() in p.read_bytes()] == []
