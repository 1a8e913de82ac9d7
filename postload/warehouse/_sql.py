"""SQL shared by DuckDB and Snowflake: the ops tables and the pipeline_status view.

Every name interpolated here has been validated as a plain identifier by ``postload.config``;
values always travel as bound parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from postload.config import check_identifier
from postload.warehouse._types import TransformRecord, Watermark, naive_utc

if TYPE_CHECKING:
    from postload.sources import SourceTable

# Column order matters: inserts bind positionally.
LOAD_LOG_COLUMNS = (
    "source",
    "table_name",
    "file",
    "file_md5",
    "status",
    "rows_parsed",
    "rows_loaded",
    "errors_seen",
    "first_error",
    "first_error_line",
    "loaded_at",
    "flow_run_id",
)
RUN_RESULT_COLUMNS = (
    "flow_run_id",
    "source",
    "selection",
    "runner",
    "invocation_id",
    "unique_id",
    "name",
    "resource_type",
    "status",
    "started_at",
    "completed_at",
    "execution_time_s",
    "rows_affected",
    "message",
)
TRANSFORM_RUN_COLUMNS = (
    "flow_run_id",
    "source",
    "selection",
    "runner",
    "status",
    "started_at",
    "completed_at",
    "covers_loaded_at",
    "nodes_ok",
    "nodes_failed",
    "message",
    "dbt_cloud_run_id",
    "dbt_cloud_run_url",
)
TRANSFORM_TABLE_COLUMNS = (
    "flow_run_id",
    "source",
    "table_name",
    "selection",
    "status",
    "completed_at",
    "covers_loaded_at",
)


def ops_ddl(ops: str, *, timestamp_type: str = "timestamp") -> list[str]:
    ops = check_identifier(ops)
    ts = timestamp_type
    return [
        f"create schema if not exists {ops}",
        f"""create table if not exists {ops}.load_log (
            source varchar, table_name varchar, file varchar, file_md5 varchar, status varchar,
            rows_parsed bigint, rows_loaded bigint, errors_seen bigint,
            first_error varchar, first_error_line bigint, loaded_at {ts}, flow_run_id varchar)""",
        f"""create table if not exists {ops}.dbt_run_results (
            flow_run_id varchar, source varchar, selection varchar, runner varchar,
            invocation_id varchar, unique_id varchar, name varchar, resource_type varchar,
            status varchar, started_at {ts}, completed_at {ts}, execution_time_s double,
            rows_affected bigint, message varchar)""",
        f"""create table if not exists {ops}.transform_runs (
            flow_run_id varchar, source varchar, selection varchar, runner varchar, status varchar,
            started_at {ts}, completed_at {ts}, covers_loaded_at {ts},
            nodes_ok bigint, nodes_failed bigint, message varchar,
            dbt_cloud_run_id bigint, dbt_cloud_run_url varchar)""",
        # The dbt Cloud run that built it (null with dbt Core); added to tables made without it.
        f"alter table {ops}.transform_runs add column if not exists dbt_cloud_run_id bigint",
        f"alter table {ops}.transform_runs add column if not exists dbt_cloud_run_url varchar",
        # One row per table a build covered: a source's tables are watermarked one by one, so a
        # sync that changed 2 of a connector's 20 tables builds what reads those 2.
        f"""create table if not exists {ops}.transform_tables (
            flow_run_id varchar, source varchar, table_name varchar, selection varchar,
            status varchar, completed_at {ts}, covers_loaded_at {ts})""",
        pipeline_status_view(ops),
    ]


def pipeline_status_view(ops: str) -> str:
    """Per source: last load, rows, last transform and how long the data waited for it.

    The pipeline monitoring view, made to work on DuckDB and Snowflake alike (``datediff`` with a
    quoted part and window functions are common to both). ``load_to_transform_minutes`` measures
    the latest transform from the newest load it covered; ``awaiting_transform`` is true when rows
    have loaded since.
    """
    ops = check_identifier(ops)
    return f"""create or replace view {ops}.pipeline_status as
with loads as (
    select source,
           max(loaded_at) as last_loaded_at,
           sum(rows_loaded) as rows_loaded,
           sum(rows_parsed - rows_loaded) as rows_rejected,
           count(*) as files_loaded
    from {ops}.load_log
    where status in ('LOADED', 'PARTIALLY_LOADED')
    group by source
),
transforms as (
    select source, status, completed_at, covers_loaded_at, nodes_ok, nodes_failed,
           dbt_cloud_run_url,
           row_number() over (partition by source order by completed_at desc) as recency
    from {ops}.transform_runs
),
sources as (
    select source from loads
    union
    select source from transforms
)
select s.source,
       l.last_loaded_at,
       coalesce(l.rows_loaded, 0) as rows_loaded,
       coalesce(l.rows_rejected, 0) as rows_rejected,
       coalesce(l.files_loaded, 0) as files_loaded,
       t.completed_at as last_transformed_at,
       t.status as transform_status,
       t.nodes_ok,
       t.nodes_failed,
       t.dbt_cloud_run_url as last_dbt_cloud_run_url,
       datediff('second', t.covers_loaded_at, t.completed_at) / 60.0 as load_to_transform_minutes,
       case when l.last_loaded_at is not null
                 and (t.covers_loaded_at is null or t.covers_loaded_at < l.last_loaded_at)
            then true else false end as awaiting_transform
