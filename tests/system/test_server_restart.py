"""A Prefect server restarted under a running flow run: the run keeps its deployment's slot.

A run of a deployment with a concurrency limit holds its slot through a lease the flow engine
renews every 225 s, and terminates itself when a renewal is refused. Prefect keeps leases in the
server's memory by default: after a restart the renewal is answered 410 Gone, so a build longer
than that would be killed because the server restarted. The local stack's servers keep leases on
disk (``LOCAL_SERVER_SETTINGS``). Here a real ``prefect server start`` grants a run its slot, is
SIGKILLed and started again on its database and home, and the run's lease is renewed as the flow
engine would renew it.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Pending, Running

from postload.local.stack import LOCAL_SERVER_SETTINGS
from tests.system.faults import PrefectServer

pytestmark = pytest.mark.system

LEASE_STORAGE = "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"


async def _run_holding_its_slot() -> uuid.UUID:
    """A flow run of a deployment limited to one run at a time, Running: the server's lease id."""
    async with get_client() as client:
        flow_id = await client.create_flow_from_name("lease-holder")
        deployment_id = await client.create_deployment(
            flow_id=flow_id, name="one-at-a-time", concurrency_limit=1, entrypoint="flow.py:f"
        )
        run = await client.create_flow_run_from_deployment(deployment_id)
        for state in (Pending(), Running()):
            assert (await client.set_flow_run_state(run.id, state)).status.value == "ACCEPT"
        details = (await client.read_flow_run(run.id)).state.state_details
        assert details.deployment_concurrency_lease_id is not None
        return details.deployment_concurrency_lease_id


async def _renew(lease_id: uuid.UUID) -> None:
    async with get_client() as client:  # what the flow engine calls every 225 s
        await client.renew_concurrency_lease(lease_id=lease_id, lease_duration=300)


def test_a_running_flow_runs_slot_lease_survives_a_server_restart(tmp_path: Path) -> None:
    server = PrefectServer(tmp_path)
    # The test session's own servers keep leases in memory (tests/conftest.py); this one runs
    # exactly as the local stack's does.
    server.env[LEASE_STORAGE] = LOCAL_SERVER_SETTINGS[LEASE_STORAGE]
    server.start()
    try:
        with temporary_settings({PREFECT_API_URL: server.url}):
            lease_id = asyncio.run(_run_holding_its_slot())
            server.kill()
            server.start()
            asyncio.run(_renew(lease_id))  # 410 Gone with Prefect's in-memory default
    finally:
        server.kill()
