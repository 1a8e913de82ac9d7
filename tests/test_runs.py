"""Superseding: a starting run cancels the runs of its deployment that wait for it."""

from __future__ import annotations

import uuid
from datetime import timedelta

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.flow_engine import run_flow
from prefect.states import Scheduled
from prefect.types._datetime import now

from postload.runs import supersede_waiting_runs


@flow(name="postload-supersede-probe")
def supersede_probe(connector_id: str | None = None) -> list[str]:
    return supersede_waiting_runs(known_connectors={"mapped"})


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


def test_a_run_woken_for_an_unmapped_connector_is_not_superseded(prefect_server: str) -> None:
    # A burst: syncs of a mapped and an unmapped connector wait behind a starting run. Only the
    # unmapped connector's run can announce it, so it must be left to start.
    deployment_id = supersede_probe.to_deployment(name=f"probe-{uuid.uuid4().hex[:8]}").apply()
    with get_client(sync_client=True) as client:
        mapped = client.create_flow_run_from_deployment(
            deployment_id, parameters={"connector_id": "mapped"}
        )
        unmapped = client.create_flow_run_from_deployment(
            deployment_id, parameters={"connector_id": "not_mapped"}
        )
        starting = client.create_flow_run_from_deployment(deployment_id)

        cancelled = run_flow(supersede_probe, flow_run=client.read_flow_run(starting.id))

        assert cancelled == [mapped.name]
        assert client.read_flow_run(unmapped.id).state.is_scheduled()
