"""Prefect machinery the flows share: retry policy, the warehouse writer lock, artifact keys."""

from __future__ import annotations

import fcntl
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
from prefect import Task, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State, TaskRun
from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError, ObjectAlreadyExists
from prefect.tasks import exponential_backoff

from postload.config import Settings, WarehouseKind
from postload.warehouse import WarehouseUnavailableError

_TRANSIENT_HTTP = {429, 500, 502, 503, 504}


def is_transient(exc: BaseException) -> bool:
    """Failures worth retrying: the infrastructure hiccuped, the data and models are fine.

    A dbt model or test failure, bad data and timeouts of long dbt Cloud runs are not transient:
    retrying them blindly would repeat work (or, for dbt Cloud, start a second run).
    """
    if isinstance(exc, WarehouseUnavailableError | httpx.TransportError):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in _TRANSIENT_HTTP
    return False


def retry_on_transient(task: Task[..., Any], task_run: TaskRun, state: State) -> bool:
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def retry_options(settings: Settings) -> dict[str, Any]:
    """Task options: exponential backoff with jitter, only for transient failures."""
    return {
        "retries": settings.retries,
        "retry_delay_seconds": exponential_backoff(backoff_factor=settings.retry_backoff_seconds)
        if settings.retries
        else 0,
        "retry_jitter_factor": settings.retry_jitter_factor,
        "retry_condition_fn": retry_on_transient,
    }


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


def artifact_key(*parts: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def supersede_waiting_runs() -> list[str]:
    """Cancel the runs of this run's deployment that are due but waiting, as covered by this one.

    postload's flows run one at a time per deployment, and a run started while another runs
    waits for the slot (``collision_strategy: ENQUEUE``) instead of being cancelled, so an event
    that arrives at any moment of a run, even after its last check of the warehouse, gets a run
    after it. Every run that is already waiting when this one starts was created for an event
    that came before this run's plan, and the flows decide what to build from the warehouse, not
    from the event: this run builds their data, so they are cancelled instead of starting one
    after another to find nothing to do. Runs scheduled for later (the sweep) are left alone.
    Called before the first plan; returns the names of the runs it cancelled.
    """
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.context import FlowRunContext
    from prefect.states import Cancelled
    from prefect.types._datetime import now

    context = FlowRunContext.get()
    run = context.flow_run if context else None
    if run is None or run.deployment_id is None:
        return []
    cancelled = []
    with get_client(sync_client=True) as client:
        waiting = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[run.deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                expected_start_time=FlowRunFilterExpectedStartTime(before_=now("UTC")),
            ),
        )
        for other in waiting:
            if other.id == run.id:
                continue
            result = client.set_flow_run_state(
                other.id,
                Cancelled(
                    message=f"Superseded by flow run {run.name!r} ({run.id}), which started "
                    "after this run's event and builds from the warehouse what it would have."
                ),
            )
            if result.state is not None and result.state.is_cancelled():
                cancelled.append(other.name)
    return cancelled


def current_flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else "local"


ProgressFn = Callable[[str], None]
