"""Flow timeouts: a hung dbt build ends TimedOut, frees the writer slot, is reported once (one
Slack message, one page), and the next run builds what it did not."""

from __future__ import annotations

import fcntl
import threading
import time
import uuid

import pytest
from prefect.flows import load_flow_from_entrypoint

from postload.alerts import pagerduty_dedup_key
from tests.conftest import REPO, Alerting, PostloadHome, crash_sentinel, land_and_load, sql

# A dbt-duckdb Python model whose first build blocks while the gate file exists: a build that
# hangs in a dbt thread, as a stuck warehouse query would. Later builds of it do not block.
HANG_MODEL = """
import pathlib, time

def model(dbt, session):
    dbt.config(materialized="table")
    hung, gate = pathlib.Path({hung!r}), pathlib.Path({gate!r})
    if not hung.exists():
        hung.touch()
        while gate.exists():
            time.sleep(0.2)
    return dbt.ref("stg_events")
"""


@pytest.mark.parametrize(
    "entrypoint",
    [
        "flows/load_and_transform.py:load_and_transform",
        "flows/transform_on_sync.py:transform_on_sync",
        "flows/full_run_when_fresh.py:full_run_when_fresh",
    ],
)
def test_the_timeout_is_read_where_the_entrypoint_is_imported(
    entrypoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers and `postload serve` both import the entrypoint; the setting applies there."""
    monkeypatch.setenv("POSTLOAD_FLOW_TIMEOUT_SECONDS", "1234")
    assert load_flow_from_entrypoint(str(REPO / entrypoint)).timeout_seconds == 1234
    monkeypatch.setenv("POSTLOAD_FLOW_TIMEOUT_SECONDS", "0")
    assert load_flow_from_entrypoint(str(REPO / entrypoint)).timeout_seconds is None


# pytest-timeout's signal method owns SIGALRM, and Prefect then falls back to raising into the
# flow's thread, which a thread blocked in a lock (dbt waiting for its node threads) never sees.
# Deployments run flows in their process's main thread with SIGALRM free, as here with the
# thread method.
@pytest.mark.timeout(300, method="thread")
def test_hung_build_times_out_frees_the_writer_and_the_next_run_builds_its_sources(
    prefect_server: str,
    postload_home: PostloadHome,
    alerting: Alerting,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.transform_on_sync import transform_on_sync

    monkeypatch.setenv("POSTLOAD_SYNC_DEBOUNCE_SECONDS", "0")
    hung, gate = postload_home.root / "hung", postload_home.root / "gate"
    gate.touch()
    (postload_home.root / "dbt_project" / "models" / "marts" / "slow_events.py").write_text(
        HANG_MODEL.format(hung=str(hung), gate=str(gate))
    )
    for source in ("customers", "orders", "events"):
        land_and_load(postload_home, source, 1)
    # Warm the manifest so the timeout below is spent in the build, not in dbt's parse.
    from postload.config import Settings
    from postload.dbt import DbtProject

    DbtProject.from_settings(Settings()).manifest()

    started = time.monotonic()
    state = transform_on_sync.with_options(timeout_seconds=15)(reason="test", return_state=True)
    assert state.name == "TimedOut" and state.is_failed(), state
    assert time.monotonic() - started < 30  # ended at its timeout, not when dbt gave up
    run_id = str(state.state_details.flow_run_id)

    # It hung in the dbt build, and the writer slot is free although the hung node's dbt thread
    # still runs in this process (dbt's pool threads are daemons: a deployment's run process
    # exits without waiting for them).
    assert hung.exists()
    lock = postload_home.duckdb.with_name(postload_home.duckdb.name + ".writer.lock")
    with lock.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if held
        fcntl.flock(handle, fcntl.LOCK_UN)
    # Nothing was recorded for the timed-out build: its sources are still pending.
    assert sql(postload_home, "select count(*) from ops.transform_runs") == [(0,)]

    # Reported once: one Slack message (the failure hook, sent before the flow returned) and one
    # page with the run's dedup key; a later crash's page and message prove no second one comes.
    (message,) = alerting.slack.wait_for("ended TimedOut")
    assert "transform-on-sync" in message and "exceeded timeout of 15" in message
    page = alerting.pagerduty.wait_for("trigger", pagerduty_dedup_key(run_id))
    assert "TimedOut" in page[0]["payload"]["summary"]
    sentinel = crash_sentinel()
    alerting.pagerduty.wait_for("trigger", pagerduty_dedup_key(sentinel))
    alerting.slack.wait_for("sentinel: no heartbeat")
    assert len(alerting.pagerduty.of("trigger", pagerduty_dedup_key(run_id))) == 1
    assert len([m for m in alerting.slack.messages if "ended TimedOut" in m]) == 1

    second = transform_on_sync(reason="test")
    assert [b["sources"] for b in second["builds"]] == [["customers", "orders", "events"]]
    assert second["builds"][0]["status"] == "success"
    built = {
        name
        for (name,) in sql(
            postload_home,
            "select name from ops.dbt_run_results where resource_type = 'model'",
        )
    }
    assert "slow_events" in built
    gate.unlink()  # the first build's thread ends with the test


@pytest.mark.timeout(120, method="thread")
def test_a_timed_out_run_gives_back_the_snowflake_writer_slot(prefect_server: str) -> None:
    """On Snowflake the writer slot is a Prefect global concurrency limit: a run that times out
    while holding it releases it (the slot's context exits with the timeout's exception)."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from postload.config import Settings
    from postload.hooks import timed_out_as_timeout
    from postload.writer import warehouse_writer

    limit = f"postload-warehouse-timeout-{uuid.uuid4().hex[:8]}"
    settings = Settings(_env_file=None, warehouse="snowflake", warehouse_concurrency_limit=limit)
    held = threading.Event()

    @flow(name="writer-holder", timeout_seconds=3)
    @timed_out_as_timeout
    def holder() -> None:
        with warehouse_writer(settings):
            held.set()
            threading.Event().wait()  # a build that never ends

    state = holder(return_state=True)
    assert held.is_set() and state.name == "TimedOut"
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0
