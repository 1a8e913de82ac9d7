"""The simulated Fivetran sync writes what a connector leaves in a destination, and nothing else."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from postload.config import PipelineConfig
from postload.fivetran.simulate import infer_column_type, simulate_sync
from postload.sources import SourceTable
from postload.warehouse._duckdb import DuckDBWarehouse

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def query(path: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = duckdb.connect(str(path))
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def column_types(path: Path, schema: str, table: str) -> dict[str, str]:
    return dict(
        query(
            path,
            "select column_name, data_type from information_schema.columns "
            "where table_schema = ? and table_name = ? order by ordinal_position",
            [schema, table],
        )
    )


def test_creates_the_table_in_the_connections_schema_with_typed_and_system_columns(
    tmp_path: Path,
) -> None:
    db = tmp_path / "warehouse.duckdb"
    rows = [
        {
            "id": 1,
            "name": "Acme",
            "annual_revenue": 1.5e6,
            "employees": 120,
            "is_customer": True,
            "price": Decimal("9.99"),
            "signed_on": date(2024, 3, 1),
            "created_at": datetime(2024, 3, 1, 9, 30),
            "updated_at": datetime(2024, 3, 1, 9, 30, tzinfo=UTC),
            "attributes": {"tier": "gold"},
            "notes": None,
        },
        {"id": 2, "name": "Globex", "annual_revenue": 2, "employees": 7, "notes": None},
    ]

    sync = simulate_sync(db, "salesforce", {"account": rows}, synced_at=T0)

    assert sync.created == ["account"] and sync.upserted == {"account": 2}
    assert sync.tables == ["account"]
    assert column_types(db, "salesforce", "account") == {
        "id": "BIGINT",
        "name": "VARCHAR",
        "annual_revenue": "DOUBLE",  # ints and floats: DOUBLE
        "employees": "BIGINT",
        "is_customer": "BOOLEAN",
        "price": "DECIMAL(38,9)",
        "signed_on": "DATE",
        "created_at": "TIMESTAMP",
        "updated_at": "TIMESTAMP WITH TIME ZONE",
        "attributes": "JSON",
        "notes": "VARCHAR",  # nulls only
        "_fivetran_synced": "TIMESTAMP WITH TIME ZONE",
        "_fivetran_deleted": "BOOLEAN",
    }
    constraints = query(
        db,
        "select constraint_type, constraint_column_names from duckdb_constraints() "
        "where schema_name = 'salesforce' and table_name = 'account'",
    )
    assert ("PRIMARY KEY", ["id"]) in constraints
    synced = query(db, "select _fivetran_synced, _fivetran_deleted from salesforce.account")
    assert synced == [(T0, False), (T0, False)]
    assert all(value.tzinfo is not None for value, _ in synced)  # aware, as on Snowflake


def test_synced_at_defaults_to_now_and_a_naive_time_is_utc(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    before = datetime.now(UTC)
    sync = simulate_sync(db, "stripe", {"customer": [{"id": "cus_1"}]})
    assert before <= sync.synced_at <= datetime.now(UTC)
    assert sync.synced_at.tzinfo is not None

    naive = simulate_sync(
        db, "stripe", {"charge": [{"id": "ch_1"}]}, synced_at=datetime(2026, 1, 1)
    )
    assert naive.synced_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert query(db, "select _fivetran_synced from stripe.charge") == [
        (datetime(2026, 1, 1, tzinfo=UTC),)
    ]


def test_upserts_by_id_and_stamps_only_the_rows_it_wrote(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    t1 = T0 + timedelta(hours=1)
    simulate_sync(db, "hubspot", {"deal": [{"id": 1, "amount": 10}, {"id": 2, "amount": 20}]}, T0)

    sync = simulate_sync(
        db,
        "hubspot",
        # id 2 changed, id 3 is new; id 3 is delivered twice and the last version wins
        {"deal": [{"id": 2, "amount": 25}, {"id": 3, "amount": 1}, {"id": 3, "amount": 30}]},
        t1,
    )

    assert sync.created == [] and sync.upserted == {"deal": 2}
    assert query(
        db, "select id, amount, _fivetran_synced, _fivetran_deleted from hubspot.deal order by id"
    ) == [(1, 10, T0, False), (2, 25, t1, False), (3, 30, t1, False)]
    assert query(db, "select max(_fivetran_synced) from hubspot.deal") == [(t1,)]


def test_a_new_column_is_added_and_deletes_are_soft(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    t1 = T0 + timedelta(minutes=5)
    simulate_sync(db, "zendesk", {"ticket": [{"id": 1, "status": "open"}, {"id": 2}]}, T0)

    sync = simulate_sync(
        db,
        "zendesk",
        {"ticket": [{"id": 3, "status": "new", "priority": "high"}]},
        t1,
        deleted={"ticket": [1]},
    )

    assert sync.deleted == {"ticket": 1} and sync.tables == ["ticket"]
    assert list(column_types(db, "zendesk", "ticket")) == [
        "id",
        "status",
        "_fivetran_synced",
        "_fivetran_deleted",
        "priority",
    ]
    assert query(
        db,
        "select id, status, priority, _fivetran_synced, _fivetran_deleted "
        "from zendesk.ticket order by id",
    ) == [
        (1, "open", None, t1, True),  # kept, flagged, stamped with the sync that saw it go
        (2, None, None, T0, False),
        (3, "new", "high", t1, False),
    ]


def test_given_column_types_win_and_keyword_table_names_work(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    simulate_sync(
        db,
        "shopify",
        {"order": [{"id": "1001", "total_price": 12}], "user": []},
        T0,
        column_types={"order": {"total_price": "DECIMAL(12, 2)", "note": "VARCHAR"}},
    )
    assert column_types(db, "shopify", "order") == {
        "id": "VARCHAR",
        "total_price": "DECIMAL(12,2)",
        "note": "VARCHAR",
        "_fivetran_synced": "TIMESTAMP WITH TIME ZONE",
        "_fivetran_deleted": "BOOLEAN",
    }
    assert query(db, 'select count(*) from shopify."user"') == [(0,)]  # created, empty


@pytest.mark.parametrize(
    ("tables", "problem"),
    [
        ({"account": [{"name": "no id"}]}, "non-null 'id'"),
        ({"account": [{"id": 1, "_fivetran_synced": T0}]}, "Fivetran's to set"),
        ({"account": [{"id": 1, "bad name": 1}]}, "not a plain identifier"),
        ({"account; drop table x": [{"id": 1}]}, "not a plain identifier"),
        ({"account": [{"id": 1, "v": 1}, {"id": 2, "v": "x"}]}, "mixed types"),
    ],
)
def test_refuses_what_fivetran_would_never_write(
    tmp_path: Path, tables: dict, problem: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=problem):
        simulate_sync(tmp_path / "w.duckdb", "salesforce", tables, T0)


def test_a_refused_sync_writes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    simulate_sync(db, "salesforce", {"account": [{"id": 1}]}, T0)
    with pytest.raises(ValueError, match="never synced"):
        simulate_sync(db, "salesforce", {"account": [{"id": 2}]}, T0, deleted={"contact": ["003x"]})
    assert query(db, "select id from salesforce.account") == [(1,)]  # one transaction


def test_writes_no_ops_rows_and_nothing_in_raw_and_postload_sees_it_only_by_watermark(
    tmp_path: Path,
) -> None:
    db = tmp_path / "warehouse.duckdb"
    pipeline = PipelineConfig.model_validate(
        {"sources": [{"name": "salesforce", "loader": {"type": "fivetran", "connector_id": "c"}}]}
    )
    warehouse = DuckDBWarehouse(db, tmp_path / "stage", pipeline)
    warehouse.ensure_schema()  # postload's raw and ops schemas, as after any flow run

    sync = simulate_sync(db, "salesforce", {"account": [{"id": 1}], "contact": [{"id": 7}]})

    assert query(db, "select count(*) from ops.load_log") == [(0,)]
    for table in ("dbt_run_results", "transform_runs", "transform_tables"):
        assert query(db, f"select count(*) from ops.{table}") == [(0,)]
    assert query(
        db, "select count(*) from information_schema.tables where table_schema = 'raw'"
    ) == [(0,)]
    assert query(
        db,
        "select table_name from information_schema.tables "
        "where table_schema = 'salesforce' order by 1",
    ) == [("account",), ("contact",)]
    tables = [
        SourceTable("salesforce", "salesforce", t, None, "salesforce", t, "_fivetran_synced")
        for t in ("account", "contact", "opportunity")  # opportunity: never synced yet
    ]
    marks = warehouse.watermarks(tables)
    assert marks[("salesforce", "account")].latest_loaded_at == sync.synced_at
    assert marks[("salesforce", "account")].pending
    assert marks[("salesforce", "opportunity")].latest_loaded_at is None


HOLD_FILE = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])
print("locked", flush=True)
sys.stdin.readline()
con.close()
"""


