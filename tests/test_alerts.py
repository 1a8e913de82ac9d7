"""Failure automations on the real Prefect server, with a loopback HTTP server standing in for Slack.

Slack's incoming webhooks take ``POST`` with a JSON body ``{"text": ...}`` and answer ``200 ok``;
the fake accepts exactly that (anything else is recorded as a protocol error) and can be told to
answer 500. Messages are awaited by polling with a deadline; "exactly one" is checked after a
sentinel message that the same automations send later has arrived.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prefect.automations import Automation
from prefect.client.orchestration import get_client

from postload.alerts import apply_automations, automation_specs
from postload.blocks import slack_notification_block
from tests.conftest import PostloadHome


@dataclass
class FakeSlack:
    url: str
    status: int = 200
    messages: list[str] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)

    def wait_for(self, needle: str, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.messages if needle in m]
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"no Slack message containing {needle!r}; got {self.messages}")


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    fake = FakeSlack(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                payload = json.loads(body)
                assert self.headers.get("Content-Type", "").startswith("application/json")
                assert isinstance(payload.get("text"), str)
                fake.messages.append(payload["text"])
            except (ValueError, AssertionError):
                fake.protocol_errors.append(body.decode(errors="replace"))
            self.send_response(fake.status)
            self.end_headers()
            self.wfile.write(b"ok" if fake.status == 200 else b"internal_error")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_port}/services/T0/B0/secretpath"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    assert fake.protocol_errors == []


@pytest.fixture
def automations(prefect_server: str, slack: FakeSlack) -> Iterator[FakeSlack]:
    block_id = slack_notification_block(slack.url).save(
        f"test-slack-{uuid.uuid4().hex[:8]}", overwrite=True
    )
    apply_automations(block_id)
    yield slack
    for spec in automation_specs():  # other tests' failures must not page this fake
        with contextlib.suppress(ValueError):
            Automation.read(name=spec.name).delete()


def post_event(api_url: str, event: str, resource: dict, payload: dict) -> None:
    httpx.post(
        f"{api_url}/events",
        json=[
            {
                "id": str(uuid.uuid4()),
                "occurred": datetime.now(UTC).isoformat(),
                "event": event,
                "resource": resource,
                "payload": payload,
            }
        ],
    ).raise_for_status()


def sentinel(api_url: str) -> str:
    """A failed-sync event whose message, once received, proves earlier ones were delivered."""
    connector = f"sentinel_{uuid.uuid4().hex[:8]}"
    post_event(
        api_url,
        "fivetran.sync.failed",
        {
            "prefect.resource.id": f"fivetran.connector.{connector}",
            "fivetran.connector_id": connector,
        },
        {"event": "sync_end", "data": {"status": "FAILURE"}},
    )
    return connector


def test_reapplying_updates_and_never_duplicates(automations: FakeSlack) -> None:
    block_id = slack_notification_block(automations.url).save(
        f"test-slack-{uuid.uuid4().hex[:8]}", overwrite=True
    )
    second = apply_automations(block_id)
    assert {a.action for a in second} == {"updated"}
    with get_client(sync_client=True) as client:
        names = [a.name for a in client.read_automations()]
    for spec in automation_specs():
        assert names.count(spec.name) == 1


def test_broken_model_fails_the_flow_and_slack_gets_one_message_naming_it(
    prefect_server: str, postload_home: PostloadHome, automations: FakeSlack
) -> None:
    from flows.full_run_when_fresh import full_run_when_fresh
    from tests.flows.test_full_run_when_fresh import land

    (postload_home.root / "dbt_project" / "models" / "marts" / "broken_orders.sql").write_text(
        "select * from {{ ref('stg_orders') }} where no_such_column = 1\n"
    )
    for source in ("customers", "orders", "events"):
        land(postload_home, source, 1)

    state = full_run_when_fresh(reason="test", return_state=True)
    assert state.is_failed()

    (message,) = automations.wait_for("broken_orders")
    assert "full-run-when-fresh" in message and "Failed" in message
    # once a later message has arrived, a duplicate of the first would have too
    automations.wait_for(sentinel(prefect_server))
    assert len([m for m in automations.messages if "broken_orders" in m]) == 1


def test_dbt_project_that_fails_to_parse_is_one_message(
    prefect_server: str, postload_home: PostloadHome, automations: FakeSlack
) -> None:
    from flows.full_run_when_fresh import full_run_when_fresh

    sources = postload_home.root / "dbt_project" / "models" / "staging" / "orders"
    (sources / "_orders__sources.yml").write_text("sources: [ {name: orders, tables: [\n")
    state = full_run_when_fresh(reason="test", return_state=True)
    assert state.is_failed()

    (_message,) = automations.wait_for("_orders__sources.yml")
    automations.wait_for(sentinel(prefect_server))
    assert len([m for m in automations.messages if "_orders__sources.yml" in m]) == 1


def test_failed_sync_event_becomes_a_slack_message(
    prefect_server: str, automations: FakeSlack
) -> None:
    connector = f"conn_{uuid.uuid4().hex[:8]}"
    post_event(
        prefect_server,
        "fivetran.sync.failed",
        {
            "prefect.resource.id": f"fivetran.connector.{connector}",
            "prefect.resource.name": "pg prod",
            "fivetran.connector_id": connector,
            "fivetran.sync_id": "sync-77",
        },
        {"event": "sync_end", "data": {"status": "FAILURE_WITH_TASK", "reason": "auth expired"}},
    )
    (message,) = automations.wait_for(connector)
    assert "Fivetran sync failed for pg prod" in message
    assert "sync-77" in message and "FAILURE_WITH_TASK: auth expired" in message


def test_slack_returning_500_breaks_nothing(prefect_server: str, automations: FakeSlack) -> None:
    """Slack down: the server attempts the notification, gives up after its own message retries
    (prefect 3.9.1 logs the HTTP error and dead-letters the action; it emits no
    ``prefect.automation.action.failed`` event for a block's HTTP error), and keeps notifying
    once Slack is back."""
    automations.status = 500
    refused = sentinel(prefect_server)
    automations.wait_for(refused)  # attempted, answered 500
    automations.status = 200
    automations.wait_for(sentinel(prefect_server))
    assert automations.protocol_errors == []


def test_no_secret_in_the_block_document(
    prefect_server: str, slack: FakeSlack, tmp_path: Path
) -> None:
    name = f"test-slack-{uuid.uuid4().hex[:8]}"
    slack_notification_block(slack.url).save(name, overwrite=True)
    with get_client(sync_client=True) as client:
        doc = client.read_block_document_by_name(name, "custom-webhook", include_secrets=False)
    assert "secretpath" not in json.dumps(doc.data, default=str)
