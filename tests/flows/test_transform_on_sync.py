"""transform-on-sync on the real stack: warehouse watermarks decide, events only wake it up."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.events import DeploymentEventTrigger

from flows.transform_on_sync import transform_on_sync
from tests.conftest import DEMO_MODELS, REPO, PostloadHome, land_and_load, sql


@pytest.fixture
def no_debounce(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTLOAD_SYNC_DEBOUNCE_SECONDS", "0")


def test_burst_of_syncs_is_one_build_and_a_repeat_builds_nothing(
    prefect_server: str, postload_home: PostloadHome, no_debounce: None
) -> None:
    for source in ("customers", "orders", "events"):
        land_and_load(postload_home, source, 1)

    first = transform_on_sync(connector_id=None, reason="fivetran sync")
    assert len(first["builds"]) == 1, first
    assert first["builds"][0]["sources"] == ["customers", "orders", "events"]
    models = {
        name
        for (name,) in sql(
            postload_home,
            "select distinct name from ops.dbt_run_results where resource_type = 'model'",
        )
    }
    assert models == DEMO_MODELS

    # the same sync delivered again: the warehouse says nothing changed, so no dbt run
    again = transform_on_sync(reason="fivetran sync")
    assert again["builds"] == []
    assert sql(postload_home, "select count(distinct flow_run_id) from ops.transform_runs") == [
        (1,)
    ]

    # a later sync of one source builds only its downstream work
    land_and_load(postload_home, "events", 2)
    later = transform_on_sync(reason="load")
    assert [b["sources"] for b in later["builds"]] == [["events"]]
    covered = sql(
        postload_home,
        "select source, max(covers_loaded_at) = (select max(_loaded_at) from raw.events) "
        "from ops.transform_runs where source = 'events' group by source",
    )
    assert covered == [("events", True)]


def test_unknown_connector_runs_nothing_and_says_so(
    prefect_server: str, postload_home: PostloadHome, no_debounce: None
) -> None:
    land_and_load(postload_home, "events", 1)
    result = transform_on_sync(connector_id="not_mapped", sync_id="s-1", reason="fivetran sync")
    assert result == {"builds": [], "unknown_connector": "not_mapped"}
    assert sql(postload_home, "select count(*) from ops.transform_runs") == [(0,)]


def fivetran_event(connector_id: str, sync_id: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"fivetran:{connector_id}:{sync_id}:sync_end")),
        "occurred": datetime.now(UTC).isoformat(),
        "event": "fivetran.sync.succeeded",
        "resource": {
            "prefect.resource.id": f"fivetran.connector.{connector_id}",
            "fivetran.connector_id": connector_id,
            "fivetran.sync_id": sync_id,
        },
        "payload": {"event": "sync_end", "data": {"status": "SUCCESSFUL"}},
    }


def test_deployment_trigger_turns_redelivered_sync_into_one_run(prefect_server: str) -> None:
    """The prefect.yaml trigger, applied to the test server: 5 deliveries of one sync → 1 run."""
    spec = next(
        d
        for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
        if d["name"] == "transform-on-sync"
    )
    triggers = [
        DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"})
        for t in spec["triggers"]
    ]
    deployment_id = transform_on_sync.to_deployment(
        name=f"transform-on-sync-{uuid.uuid4().hex[:6]}", triggers=triggers
    ).apply()

    connector = f"conn_{uuid.uuid4().hex[:8]}"
    duplicate = fivetran_event(connector, "sync-1")
    for _ in range(5):
        httpx.post(f"{prefect_server}/events", json=[duplicate]).raise_for_status()
    # a second, distinct sync afterwards: once its run exists, the duplicates were processed
    httpx.post(
        f"{prefect_server}/events", json=[fivetran_event(connector, "sync-2")]
    ).raise_for_status()

    runs = _wait_for_runs(deployment_id, count=2)
    assert len(runs) == 2
    assert sorted(r.parameters["sync_id"] for r in runs) == ["sync-1", "sync-2"]
    assert {r.parameters["connector_id"] for r in runs} == {connector}
    assert {r.parameters["reason"] for r in runs} == {"fivetran sync"}


def _wait_for_runs(deployment_id: uuid.UUID, count: int, timeout: float = 60.0) -> list[Any]:
    """Poll the API (bounded) until the trigger service has created `count` runs."""
    import time

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
            if len(runs) >= count or time.monotonic() > deadline:
                return runs
            time.sleep(0.25)