from sources s
left join loads l on l.source = s.source
left join transforms t on t.source = s.source and t.recency = 1
order by s.source"""


def insert_sql(table: str, columns: tuple[str, ...], placeholder: str = "?") -> str:
    return f"insert into {table} ({', '.join(columns)}) values ({', '.join([placeholder] * len(columns))})"


def transform_rows(
    record: TransformRecord,
) -> tuple[tuple[Any, ...], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The rows of ``transform_runs``, ``dbt_run_results`` and ``transform_tables`` for one
    build of one source; times as naive UTC, as the columns store them."""
    run = (
        record.flow_run_id,
        record.source,
        record.selection,
        record.runner,
        record.status,
        naive_utc(record.started_at),
        naive_utc(record.completed_at),
        naive_utc(record.covers_loaded_at),
        record.nodes_ok,
        record.nodes_failed,
        record.message,
        record.dbt_cloud_run_id,
        record.dbt_cloud_run_url,
    )
    nodes = [
        (
            record.flow_run_id,
            record.source,
            record.selection,
            record.runner,
            record.invocation_id,
            n.unique_id,
            n.name,
            n.resource_type,
            n.status,
            naive_utc(n.started_at),
            naive_utc(n.completed_at),
            n.execution_time_s,
            n.rows_affected,
            n.message,
        )
        for n in record.nodes
    ]
    tables = [
        (
            record.flow_run_id,
            record.source,
            table,
            record.selection,
            record.status,
            naive_utc(record.completed_at),
            naive_utc(covers),
        )
        for table, covers in record.tables.items()
    ]
    return run, nodes, tables


def watermarks_sql(
    ops: str,
    tables: list[SourceTable],
    *,
    epoch_us: Callable[[str], str],
    selection_param: str | None = None,
) -> str:
    """One statement for every table's watermark: its newest row and the newest a build covered.

    Each table's ``max(loaded_at_field)`` is read as microseconds since the epoch (``epoch_us``
    renders the warehouse's function), which is what makes ``TIMESTAMP_TZ``, ``TIMESTAMP_LTZ``,
    ``TIMESTAMP_NTZ`` (taken as UTC) and DuckDB's ``TIMESTAMP``/``TIMESTAMPTZ`` one comparable
    type whatever the session's time zone. Coverage comes from ``transform_tables``; for tables
    postload.yaml names, builds recorded before per-table bookkeeping (``transform_runs``) count
    too. With ``selection_param`` (the driver's placeholder) only builds of that selection count.
    """
    ops = check_identifier(ops)
    only = f"and selection = {selection_param} " if selection_param else ""
    ok = "status in ('success', 'nothing_selected')"
    latest = "\n    union all\n    ".join(
        f"select '{check_identifier(t.source)}' as source, '{check_identifier(t.table)}' as "
        f"table_name, {'true' if t.named_by_config else 'false'} as named_by_config, "
        f"{epoch_us(f'max({check_identifier(t.loaded_at_field)})')} as latest_us "
        f"from {t.relation}"
        for t in tables
    )
    return f"""with latest as (
    {latest}
),
table_covered as (
    select source, table_name, max(covers_loaded_at) as covered
    from {ops}.transform_tables where {ok} {only}group by source, table_name
),
source_covered as (
    select source, max(covers_loaded_at) as covered
    from {ops}.transform_runs where {ok} {only}group by source
)
select l.source, l.table_name, l.latest_us,
       coalesce(t.covered, case when l.named_by_config then s.covered end) as covered
from latest l
left join table_covered t on t.source = l.source and t.table_name = l.table_name
left join source_covered s on s.source = l.source"""


def read_watermarks(rows: list[tuple[Any, ...]]) -> dict[tuple[str, str], Watermark]:
    """``watermarks_sql``'s rows as watermarks (aware UTC)."""
    return {
        (source, table): Watermark(
            None if latest_us is None else _EPOCH + timedelta(microseconds=int(latest_us)),
            covered,
        )
        for source, table, latest_us, covered in rows
    }


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def watermarks_skipping_missing(
    tables: list[SourceTable],
    fetch: Callable[[list[SourceTable]], list[tuple[Any, ...]]],
    catalog: Callable[[], set[tuple[str, str]]],
    is_missing: Callable[[Exception], bool],
) -> dict[tuple[str, str], Watermark]:
    """Every table's watermark in one round trip (``fetch`` runs ``watermarks_sql``).

    When a table does not exist yet (a connector that never synced it, or one the role cannot
    see: ``is_missing`` tells the warehouse's error for it), ``catalog`` lists the ``(schema,
    name)`` pairs that do, and those are read: the missing ones have no rows.
    """
    try:
        return read_watermarks(fetch(tables))
    except Exception as exc:
        if not is_missing(exc):
            raise
    present, absent = missing_relation_rows(tables, catalog())
    marks = read_watermarks(fetch(present)) if present else {}
    return {**{t.key: Watermark(None, None) for t in absent}, **marks}


def missing_relation_rows(
    tables: list[SourceTable], existing: set[tuple[str, str]]
) -> tuple[list[SourceTable], list[SourceTable]]:
    """Split tables into those the warehouse has and those it does not (schema, name; any case)."""
    present = [t for t in tables if (t.schema.lower(), t.identifier.lower()) in existing]
    absent = [t for t in tables if (t.schema.lower(), t.identifier.lower()) not in existing]
    return present, absent


def last_build_sql(ops: str, placeholder: str) -> str:
    return (
        f"select max(completed_at) from {check_identifier(ops)}.transform_runs "
        f"where status = 'success' and selection = {placeholder}"
    )


def transform_history_sql(ops: str, limit: int) -> str:
    """The latest transforms that covered a load, oldest first, with how long the data waited."""
    return f"""select source, completed_at,
       datediff('second', covers_loaded_at, completed_at) / 60.0 as load_to_transform_minutes
from (select source, completed_at, covers_loaded_at
      from {check_identifier(ops)}.transform_runs
      where covers_loaded_at is not null and status = 'success'
      order by completed_at desc
      limit {int(limit)}) recent
order by completed_at"""
