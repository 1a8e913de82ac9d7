"""The embedded loader keeps Snowflake's COPY INTO … ON_ERROR='CONTINUE' contract."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postload.config import PipelineConfig
from postload.warehouse import LoadStatus, StageNotFoundError, WarehouseUnavailableError, _duckdb
from postload.warehouse._duckdb import _CHECKPOINT_ROWS, DuckDBWarehouse, describe_json_error

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


def test_blank_and_padded_lines_load_trimmed_in_file_order(warehouse: DuckDBWarehouse) -> None:
    """Blank lines are not parsed; CR, spaces and tabs around a line are not part of the record."""
    stage(
        warehouse,
        "a.jsonl",
        '{"id": 1}\r\n\n   \r\n\t{"id": 2} \n{"id": 3}\n\n{"id": 4}',  # no final newline
    )
    stage(warehouse, "empty.jsonl", "")
    a, empty = warehouse.load(EVENTS, None)
    assert (a.status, a.rows_parsed, a.rows_loaded) == (LoadStatus.LOADED, 4, 4)
    assert a.first_error is None
    assert (empty.status, empty.rows_parsed, empty.rows_loaded) == (LoadStatus.LOADED, 0, 0)
    # No order by: rows come back in the order they were inserted, which must be the file's.
    assert query(warehouse, "select record::varchar from raw.events") == [
        ('{"id": 1}',),
        ('{"id": 2}',),
        ('{"id": 3}',),
        ('{"id": 4}',),
    ]


def test_first_error_line_is_exact_far_into_a_file(warehouse: DuckDBWarehouse) -> None:
    """The first bad line is looked for in the first lines, then in the whole file."""
    good = "".join(f'{{"id": {i}}}\n' for i in range(12_000))
    stage(warehouse, "late.jsonl", good + "oops\n" + '{"id": "x"}\n[1]\n')
    stage(warehouse, "early.jsonl", '{"id": 0}\n\n[]\n' + good + "oops\n")
    early, late = warehouse.load(EVENTS, None)
    assert (early.first_error_line, early.rows_parsed, early.errors_seen) == (3, 12_003, 2)
    assert early.first_error == "Expected a JSON object per line, got a list"
    assert (late.first_error_line, late.rows_parsed, late.errors_seen) == (12_001, 12_003, 2)
    assert late.status is LoadStatus.PARTIALLY_LOADED
    assert query(warehouse, "select count(*) from raw.events") == [(24_002,)]


def test_a_bad_line_past_the_first_lines_read_again_is_found_in_the_whole_file(
    warehouse: DuckDBWarehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file with no blank line is checked for its first bad line in its first whole lines (its
    first 64 KiB), then as a whole; a line cut by that boundary is never judged on its own."""
    monkeypatch.setattr(_duckdb, "_HEAD_BYTES", 64)
    good = "".join(f'{{"id": {i}}}\n' for i in range(20))  # 10-11 bytes a line
    stage(warehouse, "late.jsonl", good + "oops\n" + '{"id": "x"}\r\n' + "[1]")
    stage(warehouse, "early.jsonl", '{"id": 0}\n[]\n' + good)
    stage(warehouse, "long.jsonl", '{"id": "' + "x" * 100 + '"}\n{"id": 2, \n')
    early, late, long = warehouse.load(EVENTS, None)
    assert (early.first_error_line, early.rows_parsed, early.errors_seen) == (2, 22, 1)
    assert (late.first_error_line, late.rows_parsed, late.errors_seen) == (21, 23, 2)
    assert (long.first_error_line, long.rows_parsed, long.errors_seen) == (2, 2, 1)


_GOOD_LINES = st.dictionaries(st.sampled_from("abc"), st.integers(0, 9), max_size=2).map(json.dumps)
_BAD_LINES = st.sampled_from(["oops", "[1, 2]", '"text"', "{", '{"a": }', "42", "null", "{}}"])
_BLANK_LINES = st.sampled_from(["", " ", "\t", "\r", " \r", "\t \t"])
_PADDING = st.sampled_from(["", " ", "\t", "\r"])


@pytest.fixture(scope="module")
def one_warehouse(tmp_path_factory: pytest.TempPathFactory) -> DuckDBWarehouse:
    """One warehouse for every example: a fresh one each costs more than the load tested."""
    root = tmp_path_factory.mktemp("line_by_line")
    (root / "stage" / "events").mkdir(parents=True)
    wh = DuckDBWarehouse(root / "w.duckdb", root / "stage", CONFIG)
    wh.ensure_schema()
    return wh


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(
        st.tuples(st.one_of(_GOOD_LINES, _BAD_LINES, _BLANK_LINES), _PADDING, _PADDING),
        max_size=12,
    ),
    final_newline=st.booleans(),
    head_bytes=st.sampled_from([1, 16, 48, 1 << 20]),
)
def test_counts_and_first_error_match_a_line_by_line_reading(
    one_warehouse: DuckDBWarehouse,
    lines: list[tuple[str, str, str]],
    final_newline: bool,
    head_bytes: int,
) -> None:
    """Whichever way the loader finds them (the first whole lines, or the whole file again)."""
    pieces = [before + line + after for line, before, after in lines]
    text = "\n".join(pieces) + ("\n" if final_newline and pieces else "")
    kept = [p.strip(" \t\r") for p in pieces]
    parsed = [(n, p) for n, p in enumerate(kept, start=1) if p]
    bad = [n for n, p in parsed if not isinstance(_json_or_none(p), dict)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_duckdb, "_HEAD_BYTES", head_bytes)
        # a name of its own: the file is new to the warehouse whatever its content
        path = stage(one_warehouse, f"{uuid.uuid4().hex}.jsonl", text)
        try:
            (result,) = one_warehouse.load(EVENTS, None)
        finally:
            path.unlink()
    assert (result.rows_parsed, result.errors_seen) == (len(parsed), len(bad))
    assert result.rows_loaded == len(parsed) - len(bad)
    assert result.first_error_line == (bad[0] if bad else None)


def _json_or_none(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def test_file_names_are_not_glob_patterns(warehouse: DuckDBWarehouse) -> None:
    stage(warehouse, "a[1].jsonl", '{"id": "bracket"}\n')
    stage(warehouse, "a1.jsonl", '{"id": "plain"}\n')
    stage(warehouse, "b*.jsonl", '{"id": "star"}\n')
    stage(warehouse, "b2.jsonl", '{"id": "two"}\n')
    assert [r.rows_loaded for r in warehouse.load(EVENTS, None)] == [1, 1, 1, 1]
    assert query(warehouse, "select _file, record->>'id' from raw.events order by 1") == [
        ("a1.jsonl", "plain"),
        ("a[1].jsonl", "bracket"),
        ("b*.jsonl", "star"),
        ("b2.jsonl", "two"),
    ]


def test_load_puts_duckdb_settings_back(warehouse: DuckDBWarehouse) -> None:
    """One DuckDB thread, big files checkpointed at commit: database-wide settings, restored."""
    stage(warehouse, "big.jsonl", "".join(f'{{"id": {i}}}\n' for i in range(_CHECKPOINT_ROWS)))
    stage(warehouse, "small.jsonl", '{"id": 1}\n')
    settings = "select current_setting('threads'), current_setting('checkpoint_threshold')"
    # A second connection keeps the database (and its settings) open across the load.
    with duckdb.connect(str(warehouse.path)) as held:
        before = held.execute(settings).fetchone()
        big, small = warehouse.load(EVENTS, None)
        assert held.execute(settings).fetchone() == before
    assert (big.rows_loaded, small.rows_loaded) == (_CHECKPOINT_ROWS, 1)


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
