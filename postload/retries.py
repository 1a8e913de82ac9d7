"""The one retry policy of postload's tasks: exponential backoff with jitter, transient failures only."""

from __future__ import annotations

from typing import Any

import httpx
from prefect import Task
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import exponential_backoff

from postload.config import DbtRunnerKind, Settings
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


def build_retry_options(settings: Settings) -> dict[str, Any]:
    """Task options for a dbt build: the retry policy on dbt Core, none on dbt Cloud.

    dbt Cloud retries its own API calls without ever re-triggering a run; a task retry would
    start a second run of the job.
    """
    return retry_options(settings) if settings.dbt_runner is DbtRunnerKind.CORE else {"retries": 0}
