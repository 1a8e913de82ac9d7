"""The receiver's catch-up event: exactly one ``postload.catch-up`` per outage of the Prefect API.

The receiver runs in this process (no lifespan, so no background forwarder): forwards and health
probes are awaited directly against a fake Prefect API (respx), with a real SQLite outbox.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from postload.fivetran.receiver import CATCH_UP_EVENT, ForwardError, Receiver, catch_up_event

API = "http://127.0.0.1:9/api"
SECRET = "whsec-catch-up-unit"


class FakeApi:
    """POST /events, POST /events/filter (by id) and GET /health; ``up`` decides between an
    answer and a refused connection; ``lost`` are ids answered 204 but never stored."""

    def __init__(self) -> None:
        self.up = True
        self.sent: list[dict[str, Any]] = []
        self.lost: set[str] = set()

    def _filter(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content)
        if body.get("limit", 10) > 50:  # as Prefect's API answers
            return httpx.Response(422, json={"loc": ["body", "limit"]})
        wanted = set(body["filter"]["id"]["id"])
        stored = {e["id"] for e in self.sent} - self.lost
        events = [{"id": i} for i in sorted(wanted & stored)]
        return httpx.Response(200, json={"events": events, "next_page": None})

    def _answer(self, ok: httpx.Response) -> Callable[[httpx.Request], httpx.Response]:
        def answer(request: httpx.Request) -> httpx.Response:
            if not self.up:
                raise httpx.ConnectError("connection refused", request=request)
            if request.method == "POST":
                self.sent.extend(json.loads(request.content))
            return ok

        return answer

    def install(self, mock: respx.MockRouter) -> None:
        mock.post(f"{API}/events/filter").mock(side_effect=self._filter)
        mock.post(f"{API}/events").mock(side_effect=self._answer(httpx.Response(204)))
        mock.get(f"{API}/health").mock(side_effect=self._answer(httpx.Response(200, json=True)))

    def catch_ups(self) -> list[dict[str, Any]]:
        return [e for e in self.sent if e["event"] == CATCH_UP_EVENT]


def receiver(outbox: Path) -> Receiver:
    return Receiver(secret=SECRET, outbox_path=outbox, prefect_api_url=API)


def record(r: Receiver, event_id: str) -> None:
    event = {"id": event_id, "occurred": "2026-12-04T00:00:00Z", "event": "x", "resource": {}}
    r.outbox.record(event_id, json.dumps(event))


async def drain(r: Receiver) -> None:
    while await r.forward_pending_once():
        pass


def test_one_catch_up_event_per_outage(tmp_path: Path) -> None:
    api = FakeApi()

    async def scenario() -> None:
        r = receiver(tmp_path / "outbox.sqlite3")
        try:
            record(r, "00000000-0000-0000-0000-000000000001")
            await drain(r)  # the API answers: no outage, no catch-up
            assert api.catch_ups() == [] and r.api_unreachable_since is None

            api.up = False
            record(r, "00000000-0000-0000-0000-000000000002")
            for _ in range(3):  # failed forwards and probes: one outage, its start kept
                with pytest.raises(ForwardError):
                    await r.forward_pending_once()
                assert not await r.probe_api_once()
            since = r.api_unreachable_since
            assert since is not None

            api.up = True
            await drain(r)  # the pending event goes, then the catch-up event queued behind it
            assert await r.probe_api_once()
            await drain(r)
            assert [e["id"] for e in api.catch_ups()] == [catch_up_event(since, _now())["id"]]
            assert api.catch_ups()[0]["payload"]["api_unreachable_since"] == since
            assert r.api_unreachable_since is None

            api.up = False  # a second outage: a second, different catch-up event
            assert not await r.probe_api_once()
            api.up = True
            assert await r.probe_api_once()
            await drain(r)
            # the first catch-up event, forwarded just before and stored, is not sent again
            assert len(api.catch_ups()) == 2
            assert len({e["id"] for e in api.catch_ups()}) == 2
        finally:
            await r.aclose()

    with respx.mock(assert_all_called=False) as mock:
        api.install(mock)
        asyncio.run(scenario())


def test_an_outage_survives_a_receiver_restart_and_is_caught_up_once(tmp_path: Path) -> None:
    api = FakeApi()
    outbox = tmp_path / "outbox.sqlite3"

    async def scenario() -> None:
        first = receiver(outbox)
        api.up = False
        assert not await first.probe_api_once()
        since = first.api_unreachable_since
        await first.aclose()  # a crash: the outage is remembered in the outbox file

        second = receiver(outbox)
        try:
            assert second.api_unreachable_since == since
            api.up = True
            assert await second.probe_api_once()
            assert await second.probe_api_once()
            await drain(second)
        finally:
            await second.aclose()
        third = receiver(outbox)  # restarted again after the catch-up: nothing more to send
        try:
            assert third.api_unreachable_since is None
            assert await third.probe_api_once()
            await drain(third)
        finally:
            await third.aclose()
        assert [e["payload"]["api_unreachable_since"] for e in api.catch_ups()] == [since]

    with respx.mock(assert_all_called=False) as mock:
        api.install(mock)
        asyncio.run(scenario())


def test_the_same_outage_never_queues_two_catch_up_events(tmp_path: Path) -> None:
    r = receiver(tmp_path / "outbox.sqlite3")
    try:
        since = r.outbox.mark_api_unreachable("2026-12-04T22:00:00+00:00")
        assert r.outbox.mark_api_unreachable("2026-12-04T22:00:05+00:00") == since
        event = catch_up_event(since, _now())
        assert r.outbox.end_outage(event["id"], json.dumps(event)) == (True, 0)
        assert r.outbox.end_outage(event["id"], json.dumps(event)) == (False, 0)
        assert r.outbox.counts().pending == 1
    finally:
        asyncio.run(r.aclose())


def test_events_lost_just_before_an_outage_are_sent_again_once(tmp_path: Path) -> None:
    """A server SIGKILLed right after answering 204 may not have stored them: those are sent
    again, and only those (not the stored ones, nor those forwarded long before)."""
    api = FakeApi()
    outbox = tmp_path / "outbox.sqlite3"

    async def scenario() -> None:
        r = receiver(outbox)
        try:
            old, recent = (
                "00000000-0000-0000-0000-00000000000a",
                "00000000-0000-0000-0000-00000000000b",
            )
            stored = "00000000-0000-0000-0000-00000000000c"
            for event_id in (old, recent, stored):
                record(r, event_id)
            await drain(r)
            api.lost |= {old, recent}  # answered 204, then the server died
            with sqlite3.connect(outbox) as db:  # forwarded well before the outage
                db.execute(
                    "update outbox set forwarded_at = '2026-01-01T00:00:00.000000+00:00' "
                    "where id = ?",
                    (old,),
                )
            api.up = False
            assert not await r.probe_api_once()
            api.up = True
            assert await r.probe_api_once()
            await drain(r)
            assert await r.probe_api_once()
            await drain(r)
        finally:
            await r.aclose()
        ids = [e["id"] for e in api.sent]
        assert (ids.count(recent), ids.count(stored), ids.count(old)) == (2, 1, 1)
        assert len(api.catch_ups()) == 1
        assert ids.index(recent, 2) < ids.index(api.catch_ups()[0]["id"])  # resent first

    with respx.mock(assert_all_called=False) as mock:
        api.install(mock)
        asyncio.run(scenario())


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
