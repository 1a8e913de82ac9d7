from __future__ import annotations

import httpx
import pytest

from postload.orchestration import artifact_key, is_transient
from postload.pipeline import LoadVerificationError
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


def test_artifact_keys_are_valid() -> None:
    assert artifact_key("load-rejects", "Raw_Events") == "load-rejects-raw-events"
