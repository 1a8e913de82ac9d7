"""The warehouse: raw tables, the load contract, and the ops tables that record what happened.

Two implementations share one contract (``Warehouse``):

* ``DuckDBWarehouse`` — the embedded default; a stage is a local folder of newline-delimited JSON.
* ``SnowflakeWarehouse`` — ``COPY INTO … ON_ERROR='CONTINUE'`` through a prefect-snowflake
  ``SnowflakeConnector`` block.

Both return Snowflake's per-file COPY result (file, status, rows parsed/loaded, errors seen, first
error), both skip files that were loaded before (Snowflake's load metadata), and both record every
load in ``<ops>.load_log`` and every dbt result in ``<ops>.dbt_run_results``.
"""

from __future__ import annotations

from postload.config import PipelineConfig, Settings, WarehouseKind
from postload.warehouse._types import (
    FileLoadResult,
    LoadStatus,
    NodeResult,
    StageNotFoundError,
    TransformRecord,
    Warehouse,
    WarehouseUnavailableError,
    Watermark,
    as_utc,
    naive_utc,
    utcnow,
)

__all__ = [
    "FileLoadResult",
    "LoadStatus",
    "NodeResult",
    "StageNotFoundError",
    "TransformRecord",
    "Warehouse",
    "WarehouseUnavailableError",
    "Watermark",
    "as_utc",
    "naive_utc",
    "open_warehouse",
    "utcnow",
]


def open_warehouse(settings: Settings, pipeline: PipelineConfig) -> Warehouse:
    """The warehouse the settings select (DuckDB by default, Snowflake through its block)."""
    if settings.warehouse is WarehouseKind.SNOWFLAKE:
        from postload.warehouse._snowflake import SnowflakeWarehouse

        return SnowflakeWarehouse.from_block(settings.snowflake_block, pipeline)
    from postload.warehouse._duckdb import DuckDBWarehouse

    return DuckDBWarehouse(settings.duckdb_file, settings.stage_root_path, pipeline)
