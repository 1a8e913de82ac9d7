from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from postload.config import SourceConfig

if TYPE_CHECKING:
    from postload.sources import SourceTable


def utcnow() -> datetime:
    """Naive UTC: what DuckDB ``timestamp`` and Snowflake ``timestamp_ntz`` store alike."""
    return datetime.now(UTC).replace(tzinfo=None)


def as_utc(value: datetime | None) -> datetime | None:
    """Aware UTC, for comparing: a naive value (``TIMESTAMP``, ``TIMESTAMP_NTZ``, postload's own
    bookkeeping) is taken as UTC; an aware one (``TIMESTAMPTZ``, ``TIMESTAMP_TZ``/``_LTZ``,
    Fivetran's ``_fivetran_synced``) is converted."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def naive_utc(value: datetime | None) -> datetime | None:
    """Naive UTC, for storing in postload's ``timestamp`` columns whatever the session's zone."""
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


class LoadStatus(StrEnum):
    """Snowflake's per-file COPY statuses (the DuckDB loader reports the same)."""

    LOADED = "LOADED"
    PARTIALLY_LOADED = "PARTIALLY_LOADED"
    LOAD_FAILED = "LOAD_FAILED"


@dataclass(frozen=True)
class FileLoadResult:
    """One row of a COPY INTO result: what happened to one staged file."""

    file: str
    status: LoadStatus
    rows_parsed: int
    rows_loaded: int
    errors_seen: int
    first_error: str | None = None
    first_error_line: int | None = None

    @property
    def rows_rejected(self) -> int:
        return self.rows_parsed - self.rows_loaded

    def as_row(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}


@dataclass(frozen=True)
class NodeResult:
    """One dbt node's outcome, as recorded in ``<ops>.dbt_run_results``."""

    unique_id: str
    name: str
    resource_type: str
    status: str
    started_at: datetime | None = None
    completed_at: datetime | None = None
    execution_time_s: float | None = None
    rows_affected: int | None = None
    message: str | None = None


@dataclass(frozen=True)
class TransformRecord:
    """One transform (a dbt build for a source), as recorded in ``<ops>.transform_runs``."""

    flow_run_id: str
    source: str
    selection: str
    runner: str
    status: str
    started_at: datetime
    completed_at: datetime
    covers_loaded_at: datetime | None
    nodes: list[NodeResult] = field(default_factory=list)
    # per table of the source: the newest row the build covered (``ops.transform_tables``)
    tables: dict[str, datetime | None] = field(default_factory=dict)
    invocation_id: str | None = None
    message: str | None = None
    # the dbt Cloud run that built it; None with dbt Core
    dbt_cloud_run_id: int | None = None
    dbt_cloud_run_url: str | None = None

    @property
    def nodes_ok(self) -> int:
        return sum(1 for n in self.nodes if n.status in ("success", "pass"))

    @property
    def nodes_failed(self) -> int:
        return sum(1 for n in self.nodes if n.status in ("error", "fail", "runtime error"))


@dataclass(frozen=True)
class Watermark:
    """How fresh a table is, and how much of it the models have seen; both aware UTC."""

    latest_loaded_at: datetime | None
    covered_loaded_at: datetime | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "latest_loaded_at", as_utc(self.latest_loaded_at))
        object.__setattr__(self, "covered_loaded_at", as_utc(self.covered_loaded_at))

    @property
    def pending(self) -> bool:
        return self.latest_loaded_at is not None and (
            self.covered_loaded_at is None or self.latest_loaded_at > self.covered_loaded_at
        )


class StageNotFoundError(FileNotFoundError):
    """The stage a source is configured to load from does not exist."""


class WarehouseUnavailableError(ConnectionError):
    """A transient warehouse failure (locked file, dropped connection): safe to retry."""


class Warehouse(Protocol):
    kind: str
    location: str

    def ensure_schema(self) -> None:
        """Create the raw tables, the ops tables and the pipeline_status view if missing."""

    def load(self, source: SourceConfig, flow_run_id: str | None) -> list[FileLoadResult]:
        """Load the source's new staged files; one result per file processed (none if no new files).

        Each file is loaded and logged atomically, so a retry after a failure loads only the
        files that were not loaded yet.
        """

    def stage_location(self, source: SourceConfig) -> str:
        """Where the source's files are staged, for messages (a folder or ``@schema.stage``)."""

    def record_transform(self, record: TransformRecord) -> None: ...

    def pipeline_status(self) -> list[dict[str, Any]]: ...

    def relations(self) -> set[tuple[str, str]]:
        """(schema, name) of every table and view in the warehouse database, lower-cased."""

    def transform_history(self, limit: int = 30) -> list[dict[str, Any]]:
        """The latest transforms that covered a load (source, completed_at,
        load_to_transform_minutes), oldest first."""
        ...

    def watermarks(
        self, tables: list[SourceTable], *, selection: str | None = None
    ) -> dict[tuple[str, str], Watermark]:
        """Per table: the max of its loaded_at field, and the newest row a successful build
        covered (of ``selection`` only, when given), all in one round trip to the warehouse.

        The warehouse is the truth about what needs transforming; events only wake us up. A
        table that does not exist yet (a connector that never synced it) has no rows.
        """

    def last_build_at(self, selection: str) -> datetime | None:
        """When the last successful build of this selection ended."""

    def latest_load_at(self, source: SourceConfig) -> datetime | None:
        """When this source last loaded rows (from the load log)."""
