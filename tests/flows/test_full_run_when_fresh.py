"""full-run-when-fresh on the real stack: one full build per fresh generation, never more."""

from __future__ import annotations

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client

from flows.full_run_when_fresh import full_run_when_fresh
from postload.alerts import STALE_EVENT, STALE_VARIABLE
from tests.conftest import DEMO_MODELS, PostloadHome, land_and_load, sql

ALL_MODELS = DEMO_MODELS
land = land_and_load


def models_built(home: PostloadHome) -> list[tuple[str, int]]:
    """(model, times built) over every full build so far."""
    return sql(
        home,
        "select name, count(distinct invocation_id) from ops.dbt_run_results where resource_type = 'model' "
        "and selection = '--select fqn:*' group by name order by name",
    )


def stale_events(api_url: str, source: str) -> list[dict]:
    response = httpx.post(
        f"{api_url}/events/filter",
        json={
            "filter": {
                "event": {"name": [STALE_EVENT]},
                "resource": {"id": [f"postload.source.{source}"]},
                "occurred": {"since": "2000-01-01T00:00:00Z"},
            },
            "limit": 50,
        },
    )
    response.raise_for_status()
    return response.json()["events"]


@pytest.fixture
def fresh_variable(prefect_server: str) -> None:
    with get_client(sync_client=True) as client:
        if client.read_variable_by_name(STALE_VARIABLE):
            client.delete_variable_by_name(STALE_VARIABLE)


def test_one_full_build_per_fresh_generation(
    prefect_server: str, postload_home: PostloadHome
) -> None:
    for source in ("customers", "orders", "events"):
        land(postload_home, source, 1)

    first = full_run_when_fresh(reason="load")
    again = full_run_when_fresh(reason="sweep")
    assert first["built"] and first["status"] == "success", first
    assert not again["built"] and again["reason"].startswith("nothing new"), again
    assert {name for name, _ in models_built(postload_home)} == ALL_MODELS

    land(postload_home, "events", 2)  # one source loading again is not a new generation
    one_sync = full_run_when_fresh(reason="load")
    assert not one_sync["built"]
    assert one_sync["reason"].startswith("waiting for a load of customers, orders"), one_sync

    land(postload_home, "customers", 2)
    land(postload_home, "orders", 2)  # every source loaded again: a new generation
    second = full_run_when_fresh(reason="load")
    third = full_run_when_fresh(reason="load")
    assert second["built"] and not third["built"]
    assert models_built(postload_home) == [(m, 2) for m in sorted(ALL_MODELS)]


def test_without_full_run_in_the_config_nothing_is_built_and_stale_sources_are_still_watched(
    prefect_server: str, postload_home: PostloadHome, fresh_variable: None
) -> None:
    config = yaml.safe_load((postload_home.root / "postload.yaml").read_text())
    config.pop("full_run", None)
    (postload_home.root / "postload.yaml").write_text(yaml.safe_dump(config))
    for source in ("customers", "events"):
        land(postload_home, source, 1)

    result = full_run_when_fresh(reason="sweep")
    assert not result["built"] and result["reason"].startswith("full builds are off"), result
    assert result["announced_stale"] == ["orders"]
    assert sql(postload_home, "select count(*) from ops.transform_runs") == [(0,)]


def test_a_never_loaded_source_blocks_and_is_announced_once(
    prefect_server: str, postload_home: PostloadHome, fresh_variable: None
) -> None:
    for source in ("customers", "events"):
        land(postload_home, source, 1)

    first = full_run_when_fresh(reason="sweep")
    second = full_run_when_fresh(reason="sweep")

    assert not first["built"] and not second["built"]
    assert "orders: never loaded" in first["reason"]
    assert first["announced_stale"] == ["orders"] and second["announced_stale"] == []
    assert sql(postload_home, "select count(*) from ops.transform_runs") == [(0,)]

    def announced() -> list[dict]:
        return stale_events(prefect_server, "orders")

    events = _wait(announced)
    assert len(events) == 1, events
    assert events[0]["payload"]["source"] == "orders"
    assert events[0]["payload"]["age"] == "never loaded"


def test_tracked_source_unknown_to_dbt_fails_the_run_clearly(
    prefect_server: str, postload_home: PostloadHome
) -> None:
    config = yaml.safe_load((postload_home.root / "postload.yaml").read_text())
    config["sources"][0]["dbt_source"] = "crm"  # no such dbt source
    (postload_home.root / "postload.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(
        Exception, match=r"no source named 'crm'.*dbt sources: customers, events, orders"
    ):
        full_run_when_fresh(reason="sweep")


def _wait(fetch, timeout: float = 30.0):
    """Poll (bounded): the server's event persister writes events a moment after they arrive."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)
