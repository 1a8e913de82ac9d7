"""SQL shared by DuckDB and Snowflake: the ops tables and the pipeline_status view.

Every name interpolated here has been validated as a plain identifier by ``postload.config``;
values always travel as bound parameters.
"""

from __future__ import annotations

from postload.config import check_identifier

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
            nodes_ok bigint, nodes_failed bigint, message varchar)""",
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


def transform_rows(record) -> tuple[tuple, list[tuple]]:  # record: TransformRecord
    run = (
        record.flow_run_id,
        record.source,
        record.selection,
        record.runner,
        record.status,
        record.started_at,
        record.completed_at,
        record.covers_loaded_at,
        record.nodes_ok,
        record.nodes_failed,
        record.message,
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
            n.started_at,
            n.completed_at,
            n.execution_time_s,
            n.rows_affected,
            n.message,
        )
        for n in record.nodes
    ]
    return run, nodes


def latest_loaded_sql(raw: str, table: str, loaded_at_field: str) -> str:
    return (
        f"select max({check_identifier(loaded_at_field)}) "
        f"from {check_identifier(raw)}.{check_identifier(table)}"
    )


def covered_sql(ops: str, *, selection_param: str | None = None) -> str:
    """The newest load each source's successful transforms covered (failed ones do not count).

    With ``selection_param`` (the driver's placeholder), only transforms of one selection count:
    the full build's, for full-run-when-fresh.
    """
    only = f"and selection = {selection_param} " if selection_param else ""
    return (
        f"select source, max(covers_loaded_at) from {check_identifier(ops)}.transform_runs "
        f"where status in ('success', 'nothing_selected') {only}group by source"
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
