"""Watermarks: every table's newest row and what builds covered, in one round trip, in UTC.

On DuckDB and on Snowflake (fakesnow), with Fivetran's layout (a schema per connector, several
tables, ``_fivetran_synced`` timezone-aware) next to a copy source with postload's naive
``_loaded_at``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import pytest

from bench.plan import CountingWarehouse  # counts the statements sent: a round trip each
from postload.config import PipelineConfig
from postload.dbt import DbtBuildResult
from postload.runs import record_build
from postload.sources import SourceTable, source_tables
from postload.warehouse import Watermark

PIPELINE = PipelineConfig.model_validate(
    {
        "sources": [
            {"name": "salesforce", "loader": {"type": "fivetran", "connector_id": "sf"}},
            {"name": "events", "raw_table": "events", "stage": "events"},
        ]
    }
)
SYNCED = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)


def manifest(database: str | None) -> dict[str, Any]:
    return {
        "sources": {
            f"source.p.salesforce.{t}": {
                "source_name": "salesforce",
                "name": t,
                "database": database,
                "schema": "salesforce",
                "identifier": t,
                "loaded_at_field": "_fivetran_synced",
            }
            for t in ("account", "opportunity", "user")
        }
    }


@pytest.fixture
def duck(tmp_path: Path) -> tuple[CountingWarehouse, list[SourceTable]]:
    path = tmp_path / "warehouse.duckdb"
    warehouse = CountingWarehouse(path, tmp_path / "stage", PIPELINE)
    warehouse.ensure_schema()
    con = duckdb.connect(str(path))
    # what Fivetran writes: its own schema, _fivetran_synced TIMESTAMPTZ (an INSTANT); one table
    # whose column is a naive TIMESTAMP (taken as UTC); "user" not synced yet (no table)
    con.execute("create schema salesforce")
    con.execute("create table salesforce.account (id int, _fivetran_synced timestamptz)")
    con.execute("insert into salesforce.account values (1, ?)", [SYNCED])
    con.execute("create table salesforce.opportunity (id int, _fivetran_synced timestamp)")
    con.execute(
        "insert into salesforce.opportunity values (1, ?)",
        [(SYNCED - timedelta(hours=1)).replace(tzinfo=None)],
    )
    con.execute("insert into raw.events values ('{}', 'f.jsonl', ?)", [datetime(2026, 12, 4, 9)])
    con.close()
    tables = source_tables(PIPELINE, manifest("warehouse"))
    warehouse.statements = 0
    return warehouse, [t for ts in tables.values() for t in ts]


@pytest.fixture
def new_york() -> Iterator[None]:
    """This process in another time zone (DuckDB's session zone follows it)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def test_duckdb_reads_every_table_in_one_round_trip_in_utc(duck: Any, new_york: None) -> None:
    warehouse, tables = duck
    # a session in another time zone must not shift anything
    with duckdb.connect(str(warehouse.path)) as con:
        assert con.execute("select current_setting('TimeZone')").fetchone() == ("America/New_York",)
    marks = warehouse.watermarks([t for t in tables if t.table != "user"])
    assert warehouse.statements == 1
    assert marks == {
        ("salesforce", "account"): Watermark(SYNCED, None),
        ("salesforce", "opportunity"): Watermark(SYNCED - timedelta(hours=1), None),
        ("events", "events"): Watermark(datetime(2026, 12, 4, 9, tzinfo=UTC), None),
    }
    assert all(m.latest_loaded_at.tzinfo is UTC for m in marks.values())


def test_a_table_not_synced_yet_has_no_rows_and_the_rest_still_count(duck: Any) -> None:
    warehouse, tables = duck
    marks = warehouse.watermarks(tables)
    assert marks[("salesforce", "user")] == Watermark(None, None)
    assert marks[("salesforce", "account")].pending


def test_a_recorded_build_covers_exactly_the_tables_it_built(duck: Any) -> None:
    warehouse, tables = duck
    present = [t for t in tables if t.table != "user"]
    build = DbtBuildResult(selection="--select source:salesforce.account+")
    record_build(
        warehouse,
        sources=[PIPELINE.source("salesforce")],
        runner="core",
        build=build,
        started_at=datetime(2026, 12, 4, 10, 1),
        completed_at=datetime(2026, 12, 4, 10, 2),
        covers={"salesforce": SYNCED},
        # an aware time in another zone is stored as the same instant
        tables={"salesforce": {"account": SYNCED.astimezone(timezone(timedelta(hours=2)))}},
    )
    marks = warehouse.watermarks(present)
    assert not marks[("salesforce", "account")].pending
    assert marks[("salesforce", "opportunity")].pending  # not built: still pending
    assert marks[("events", "events")].pending
    # a selection's own coverage (the full build's) ignores builds of other selections
    full = warehouse.watermarks(present, selection="--select fqn:*")
    assert full[("salesforce", "account")].covered_loaded_at is None


def test_builds_recorded_per_source_still_cover_a_copy_source(duck: Any) -> None:
    """Builds recorded before per-table bookkeeping count for the tables postload.yaml names."""
    warehouse, tables = duck
    events = [t for t in tables if t.source == "events"]
    with duckdb.connect(str(warehouse.path)) as con:
        con.execute(
            "insert into ops.transform_runs (source, selection, status, covers_loaded_at) "
            "values ('events', '--select source:events+', 'success', ?)",
            [datetime(2026, 12, 4, 9)],
        )
    assert not warehouse.watermarks(events)[("events", "events")].pending


def test_pipeline_status_shows_fivetran_sources_from_their_watermarks(duck: Any) -> None:
    """Fivetran writes no load log: the status takes a source's last load from its tables."""
    from postload.report import pipeline_status

    warehouse, tables = duck
    by_source: dict[str, list[SourceTable]] = {}
    for t in tables:
        by_source.setdefault(t.source, []).append(t)
    assert warehouse.pipeline_status() == []  # the view alone knows nothing of them
    rows = {r["source"]: r for r in pipeline_status(warehouse, by_source)}
    assert rows["salesforce"]["last_loaded_at"] == SYNCED.replace(tzinfo=None)
    assert rows["salesforce"]["awaiting_transform"] is True
    assert rows["salesforce"]["transform_status"] is None
