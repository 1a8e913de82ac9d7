from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.flow_engine import run_flow
from prefect.states import Scheduled
from prefect.types._datetime import now

from postload.orchestration import artifact_key, is_transient, supersede_waiting_runs
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


def test_snowflake_writer_slot_is_a_prefect_concurrency_limit(
    prefect_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client

    from postload.config import Settings
    from postload.orchestration import warehouse_writer

    monkeypatch.setenv("POSTLOAD_WAREHOUSE", "snowflake")
    monkeypatch.setenv("POSTLOAD_WAREHOUSE_CONCURRENCY_LIMIT", "postload-warehouse-gcl-test")
    settings = Settings(_env_file=None)
    with get_client(sync_client=True) as client:
        with warehouse_writer(settings):
            held = client.read_global_concurrency_limit_by_name("postload-warehouse-gcl-test")
        released = client.read_global_concurrency_limit_by_name("postload-warehouse-gcl-test")
    assert (held.limit, held.active_slots) == (1, 1)
    assert released.active_slots == 0


def test_duckdb_writer_lock_is_released_when_its_holder_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    from postload.config import Settings
    from postload.orchestration import warehouse_writer

    monkeypatch.setenv("POSTLOAD_DUCKDB_PATH", str(tmp_path / "w.duckdb"))
    code = (
        "import sys; from postload.config import Settings; "
        "from postload.orchestration import warehouse_writer\n"
        "with warehouse_writer(Settings()):\n print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # crashes while holding the slot
    holder.wait(timeout=30)
    with warehouse_writer(Settings(_env_file=None)):
        pass  # acquired: the dead holder did not leave it taken


@flow(name="postload-supersede-probe")
def supersede_probe() -> list[str]:
    return supersede_waiting_runs()


def test_a_starting_run_cancels_the_due_runs_of_its_deployment_but_not_later_ones(
    prefect_server: str,
) -> None:
    deployment_id = supersede_probe.to_deployment(name=f"probe-{uuid.uuid4().hex[:8]}").apply()
    with get_client(sync_client=True) as client:
        due = client.create_flow_run_from_deployment(deployment_id)  # woken, not started yet
        later = client.create_flow_run_from_deployment(  # the sweep's next run
            deployment_id, state=Scheduled(scheduled_time=now("UTC") + timedelta(hours=1))
        )
        other = client.create_flow_run_from_deployment(
            supersede_probe.to_deployment(name=f"other-{uuid.uuid4().hex[:8]}").apply()
        )
        starting = client.create_flow_run_from_deployment(deployment_id)

        cancelled = run_flow(supersede_probe, flow_run=client.read_flow_run(starting.id))

        assert cancelled == [due.name]
        due_state = client.read_flow_run(due.id).state
        assert due_state.is_cancelled()
        assert f"Superseded by flow run {starting.name!r}" in due_state.message
        assert client.read_flow_run(later.id).state.is_scheduled()
        assert client.read_flow_run(other.id).state.is_scheduled()  # another deployment's
        assert client.read_flow_run(starting.id).state.is_completed()


def test_outside_a_deployment_run_nothing_is_superseded(prefect_server: str) -> None:
    assert supersede_probe() == []
