"""The lost-run automation crashes a silent Running run, never a finished one.

Prefect's zombie-run pattern fires for a heartbeat sent after a run's Completed state (between
completion and process exit: PrefectHQ/prefect#18653, #21932). Its action is a plain, unforced
state change, which Prefect's orchestration refuses for a finished run (Crashed out of a terminal
state is aborted), so the misfire changes nothing and no Crashed alert follows.
bench/heartbeats.py counts this over 200 real served runs.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Running

from postload.alerts import lost_run_action, lost_run_trigger

LOST_AFTER_SECONDS = 10.0  # Prefect's minimum for a proactive trigger
TIMEOUT = 60.0


@flow(name="transform-on-sync")  # a postload flow's name: the automation watches it
def finished_quickly() -> str:
    return "done"


@pytest.fixture
def lost_run_automation(prefect_server: str) -> Iterator[None]:
    from prefect.automations import Automation

    automation = Automation(
        name=f"test-run-lost-{uuid.uuid4().hex[:8]}",
        trigger=lost_run_trigger(LOST_AFTER_SECONDS),
        actions=[lost_run_action(LOST_AFTER_SECONDS)],
    ).create()
    yield
    automation.delete()


def _heartbeat(api_url: str, run: Any) -> None:
    """A heartbeat as a runner sends it: the run, related to its flow by name."""
    httpx.post(
        f"{api_url}/events",
        json=[
            {
                "id": str(uuid.uuid4()),
                "occurred": datetime.now(UTC).isoformat(),
                "event": "prefect.flow-run.heartbeat",
                "resource": {
                    "prefect.resource.id": f"prefect.flow-run.{run.id}",
                    "prefect.resource.name": run.name,
                },
                "related": [
                    {
                        "prefect.resource.id": f"prefect.flow.{run.flow_id}",
                        "prefect.resource.role": "flow",
                        "prefect.resource.name": "transform-on-sync",
                    }
                ],
                "payload": {},
            }
        ],
    ).raise_for_status()


def _refused_for(api_url: str, run_id: uuid.UUID) -> bool:
    response = httpx.post(
        f"{api_url}/events/filter",
        json={
            "filter": {
                "event": {"name": ["prefect.automation.action.failed"]},
                "related": {"resources_in_roles": [[f"prefect.flow-run.{run_id}", "target"]]},
            },
            "limit": 10,
        },
    )
    response.raise_for_status()
    return bool(response.json()["events"])


def test_a_heartbeat_after_completion_crashes_nothing_while_a_silent_run_is_crashed(
    prefect_server: str, lost_run_automation: None
) -> None:
    finished = finished_quickly(return_state=True)
    with get_client(sync_client=True) as client:
        done = client.read_flow_run(finished.state_details.flow_run_id)
        assert done.state.is_completed()
        silent = client.create_flow_run(finished_quickly)
        client.set_flow_run_state(silent.id, Running())
        silent = client.read_flow_run(silent.id)

        _heartbeat(prefect_server, done)  # sent between Completed and the process's exit
        _heartbeat(prefect_server, silent)  # then nothing: its process is gone

        deadline = time.monotonic() + TIMEOUT
        while not (
            client.read_flow_run(silent.id).state.is_crashed()
            and _refused_for(prefect_server, done.id)
        ):
            assert time.monotonic() < deadline, (
                f"after {TIMEOUT:g} s: silent run {client.read_flow_run(silent.id).state.name}, "
                f"the automation's attempt on the finished run not seen"
            )
            time.sleep(0.25)
        assert client.read_flow_run(done.id).state.is_completed()
