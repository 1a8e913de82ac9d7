"""The warehouse writer slot: one run at a time loads and builds in a warehouse."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError, ObjectAlreadyExists

from postload.config import Settings, WarehouseKind


def ensure_concurrency_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit if it is missing (idempotent, race-safe)."""
    # another run may create it between the upsert's read and its create
    with get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):
        client.upsert_global_concurrency_limit_by_name(name, limit)


@contextmanager
def warehouse_writer(settings: Settings) -> Iterator[None]:
    """Hold the single warehouse-writer slot while loading and building.

    DuckDB allows one writing process per file, and two runs loading and building the same
    tables at once would race even on Snowflake, so writers queue here instead of colliding.
    """
    if settings.warehouse is WarehouseKind.DUCKDB:
        with _file_lock(settings.duckdb_file.with_name(settings.duckdb_file.name + ".writer.lock")):
            yield
        return
    ensure_concurrency_limit(settings.warehouse_concurrency_limit)
    # strict=True: a missing limit would otherwise only log a warning and not throttle. The lease
    # is renewed while this process lives; a short one means a crashed holder blocks the next
    # writer for about a minute (on a server whose repossessor service runs), not five.
    with concurrency(
        settings.warehouse_concurrency_limit, occupy=1, strict=True, lease_duration=60
    ):
        yield


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An OS file lock for the embedded warehouse, which only ever lives on one machine.

    Not a Prefect global concurrency limit here: Prefect's temporary local server (the embedded
    default with no PREFECT_API_URL) does not run the repossessor service and keeps leases in
    memory, so a run killed while holding a slot left it taken in ~/.prefect/prefect.db and every
    later run waited forever (seen here). The kernel releases this lock when its process dies.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log().info("another run is writing %s; waiting for it to finish", path.stem)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _log() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
