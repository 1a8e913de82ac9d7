"""The embedded loader keeps Snowflake's COPY INTO … ON_ERROR='CONTINUE' contract."""

from __future__ import annotations

import threading
from pathlib import Path

import duckdb
import pytest

from postload.config import PipelineConfig
from postload.warehouse import LoadStatus, StageNotFoundError, WarehouseUnavailableError
from postload.warehouse._duckdb import DuckDBWarehouse, describe_json_error

CONFIG = PipelineConfig.model_validate(
    {"sources": [{"name": "events", "raw_table": "events", "stage": "events"}]}
)
EVENTS = CONFIG.source("events")


@pytest.fixture
def warehouse(tmp_path: Path) -> DuckDBWarehouse:
    (tmp_path / "stage" / "events").mkdir(parents=True)
    wh = DuckDBWarehouse(tmp_path / "w.duckdb", tmp_path / "stage", CONFIG)
    wh.ensure_schema()
    return wh


def stage(wh: DuckDBWarehouse, name: str, text: str) -> Path:
    path = wh.stage_root / "events" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def query(wh: DuckDBWarehouse, sql: str) -> list[tuple]:
    with wh.connect() as con:
        return con.execute(sql).fetchall()


def test_malformed_lines_are_counted_and_the_rest_loaded(warehouse: DuckDBWarehouse) -> None:
    stage(
        warehouse,
        "a.jsonl",
        '{"id": 1}\n{"id": 2, \n\n[1, 2]\n{"id": "unicodé ✓"}\r\n"just a string"\n',
    )
    (result,) = warehouse.load(EVENTS, "run-1")
    assert result.status is LoadStatus.PARTIALLY_LOADED
    assert (result.rows_parsed, result.rows_loaded, result.errors_seen) == (5, 2, 3)
    assert result.first_error_line == 2
    assert result.first_error.startswith("Error parsing JSON")
    rows = query(warehouse, "select record->>'id', _file from raw.events order by 1")
    assert rows == [("1", "a.jsonl"), ("unicodé ✓", "a.jsonl")]
    log = query(
        warehouse,
        "select source, file, status, rows_loaded, errors_seen, flow_run_id from ops.load_log",
    )
    assert log == [("events", "a.jsonl", "PARTIALLY_LOADED", 2, 3, "run-1")]


def test_rerun_loads_nothing_twice(warehouse: DuckDBWarehouse) -> None:
    stage(warehouse, "a.jsonl", '{"id": 1}\n{"id": 2}\n')
    assert [r.status for r in warehouse.load(EVENTS, None)] == [LoadStatus.LOADED]
    assert warehouse.load(EVENTS, None) == []
    stage(warehouse, "sub/b.jsonl", '{"id": 3}\n')
    (second,) = warehouse.load(EVENTS, None)
    assert second.file == "sub/b.jsonl"
    assert query(warehouse, "select count(*) from raw.events") == [(3,)]


def test_changed_file_with_same_name_is_loaded_again(warehouse: DuckDBWarehouse) -> None:
    """Snowflake's load metadata keys on the file's checksum too, not only its name."""
    stage(warehouse, "a.jsonl", '{"id": 1}\n')
    warehouse.load(EVENTS, None)
    stage(warehouse, "a.jsonl", '{"id": 1}\n{"id": 2}\n')
    (again,) = warehouse.load(EVENTS, None)
    assert again.rows_loaded == 2


def test_file_with_no_good_line_fails_and_is_retried_next_time(warehouse: DuckDBWarehouse) -> None:
    stage(warehouse, "bad.jsonl", "oops\n{\n")
    (result,) = warehouse.load(EVENTS, None)
    assert result.status is LoadStatus.LOAD_FAILED
    assert result.rows_loaded == 0
    # LOAD_FAILED is not "loaded": the next COPY tries the file again, as Snowflake does.
    assert [r.status for r in warehouse.load(EVENTS, None)] == [LoadStatus.LOAD_FAILED]


def test_hidden_files_are_not_loaded_and_empty_stage_is_quiet(warehouse: DuckDBWarehouse) -> None:
    assert warehouse.load(EVENTS, None) == []
    stage(warehouse, ".partial.jsonl", '{"id": 1}\n')
    assert warehouse.load(EVENTS, None) == []


def test_missing_stage_folder_is_a_clear_error(tmp_path: Path) -> None:
    wh = DuckDBWarehouse(tmp_path / "w.duckdb", tmp_path / "nowhere", CONFIG)
    wh.ensure_schema()
    with pytest.raises(
        StageNotFoundError,
        match=r"stage folder for source 'events' does not exist: .*nowhere/events",
    ):
        wh.load(EVENTS, None)


def test_locked_file_is_a_transient_error(warehouse: DuckDBWarehouse, tmp_path: Path) -> None:
    """Another process holding the DuckDB write lock surfaces as WarehouseUnavailableError."""
    import subprocess
    import sys

    stage(warehouse, "a.jsonl", '{"id": 1}\n')
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); sys.stdin.read()",
            str(warehouse.path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WarehouseUnavailableError, match="is unavailable"):
            warehouse.load(EVENTS, None)
    finally:
        holder.communicate("", timeout=30)


def test_a_failed_file_leaves_no_partial_rows(
    warehouse: DuckDBWarehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage(warehouse, "a.jsonl", '{"id": 1}\n')
    stage(warehouse, "b.jsonl", '{"id": 2}\n')
    original = DuckDBWarehouse._load_file
    calls = threading.local()

    def fail_on_second(self, con, source, table, path, name, md5, flow_run_id):  # type: ignore[no-untyped-def]
        calls.n = getattr(calls, "n", 0) + 1
        if calls.n == 2:
            con.execute("begin transaction")
            con.execute("insert into raw.events values ('{}', 'b.jsonl', now())")
            con.execute("rollback")
            raise duckdb.IOException("disk went away")
        return original(self, con, source, table, path, name, md5, flow_run_id)

    monkeypatch.setattr(DuckDBWarehouse, "_load_file", fail_on_second)
    with pytest.raises(duckdb.IOException):
        warehouse.load(EVENTS, None)
    monkeypatch.setattr(DuckDBWarehouse, "_load_file", original)
    # the retry loads only what the failed attempt did not
    assert [r.file for r in warehouse.load(EVENTS, None)] == ["b.jsonl"]
    assert query(warehouse, "select count(*) from raw.events") == [(2,)]


def test_ensure_schema_is_idempotent_and_view_answers(warehouse: DuckDBWarehouse) -> None:
    warehouse.ensure_schema()
    assert warehouse.pipeline_status() == []
    assert ("ops", "pipeline_status") in warehouse.relations()


def test_first_error_never_echoes_line_content() -> None:
    message = describe_json_error('{"ssn": "123-45-6789", oops}')
    assert "123-45-6789" not in message
    assert describe_json_error("[1]") == "Expected a JSON object per line, got a list"
