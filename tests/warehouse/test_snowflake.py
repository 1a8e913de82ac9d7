"""SnowflakeWarehouse on fakesnow, through the real prefect-snowflake connector and credentials.

fakesnow 0.12.1 cannot run the production COPY as written; ``fakesnow_copy_gaps`` fills exactly
its three gaps (see the fixture) while the SQL text sent through the connector stays the real one.
No Prefect server is needed: the blocks are built in memory, never saved or loaded.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePath
from typing import Any

import fakesnow
import fakesnow.copy_into as fs_copy_into
import fakesnow.cursor as fs_cursor
import fakesnow.transforms.stage as fs_stage
import pytest
import snowflake.connector
import snowflake.connector.errors as sf_errors
from prefect_snowflake import SnowflakeConnector, SnowflakeCredentials
from snowflake.connector import DictCursor
from sqlglot import exp

from postload.config import PipelineConfig
from postload.warehouse import LoadStatus, NodeResult, TransformRecord, WarehouseUnavailableError
from postload.warehouse._duckdb import DuckDBWarehouse
from postload.warehouse._snowflake import (
    CopyResultError,
    SnowflakeWarehouse,
    copy_sql,
    is_transient,
    parse_copy_result,
)
from tests.conftest import suite_secret

# fakesnow's own DuckDB calls warn; nothing postload can act on
pytestmark = pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result:UserWarning")

PASSWORD = suite_secret("Snowflake: password", "p-secret-123")

PIPELINE = PipelineConfig.model_validate(
    {
        "sources": [
            {"name": "events", "raw_table": "events", "stage": "events"},
            {"name": "orders", "raw_table": "orders", "stage": "orders_stage"},
        ]
    }
)
EVENTS = PIPELINE.source("events")


def make_connector() -> SnowflakeConnector:
    return SnowflakeConnector(
        credentials=SnowflakeCredentials(account="acct", user="u", password=PASSWORD),
        database="DB",
        warehouse="WH",
        schema="RAW",
    )


class CountingFactory:
    """A connector factory that remembers every connector it handed out."""

    def __init__(self) -> None:
        self.made: list[SnowflakeConnector] = []

    def __call__(self) -> SnowflakeConnector:
        connector = make_connector()
        self.made.append(connector)
        return connector


# -- fakesnow ---------------------------------------------------------------------------------


class CopyGaps:
    """What the shim had to fill in, so tests can see the real SQL reached fakesnow."""

    def __init__(self) -> None:
        self.on_error: list[str] = []
        self.dollar_one = 0
        self.metadata_filename = 0


def _stage_relative(url: str) -> str:
    # fakesnow keeps an internal stage at <bucket>/<DB>/<SCHEMA>/<STAGE>/<path in stage>
    _db, _schema, _stage, *path = PurePath(url).relative_to(fs_stage.LOCAL_BUCKET_PATH).parts
    return "/".join(path)


def _is_metadata_filename(node: exp.Expr) -> bool:
    return isinstance(node, exp.Column) and node.name.upper() == "METADATA$FILENAME"


@pytest.fixture
def fakesnow_copy_gaps(monkeypatch: pytest.MonkeyPatch) -> CopyGaps:
    """Teach fakesnow 0.12.1 the three parts of the production COPY it lacks.

    1. ``ON_ERROR='CONTINUE'``: fakesnow implements only ABORT_STATEMENT (anything else raises
       "ON_ERROR 'CONTINUE' not implemented"). It never rejects rows, so the option is dropped.
    2. Bare ``$1`` in a COPY transformation: fakesnow only rewrites ``$1:key`` and crashes with
       AttributeError on a bare ``$1``. Its JSON reader (read_json_objects) names the column
       ``json``, so ``$1`` becomes that column.
    3. ``METADATA$FILENAME``: not emulated (DuckDB binder error); it becomes the file's path
       within the stage, per file, as Snowflake documents for internal stages.
    """
    gaps = CopyGaps()
    real_copy_into = fs_copy_into.copy_into
    real_inserts = fs_copy_into._inserts
    dollar_one = exp.Parameter(this=exp.Literal(this="1", is_string=False))

    def bare_dollar_one(node: exp.Expr) -> exp.Expr:
        if node == dollar_one and not isinstance(node.parent, exp.JSONExtract):
            gaps.dollar_one += 1
            return exp.column("json")
        return node

    def copy_into(duck_conn, current_database, current_schema, expr, table_stages, params=None):
        expr = expr.copy()
        kept = []
        for param in expr.args.get("params") or []:
            if param.this.name.upper() == "ON_ERROR":
                gaps.on_error.append(param.expression.name.upper())
            else:
                kept.append(param)
        expr.set("params", kept)
        expr = expr.transform(bare_dollar_one)
        return real_copy_into(
            duck_conn, current_database, current_schema, expr, table_stages, params
        )

    def inserts(expr, params, urls, parquet_info=None):
        def per_file(insert: exp.Expr, url: str) -> exp.Expr:
            def fill(node: exp.Expr) -> exp.Expr:
                if _is_metadata_filename(node):
                    gaps.metadata_filename += 1
                    return exp.Literal.string(_stage_relative(url))
                return node

            return insert.transform(fill)

        built = real_inserts(expr, params, urls, parquet_info)
        return [per_file(insert, url) for insert, url in zip(built, urls, strict=True)]

    monkeypatch.setattr(fs_cursor, "copy_into", copy_into)
    monkeypatch.setattr(fs_copy_into, "_inserts", inserts)
    return gaps


@pytest.fixture
def fake_snowflake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """fakesnow patched into snowflake.connector.connect (what SnowflakeCredentials calls).

    Internal stages live in a per-test bucket so staged files never leak between tests.
    """
    bucket = tmp_path / "fakesnow_bucket"
    bucket.mkdir()
    monkeypatch.setattr(fs_stage, "LOCAL_BUCKET_PATH", str(bucket))
    with fakesnow.patch():
        yield


@pytest.fixture
def factory() -> CountingFactory:
    return CountingFactory()


@pytest.fixture
def warehouse(
    fake_snowflake: None, fakesnow_copy_gaps: CopyGaps, factory: CountingFactory
) -> SnowflakeWarehouse:
    wh = SnowflakeWarehouse(factory, PIPELINE)
    wh.ensure_schema()
    return wh


def query(sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Read through a connector of its own, with lower-cased keys."""
    with make_connector() as connector:
        rows = connector.fetch_all(sql, params, cursor_type=DictCursor)
    return [{k.lower(): v for k, v in row.items()} for row in rows]


