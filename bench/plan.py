"""Planning cost for many Fivetran connectors: watermarks of every table and the selection to build.

A DuckDB warehouse laid out as Fivetran writes it (``--sources`` connectors, a schema each, with
``--tables`` tables each, ``_fivetran_synced TIMESTAMPTZ``), a few tables changed since the last
build, and the planner postload runs on every event: one watermark statement for every table,
then ``plan_transform``. Side by side, in the same run: the same watermarks read one statement per
table (what a plan per source or table would cost). Figures printed, nothing asserted.

    .venv/bin/python bench/plan.py [--sources 200] [--tables 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from postload.config import PipelineConfig
from postload.plan import plan_transform
from postload.sources import SourceTable, source_tables
from postload.warehouse import Watermark
from postload.warehouse._duckdb import DuckDBWarehouse


class CountingWarehouse(DuckDBWarehouse):
    """Counts the statements sent to DuckDB: a round trip each."""

    statements = 0

    @contextmanager
    def connect(self) -> Iterator[Any]:
        with super().connect() as con:
            outer = self

            class Counting:
                def execute(self, sql: str, *args: Any) -> Any:
                    outer.statements += 1
                    return con.execute(sql, *args)

                def __getattr__(self, name: str) -> Any:
                    return getattr(con, name)

            yield Counting()


def build(
    root: Path, n_sources: int, n_tables: int
) -> tuple[CountingWarehouse, PipelineConfig, dict[str, list[SourceTable]]]:
    names = [f"connector_{i:03d}" for i in range(n_sources)]
    pipeline = PipelineConfig.model_validate(
        {
            "sources": [
                {"name": n, "loader": {"type": "fivetran", "connector_id": f"conn_{n}"}}
                for n in names
            ]
        }
    )
    manifest = {
        "sources": {
            f"source.p.{n}.table_{t}": {
                "source_name": n,
                "name": f"table_{t}",
                "database": "warehouse",
                "schema": n,
                "identifier": f"table_{t}",
                "loaded_at_field": "_fivetran_synced",
            }
            for n in names
            for t in range(n_tables)
        }
    }
    path = root / "warehouse.duckdb"
    warehouse = CountingWarehouse(path, root / "stage", pipeline)
    warehouse.ensure_schema()
    now = datetime.now(UTC)
    with duckdb.connect(str(path)) as con:
        for n in names:
            con.execute(f"create schema {n}")
            for t in range(n_tables):
                con.execute(
                    f"create table {n}.table_{t} as select range as id, "
                    "?::timestamptz - to_seconds(range) as _fivetran_synced from range(100)",
                    [now],
                )
        # every table covered by an earlier build, except two tables of one connector
        con.executemany(
            "insert into ops.transform_tables (source, table_name, selection, status, covers_loaded_at) "
            "values (?, ?, 'bench', 'success', ?)",
            [
                (
                    n,
                    f"table_{t}",
                    (
                        now
                        if (n, t) not in {(names[0], 0), (names[0], 1)}
                        else now - timedelta(hours=1)
                    ).replace(tzinfo=None),
                )
                for n in names
                for t in range(n_tables)
            ],
        )
    return warehouse, pipeline, source_tables(pipeline, manifest)


def per_table(
    warehouse: CountingWarehouse, tables: list[SourceTable]
) -> dict[tuple[str, str], Watermark]:
    """The same watermarks, one statement per table (and one for what builds covered)."""
    with warehouse.connect() as con:
        covered = {
            (s, t): c
            for s, t, c in con.execute(
                "select source, table_name, max(covers_loaded_at) from ops.transform_tables "
                "where status = 'success' group by all"
            ).fetchall()
        }
        return {
            t.key: Watermark(
                con.execute(f"select max({t.loaded_at_field}) from {t.relation}").fetchone()[0],
                covered.get(t.key),
            )
            for t in tables
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=200)
    parser.add_argument("--tables", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        warehouse, pipeline, tables = build(Path(tmp), args.sources, args.tables)
        every = [t for ts in tables.values() for t in ts]
        one_query, each_table, planning = [], [], []
        for _ in range(args.repeats):
            warehouse.statements = 0
            started = time.perf_counter()
            marks = warehouse.watermarks(every)
            one_query.append(time.perf_counter() - started)
            round_trips = warehouse.statements
            started = time.perf_counter()
            plan = plan_transform(pipeline, tables, marks, lambda s: [])
            planning.append(time.perf_counter() - started)
            warehouse.statements = 0
            started = time.perf_counter()
            assert per_table(warehouse, every) == marks
            each_table.append(time.perf_counter() - started)
            per_table_trips = warehouse.statements
        assert plan is not None
        one, each = statistics.median(one_query), statistics.median(each_table)
        print(
            f"planning {args.sources} sources x {args.tables} tables = {len(every)} tables (DuckDB), medians of {args.repeats}"
        )
        print(f"  watermarks, one statement:     {one * 1000:8.1f} ms   round trips: {round_trips}")
        print(
            f"  watermarks, one per table:     {each * 1000:8.1f} ms   round trips: {per_table_trips}"
        )
        print(f"  ratio one-per-table / one:     {each / one:8.1f}x")
        print(f"  plan_transform (selection):    {statistics.median(planning) * 1000:8.2f} ms")
        print(f"  pending: {{{', '.join(f'{s}: {sorted(t)}' for s, t in plan.tables.items())}}}")
        print(f"  dbt build {plan.selection.describe()}")


if __name__ == "__main__":
    main()