def test_takes_its_turn_when_another_process_holds_the_file(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    simulate_sync(db, "stripe", {"customer": [{"id": "cus_1"}]}, T0)
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_FILE, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(duckdb.IOException, match="lock"):
            simulate_sync(db, "stripe", {"customer": [{"id": "cus_2"}]}, T0, lock_timeout=0.3)

        done: list[object] = []
        waiting = threading.Thread(
            target=lambda: done.append(
                simulate_sync(db, "stripe", {"customer": [{"id": "cus_3"}]}, T0, lock_timeout=60)
            )
        )
        waiting.start()
        holder.stdin.write("\n")  # the other writer finishes
        holder.stdin.flush()
        waiting.join(timeout=60)
        assert done, "the sync did not get the file once it was free"
        assert holder.wait(timeout=30) == 0
    assert query(db, "select id from stripe.customer order by id") == [("cus_1",), ("cus_3",)]


def test_infer_column_type() -> None:
    assert infer_column_type([None, True]) == "BOOLEAN"
    assert infer_column_type([1, 2.5]) == "DOUBLE"
    assert infer_column_type([[1], {"a": 1}]) == "JSON"
    assert infer_column_type([b"\x00"]) == "BLOB"
    with pytest.raises(TypeError):
        infer_column_type([object()])