def put(path: Path, stage: str) -> None:
    with make_connector() as connector:
        connector.fetch_all(f"PUT file://{path} @{stage}")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# -- 1. ensure_schema -------------------------------------------------------------------------


def test_relations_lists_tables_for_the_missing_parents_check(
    fake_snowflake: None, factory: CountingFactory
) -> None:
    wh = SnowflakeWarehouse(factory, PIPELINE)
    wh.ensure_schema()
    relations = wh.relations()
    # fakesnow's information_schema.tables omits views; real Snowflake lists them too.
    assert {("raw", "events"), ("ops", "load_log"), ("ops", "transform_runs")} <= relations


def test_ensure_schema_is_idempotent_and_creates_everything(
    fake_snowflake: None, factory: CountingFactory
) -> None:
    wh = SnowflakeWarehouse(factory, PIPELINE)
    assert wh.kind == "snowflake"
    assert wh.location == "snowflake://acct/DB"
    assert PASSWORD not in wh.location

    wh.ensure_schema()
    wh.ensure_schema()

    tables = {
        (r["table_schema"], r["table_name"], r["table_type"])
        for r in query(
            "select table_schema, table_name, table_type from information_schema.tables "
            "where table_schema in ('RAW', 'OPS')"
        )
    }
    assert {
        ("RAW", "EVENTS", "BASE TABLE"),
        ("RAW", "ORDERS", "BASE TABLE"),
        ("OPS", "LOAD_LOG", "BASE TABLE"),
        ("OPS", "DBT_RUN_RESULTS", "BASE TABLE"),
        ("OPS", "TRANSFORM_RUNS", "BASE TABLE"),
    } <= tables
    # fakesnow leaves views out of information_schema.tables; the view answers (empty) instead
    assert query("select * from ops.pipeline_status") == []

    columns = query(
        "select column_name, data_type from information_schema.columns "
        "where table_schema = 'RAW' and table_name = 'EVENTS' order by ordinal_position"
    )
    assert [(c["column_name"], c["data_type"]) for c in columns] == [
        ("RECORD", "VARIANT"),
        ("_FILE", "TEXT"),
        ("_LOADED_AT", "TIMESTAMP_NTZ"),
    ]

    # both named stages exist in the raw schema (LIST fails on a missing stage)
    assert query("list @raw.events") == []
    assert query("list @raw.orders_stage") == []

    # one fresh connector per operation, each closed afterwards
    assert len(factory.made) == 3  # location probe + two ensure_schema calls
    assert all(c._connection is None for c in factory.made)


