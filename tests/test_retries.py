"""The retry policy: which failures are retried, and that a dbt Cloud build never is."""

from __future__ import annotations

import httpx
import pytest

from postload.config import Settings
from postload.load import LoadVerificationError
from postload.retries import build_retry_options, is_transient, retry_on_transient, retry_options
from postload.warehouse import WarehouseUnavailableError


def http_error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://cloud.getdbt.com/api/v2/accounts/1/jobs/2/run/")
    return httpx.HTTPStatusError(
        "x", request=request, response=httpx.Response(status, request=request)
    )


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (WarehouseUnavailableError("locked"), True),
        (httpx.ConnectError("refused"), True),
        (http_error(429), True),
        (http_error(503), True),
        (http_error(401), False),
        (http_error(404), False),
        (LoadVerificationError("0 rows loaded"), False),
        (ValueError("model failed"), False),
        (TimeoutError("dbt Cloud run still running"), False),
    ],
)
def test_only_infrastructure_failures_are_retried(exc: BaseException, expected: bool) -> None:
    assert is_transient(exc) is expected


def test_a_dbt_core_build_retries_transient_failures_and_a_dbt_cloud_build_never(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POSTLOAD_RETRIES", "3")
    core = build_retry_options(Settings(_env_file=None))
    assert core["retries"] == 3 and core["retry_condition_fn"] is retry_on_transient
    assert core.keys() == retry_options(Settings(_env_file=None)).keys()
    monkeypatch.setenv("POSTLOAD_DBT_RUNNER", "cloud")
    # a task retry would trigger a second run of the job; the Cloud runner retries its API calls
    assert build_retry_options(Settings(_env_file=None)) == {"retries": 0}