# -- 2. load ----------------------------------------------------------------------------------


def test_load_copies_each_staged_file_once_and_logs_it(
    warehouse: SnowflakeWarehouse, fakesnow_copy_gaps: CopyGaps, tmp_path: Path
) -> None:
    put(write_jsonl(tmp_path / "a.jsonl", [{"id": 1}, {"id": 2}]), "raw.events")
    put(write_jsonl(tmp_path / "b.jsonl", [{"id": 3}, {"id": 4}, {"id": 5}]), "raw.events")
    before = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=1)  # naive UTC, as logged

    results = warehouse.load(EVENTS, "flow-run-1")

    # the production COPY reached fakesnow with all three parts it had to be taught
    assert fakesnow_copy_gaps.on_error == ["CONTINUE"]
    assert fakesnow_copy_gaps.dollar_one == 1
    assert fakesnow_copy_gaps.metadata_filename == 2  # once per file

    # one LOADED result per file, with its row counts (file names as COPY reports them)
    assert sorted(
        (r.file, r.status, r.rows_parsed, r.rows_loaded, r.errors_seen) for r in results
    ) == [
        ("events/a.jsonl.gz", LoadStatus.LOADED, 2, 2, 0),
        ("events/b.jsonl.gz", LoadStatus.LOADED, 3, 3, 0),
    ]

    rows = query("select record, _file, _loaded_at from raw.events")
    assert len(rows) == 5
    assert {r["_file"] for r in rows} == {"a.jsonl.gz", "b.jsonl.gz"}
    assert len({r["_loaded_at"] for r in rows}) == 1

    log = query("select * from ops.load_log order by file")
    assert [(r["file"], r["status"], r["rows_parsed"], r["rows_loaded"]) for r in log] == [
        ("events/a.jsonl.gz", "LOADED", 2, 2),
        ("events/b.jsonl.gz", "LOADED", 3, 3),
    ]
    for r in log:
        assert r["source"] == "events"
        assert r["table_name"] == "raw.events"
        assert r["flow_run_id"] == "flow-run-1"
        assert r["file_md5"] is None
        assert r["errors_seen"] == 0
        # the log's loaded_at is the very value stamped on the raw rows
        assert r["loaded_at"] == rows[0]["_loaded_at"]
        assert r["loaded_at"] >= before
    assert warehouse.latest_load_at(EVENTS) == rows[0]["_loaded_at"]
    assert warehouse.latest_load_at(PIPELINE.source("orders")) is None

    # a re-run (e.g. a task retry) loads nothing twice: fakesnow answers LOAD_SKIPPED rows
    assert warehouse.load(EVENTS, "flow-run-2") == []
    assert len(query("select * from raw.events")) == 5
    assert len(query("select * from ops.load_log")) == 2

    # a file staged later is the only one loaded next time
    put(write_jsonl(tmp_path / "c.jsonl", [{"id": 6}]), "raw.events")
    [new] = warehouse.load(EVENTS, "flow-run-3")
    assert (new.file, new.status, new.rows_loaded) == ("events/c.jsonl.gz", LoadStatus.LOADED, 1)
    assert len(query("select * from raw.events")) == 6


def test_load_with_an_empty_stage_returns_nothing(warehouse: SnowflakeWarehouse) -> None:
    assert warehouse.load(EVENTS, None) == []
    assert query("select * from ops.load_log") == []


def test_load_rolls_back_the_copy_when_the_log_insert_fails(
    warehouse: SnowflakeWarehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(write_jsonl(tmp_path / "a.jsonl", [{"id": 1}]), "raw.events")

    def broken_execute_many(self: SnowflakeConnector, operation: str, seq_of_parameters: list):
        raise sf_errors.ProgrammingError(msg="boom", errno=2003, sqlstate="42S02")

    with monkeypatch.context() as m:
        m.setattr(SnowflakeConnector, "execute_many", broken_execute_many)
        with pytest.raises(sf_errors.ProgrammingError):
            warehouse.load(EVENTS, None)

    # nothing committed: neither rows nor Snowflake's load metadata, so the retry loads the file
    assert query("select * from raw.events") == []
    [result] = warehouse.load(EVENTS, None)
    assert result.rows_loaded == 1
    assert len(query("select * from ops.load_log")) == 1


def test_sql_errors_are_not_turned_into_unavailable(
    fake_snowflake: None, fakesnow_copy_gaps: CopyGaps, factory: CountingFactory
) -> None:
    wh = SnowflakeWarehouse(factory, PIPELINE)
    # no ensure_schema: the stage does not exist, a compilation error that retrying cannot fix
    with pytest.raises(sf_errors.ProgrammingError) as info:
        wh.load(EVENTS, None)
    assert not isinstance(info.value, WarehouseUnavailableError)


def test_copy_sql_is_the_real_snowflake_statement() -> None:
    assert copy_sql("raw", "events", "events") == (
        "COPY INTO raw.events (record, _file, _loaded_at) "
        "FROM (SELECT $1, METADATA$FILENAME, %(loaded_at)s::TIMESTAMP_NTZ FROM @raw.events/) "
        "FILE_FORMAT = (TYPE = 'JSON') ON_ERROR = 'CONTINUE'"
    )
    with pytest.raises(ValueError, match="not a plain identifier"):
        copy_sql("raw", "events; drop table x", "events")


# -- 3. parse_copy_result on real Snowflake replies --------------------------------------------

# Rows as Snowflake returns them through a DictCursor for
# COPY INTO … FILE_FORMAT=(TYPE='JSON') ON_ERROR='CONTINUE' (documented column names).
SNOWFLAKE_PARTIALLY_LOADED = {
    "FILE": "events/2024-06-01T10.jsonl.gz",
    "STATUS": "PARTIALLY_LOADED",
    "ROWS_PARSED": 50,
    "ROWS_LOADED": 48,
    "ERROR_LIMIT": 50,
    "ERRORS_SEEN": 2,
    "FIRST_ERROR": "Error parsing JSON: incomplete object value",
    "FIRST_ERROR_LINE": 7,
    "FIRST_ERROR_CHARACTER": 14,
    "FIRST_ERROR_COLUMN_NAME": '"EVENTS"["RECORD":1]',
}
SNOWFLAKE_LOAD_FAILED = {
    "FILE": "events/2024-06-01T11.jsonl.gz",
    "STATUS": "LOAD_FAILED",
    "ROWS_PARSED": 0,
    "ROWS_LOADED": 0,
    "ERROR_LIMIT": 1,
    "ERRORS_SEEN": 1,
    "FIRST_ERROR": "Invalid data encountered during decompression for file: "
    "'2024-06-01T11.jsonl.gz',compression type used: 'GZIP', cause: 'data error'",
    "FIRST_ERROR_LINE": 1,
    "FIRST_ERROR_CHARACTER": 1,
    "FIRST_ERROR_COLUMN_NAME": None,
}
SNOWFLAKE_LOADED = {
    "FILE": "events/2024-06-01T12.jsonl.gz",
    "STATUS": "LOADED",
    "ROWS_PARSED": 10,
    "ROWS_LOADED": 10,
    "ERROR_LIMIT": 10,
    "ERRORS_SEEN": 0,
    "FIRST_ERROR": None,
    "FIRST_ERROR_LINE": None,
    "FIRST_ERROR_CHARACTER": None,
    "FIRST_ERROR_COLUMN_NAME": None,
}
SNOWFLAKE_NOTHING_NEW = {"status": "Copy executed with 0 files processed."}


def test_parse_copy_result_reads_snowflake_rows() -> None:
    partial, failed, loaded = parse_copy_result(
        [SNOWFLAKE_PARTIALLY_LOADED, SNOWFLAKE_LOAD_FAILED, SNOWFLAKE_LOADED]
    )

    assert partial.file == "events/2024-06-01T10.jsonl.gz"
    assert partial.status is LoadStatus.PARTIALLY_LOADED
    assert (partial.rows_parsed, partial.rows_loaded, partial.errors_seen) == (50, 48, 2)
    assert partial.rows_rejected == 2
    assert partial.first_error == "Error parsing JSON: incomplete object value"
    assert partial.first_error_line == 7

    assert failed.status is LoadStatus.LOAD_FAILED
    assert (failed.rows_parsed, failed.rows_loaded, failed.errors_seen) == (0, 0, 1)
    assert failed.first_error.startswith("Invalid data encountered during decompression")
    assert failed.first_error_line == 1

    assert loaded.status is LoadStatus.LOADED
    assert (loaded.rows_loaded, loaded.errors_seen, loaded.first_error) == (10, 0, None)
    assert loaded.first_error_line is None


def test_parse_copy_result_nothing_new_and_skipped() -> None:
    assert parse_copy_result([SNOWFLAKE_NOTHING_NEW]) == []
    assert parse_copy_result([{"STATUS": "Copy executed with 0 files processed."}]) == []
    assert parse_copy_result([]) == []
    fakesnow_rerun = {
        "file": "events/a.jsonl.gz",
        "status": "LOAD_SKIPPED",
        "rows_parsed": 0,
        "rows_loaded": 0,
        "error_limit": None,
        "errors_seen": 1,
        "first_error": "File was loaded before.",
        "first_error_line": None,
        "first_error_character": None,
        "first_error_column_name": None,
    }
    assert parse_copy_result([fakesnow_rerun]) == []


def test_parse_copy_result_accepts_lower_case_keys() -> None:
    lower = {k.lower(): v for k, v in SNOWFLAKE_PARTIALLY_LOADED.items()}
    assert parse_copy_result([lower]) == parse_copy_result([SNOWFLAKE_PARTIALLY_LOADED])


def test_parse_copy_result_refuses_what_it_does_not_know() -> None:
    with pytest.raises(CopyResultError, match="LOAD_IN_PROGRESS"):
        parse_copy_result([{**SNOWFLAKE_LOADED, "STATUS": "LOAD_IN_PROGRESS"}])
    with pytest.raises(CopyResultError, match="without a file"):
        parse_copy_result([{"status": "Something else happened."}])


# -- 4. record_transform + pipeline_status ------------------------------------------------------


def transform_record(source: str, covers: datetime | None, completed: datetime) -> TransformRecord:
    return TransformRecord(
        flow_run_id="flow-run-9",
        source=source,
        selection="--selector events_pipeline",
        runner="core",
        status="success",
        started_at=completed - timedelta(minutes=1),
        completed_at=completed,
        covers_loaded_at=covers,
        nodes=[
            NodeResult(
                unique_id="model.postload.stg_events",
                name="stg_events",
                resource_type="model",
                status="success",
                started_at=completed - timedelta(seconds=50),
                completed_at=completed - timedelta(seconds=10),
                execution_time_s=40.0,
                rows_affected=5,
                message="OK",
            ),
            NodeResult(
                unique_id="test.postload.not_null_stg_events_id",
                name="not_null_stg_events_id",
                resource_type="test",
                status="fail",
                message="Got 1 result",
            ),
        ],
        invocation_id="inv-1",
    )


def test_record_transform_and_pipeline_status_match_duckdb(
    warehouse: SnowflakeWarehouse, tmp_path: Path
) -> None:
    put(write_jsonl(tmp_path / "a.jsonl", [{"id": 1}, {"id": 2}]), "raw.events")
    warehouse.load(EVENTS, "flow-run-1")
    loaded_at = warehouse.latest_load_at(EVENTS)
    assert loaded_at is not None
    completed = loaded_at + timedelta(minutes=3)

    warehouse.record_transform(transform_record("events", loaded_at, completed))

    runs = query("select * from ops.transform_runs")
    assert [(r["source"], r["status"], r["nodes_ok"], r["nodes_failed"]) for r in runs] == [
        ("events", "success", 1, 1)
    ]
    nodes = query("select * from ops.dbt_run_results order by unique_id")
    assert [(n["name"], n["status"], n["invocation_id"]) for n in nodes] == [
        ("stg_events", "success", "inv-1"),
        ("not_null_stg_events_id", "fail", "inv-1"),
    ]

    [status] = warehouse.pipeline_status()

    duck = DuckDBWarehouse(tmp_path / "wh.duckdb", tmp_path / "stage", PIPELINE)
    duck.ensure_schema()
    duck.record_transform(transform_record("events", loaded_at, completed))
    [duck_status] = duck.pipeline_status()

    assert list(status) == list(duck_status)  # same columns, same order, lower-case keys
    assert status["source"] == "events"
    assert status["last_loaded_at"] == loaded_at
    assert status["rows_loaded"] == 2
    assert status["rows_rejected"] == 0
    assert status["files_loaded"] == 1
    assert status["last_transformed_at"] == completed
    assert status["transform_status"] == "success"
    assert (status["nodes_ok"], status["nodes_failed"]) == (1, 1)
    assert status["load_to_transform_minutes"] == pytest.approx(3.0)
    assert status["awaiting_transform"] is False


def test_an_ops_schema_made_before_the_dbt_cloud_columns_gains_them_and_keeps_its_rows(
    fake_snowflake: None, factory: CountingFactory, tmp_path: Path
) -> None:
    completed = datetime(2026, 12, 1, 9, 30)
    old_shape = (
        "create table ops.transform_runs (flow_run_id varchar, source varchar, "
        "selection varchar, runner varchar, status varchar, started_at timestamp, "
        "completed_at timestamp, covers_loaded_at timestamp, nodes_ok bigint, "
        "nodes_failed bigint, message varchar)"
    )
    old_row = (
        "insert into ops.transform_runs (flow_run_id, source, status, completed_at) "
        "values ('flow-run-1', 'orders', 'success', '2026-11-30 08:00:00')"
    )
    cloud = dataclasses.replace(
        transform_record("events", None, completed),
        runner="cloud",
        dbt_cloud_run_id=9001,
        dbt_cloud_run_url="https://cloud.getdbt.com/deploy/1/projects/6/runs/9001/",
    )
    duck = DuckDBWarehouse(tmp_path / "wh.duckdb", tmp_path / "stage", PIPELINE)
    with duck.connect() as con:
        con.execute("create schema ops")
        con.execute(old_shape)
        con.execute(old_row)
    with make_connector() as connector:
        for statement in ("create schema if not exists ops", old_shape, old_row):
            connector.fetch_all(statement)

    snow = SnowflakeWarehouse(factory, PIPELINE)
    for wh in (snow, duck):
        wh.ensure_schema()
        wh.ensure_schema()  # twice: the columns are added once
        wh.record_transform(cloud)
    runs_sql = (
        "select source, dbt_cloud_run_id, dbt_cloud_run_url from ops.transform_runs order by source"
    )
    expected = [
        ("events", 9001, "https://cloud.getdbt.com/deploy/1/projects/6/runs/9001/"),
        ("orders", None, None),
    ]
    assert [tuple(r.values()) for r in query(runs_sql)] == expected
    with duck.connect() as con:
        assert con.execute(runs_sql).fetchall() == expected
    for wh in (snow, duck):
        latest = {r["source"]: r["last_dbt_cloud_run_url"] for r in wh.pipeline_status()}
        assert latest == {"events": expected[0][2], "orders": None}


# -- 5. transient failures ----------------------------------------------------------------------


def _all_text(exc: BaseException) -> str:
    """Every message and traceback line this failure could print, chain included."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        parts += [str(node), repr(node), *(str(a) for a in node.args)]
        parts += [str(getattr(node, a, "")) for a in ("msg", "raw_msg", "query")]
        stack += [node.__cause__, node.__context__]
    return "\n".join(parts)


def _refuse_connection(message: str) -> Callable[..., Any]:
    def connect(**kwargs: Any) -> Any:
        assert kwargs["password"] == PASSWORD  # the credentials really were passed through
        raise sf_errors.OperationalError(msg=message, errno=250001, sqlstate="08001")

    return connect


@pytest.mark.parametrize(
    "driver_message",
    [
        "Could not connect to Snowflake backend after 2 attempt(s).Aborting",
        # a driver that echoed its connect arguments must not leak them either
        f"Failed to connect to DB: acct.snowflakecomputing.com:443 (password={PASSWORD})",
    ],
    ids=["driver-message", "driver-echoes-password"],
)
def test_connection_failure_is_unavailable_without_the_password(
    monkeypatch: pytest.MonkeyPatch, factory: CountingFactory, driver_message: str
) -> None:
    monkeypatch.setattr(snowflake.connector, "connect", _refuse_connection(driver_message))
    wh = SnowflakeWarehouse(factory, PIPELINE)

    for operation in (
        wh.ensure_schema,
        lambda: wh.load(EVENTS, None),
        wh.pipeline_status,
        lambda: wh.latest_load_at(EVENTS),
        lambda: wh.record_transform(transform_record("events", None, datetime(2024, 1, 1))),
    ):
        with pytest.raises(WarehouseUnavailableError) as info:
            operation()
        exc = info.value
        assert isinstance(exc.__cause__, sf_errors.OperationalError)  # chained
        assert "snowflake://acct/DB" in str(exc)
        assert "250001" in str(exc)
        assert PASSWORD not in _all_text(exc)


def test_transient_classification() -> None:
    def err(cls: type[sf_errors.Error], errno: int, sqlstate: str) -> sf_errors.Error:
        return cls(msg="x", errno=errno, sqlstate=sqlstate)

    assert is_transient(err(sf_errors.OperationalError, 250001, "08001"))
    assert is_transient(err(sf_errors.InterfaceError, 250002, "08003"))
    assert is_transient(err(sf_errors.DatabaseError, 250001, "08001"))
    assert is_transient(sf_errors.ServiceUnavailableError())
    assert is_transient(ConnectionResetError())
    # rejected credentials: retrying cannot help
    assert not is_transient(err(sf_errors.DatabaseError, 390100, "28000"))
    assert not is_transient(err(sf_errors.DatabaseError, 390100, "08001"))
    # SQL errors are never "unavailable"
    assert not is_transient(err(sf_errors.ProgrammingError, 2003, "42S02"))
    assert not is_transient(err(sf_errors.ProgrammingError, 1003, "42000"))
    assert not is_transient(err(sf_errors.IntegrityError, 100072, "22000"))
    assert not is_transient(ValueError("x"))


# -- from_block -----------------------------------------------------------------------------------


def test_from_block_gives_each_operation_a_fresh_connector(
    fake_snowflake: None,
    fakesnow_copy_gaps: CopyGaps,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    template = make_connector()
    loaded: list[str] = []

    def load(cls: type, name: str, **kwargs: Any) -> SnowflakeConnector:
        assert kwargs == {"_sync": True}  # never a coroutine, even inside an async flow
        loaded.append(name)
        return template

    monkeypatch.setattr(SnowflakeConnector, "load", classmethod(load))
    wh = SnowflakeWarehouse.from_block("postload-snowflake", PIPELINE)
    assert loaded == ["postload-snowflake"]  # loaded once
    assert wh.location == "snowflake://acct/DB"

    wh.ensure_schema()
    put(write_jsonl(tmp_path / "a.jsonl", [{"id": 1}]), "raw.events")
    assert len(wh.load(EVENTS, None)) == 1
    assert wh.load(EVENTS, None) == []
    assert len(wh.pipeline_status()) == 1

    assert loaded == ["postload-snowflake"]
    # the template itself is never connected; the copies were, and were closed
    assert template._connection is None
    assert template._unique_cursors is None


# -- watermarks: Fivetran's layout and types ----------------------------------------------------


def test_watermarks_compare_fivetrans_timestamp_types_in_one_statement(
    fake_snowflake: None, fakesnow_copy_gaps: CopyGaps, factory: CountingFactory
) -> None:
    """A connector's schema with TIMESTAMP_TZ (Fivetran's INSTANT), TIMESTAMP_LTZ and
    TIMESTAMP_NTZ (taken as UTC) tables; one not synced yet. Each table's newest row arrives as
    the same aware UTC instant, comparable with postload's own naive UTC bookkeeping."""
    from datetime import UTC, datetime

    from postload.sources import source_tables

    pipeline = PipelineConfig.model_validate(
        {
            "sources": [
                {"name": "salesforce", "loader": {"type": "fivetran", "connector_id": "sf"}},
                *PIPELINE.model_dump()["sources"][:1],
            ]
        }
    )
    wh = SnowflakeWarehouse(factory, pipeline)
    wh.ensure_schema()
    with make_connector() as connector:
        connector.fetch_all("create schema if not exists DB.SALESFORCE")
        for table, kind in (
            ("ACCOUNT", "timestamp_tz"),
            ("OPPORTUNITY", "timestamp_ltz"),
            ("CONTACT", "timestamp_ntz"),
        ):
            connector.fetch_all(
                f"create table DB.SALESFORCE.{table} (id int, _fivetran_synced {kind})"
            )
        connector.fetch_all(
            "insert into DB.SALESFORCE.ACCOUNT values (1, '2026-12-04 11:00:00+01:00'::timestamp_tz)"
        )
        connector.fetch_all(
            "insert into DB.SALESFORCE.OPPORTUNITY values (1, '2026-12-04 10:00:00+00:00'::timestamp_ltz)"
        )
        connector.fetch_all(
            "insert into DB.SALESFORCE.CONTACT values (1, '2026-12-04 10:00:00'::timestamp_ntz)"
        )
    manifest = {
        "sources": {
            f"source.p.salesforce.{t}": {
                "source_name": "salesforce",
                "name": t,
                "database": "DB",
                "schema": "SALESFORCE",
                "identifier": t.upper(),
                "loaded_at_field": "_fivetran_synced",
            }
            for t in ("account", "opportunity", "contact", "user")
        }
    }
    tables = [t for ts in source_tables(pipeline, manifest).values() for t in ts]
    present = [t for t in tables if t.table != "user"]
    ten = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)
    marks = wh.watermarks(present)
    assert {k: m.latest_loaded_at for k, m in marks.items() if k[0] == "salesforce"} == {
        ("salesforce", "account"): ten,
        ("salesforce", "opportunity"): ten,
        ("salesforce", "contact"): ten,
    }
    # a build that covered 10:00 (recorded naive UTC) covers all three
    from postload.dbt import DbtBuildResult
    from postload.runs import record_build

    record_build(
        wh,
        sources=[pipeline.source("salesforce")],
        runner="core",
        build=DbtBuildResult(selection="--select source:salesforce+"),
        started_at=datetime(2026, 12, 4, 10, 1),
        completed_at=datetime(2026, 12, 4, 10, 2),
        covers={"salesforce": ten},
        tables={"salesforce": dict.fromkeys(("account", "opportunity", "contact"), ten)},
    )
    assert not any(m.pending for k, m in wh.watermarks(present).items() if k[0] == "salesforce")
    # a table Fivetran has not created yet: no rows, the others still read
    with_missing = wh.watermarks(tables)
    assert with_missing[("salesforce", "user")].latest_loaded_at is None
    assert with_missing[("salesforce", "account")].latest_loaded_at == ten
