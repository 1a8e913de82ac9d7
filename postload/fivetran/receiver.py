"""The Fivetran webhook receiver: verify, record durably, acknowledge, then forward to Prefect.

Self-hosted Prefect has no webhooks, so this small service stands in for them::

    Fivetran --POST /webhooks/fivetran--> receiver --(outbox)--> POST {PREFECT_API_URL}/events

Why an outbox: Fivetran needs a fast 2xx (it retries failures for 24 h, then disables the
webhook), while the Prefect API may be slow, restarting or down. So the request path only checks
the signature and the shape, maps the body to a Prefect event (``postload.fivetran.webhook``) and commits
it to a local SQLite file *before* answering 202. A background forwarder drains that file to
``/events`` in batches and retries with exponential backoff; rows are marked forwarded only on a
2xx, so a crash or an unreachable API delays events but never loses them. The event id is
deterministic, so a redelivery is a duplicate row (ignored here) and a duplicate event (ignored by
Prefect's event store and trigger service), never a second dbt run.

Catch-up: a Prefect server that restarts loses what it held in memory (events it answered 204 for
but had not stored or evaluated, automation actions not yet run). When the API answers again after
failing (a forward, or the health probe sent every ``api_probe_seconds`` while idle), the receiver
queues one ``postload.catch-up`` event for that outage; its id comes from the outage's start,
kept in the outbox file, so it is queued once even across a receiver restart. transform-on-sync's
``on-catch-up`` trigger turns it into one run that builds what the warehouse says is pending.
Of the events forwarded in the ``RESEND_BEFORE_OUTAGE`` before the outage began, those Prefect's
event store does not hold are sent again ahead of it: a server killed right after answering 204
never stored them (measured: a whole burst's 20 events). Only those: Prefect 3.9.1's SQLite event
persister fails a flush whose batch holds only events it already stored, and drops every event
of that flush (measured: 412, 13 of them new).

Run it with ``postload receiver`` (settings: ``POSTLOAD_RECEIVER_*``, the secret from
``POSTLOAD_FIVETRAN_WEBHOOK_SECRET`` or a Prefect Secret block; see ``postload.config``).

One receiver process per outbox file: two forwarders on one file would only double-send (which
Prefect deduplicates), but nothing here coordinates them.

Nothing secret is ever logged or returned: not the webhook secret, the signature header, the
expected digest, the Prefect API key or the request body.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import math
import signal
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import NAMESPACE_URL, uuid5

import httpx
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from postload.fivetran.outbox import Outbox, OutboxCounts
from postload.fivetran.webhook import (
    SIGNATURE_HEADER,
    TEST_EVENT,
    FivetranWebhook,
    signature_problem,
    to_prefect_event,
)

__all__ = [
    "CATCH_UP_EVENT",
    "FORWARD_BATCH_SIZE",
    "MAX_BODY_BYTES",
    "ForwardError",
    "JsonLogFormatter",
    "Outbox",
    "OutboxCounts",
    "Receiver",
    "catch_up_event",
    "create_app",
    "serve",
]

logger = logging.getLogger("postload.receiver")

MAX_BODY_BYTES = 1 << 20
FORWARD_BATCH_SIZE = 100
# A batch is also cut at about this many bytes of JSON (always holding at least one event): bodies
# may be up to 1 MiB each, and 100 of them would make one unreasonably large POST.
FORWARD_BATCH_BYTES = 4 << 20
BACKOFF_INITIAL_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
# Forwarded rows are kept this long so that a redelivery still finds its row and counts as a
# duplicate; it must exceed Fivetran's 24 h retry window.
RETENTION = timedelta(days=7)
# What a 503 for an unwritable outbox asks Fivetran to wait: long enough for an operator's alert
# on a full disk to matter, short next to Fivetran's 24 h of retries.
OUTBOX_UNWRITABLE_RETRY_AFTER_SECONDS = 60
PRUNE_EVERY_SECONDS = 3600.0
# While nothing is pending, the API's health is checked this often, so an outage that no forward
# ran into (a server restart right after the last events went out) still ends in a catch-up event.
API_PROBE_SECONDS = 10.0
CATCH_UP_EVENT = "postload.catch-up"
# Events forwarded this long before an outage was noticed may have been answered 204 by a server
# that died before storing them: the probe interval, the event persister's flush interval
# (Prefect's default 5 s) and its queue under load, with room to spare.
RESEND_BEFORE_OUTAGE = timedelta(seconds=60)
# After an oversized body is refused, up to this much more is read and discarded so the client
# can read the 413 (closing a socket with unread input sends a TCP reset, which can destroy the
# response before the client reads it). Beyond it the connection is simply dropped.
DRAIN_LIMIT_BYTES = 32 << 20
# How many validation problems a 400 lists; the rest are counted, never echoed.
MAX_LISTED_ERRORS = 10
# Bodies nested deeper are refused (400). Fivetran's are a few levels deep; Prefect's API answers
# 500 for an event nested some hundreds deep, and a 500 keeps the forwarder retrying that batch,
# and every event behind it, forever.
MAX_JSON_DEPTH = 64


# --- the receiver ----------------------------------------------------------------------------


class ForwardError(RuntimeError):
    """Forwarding a batch failed in a way worth retrying (network, 5xx, auth); rows stay pending."""


class _TooLarge(Exception):
    pass


def _auth_header(api_key: str | None, auth_string: str | None) -> dict[str, str]:
    # Same precedence as Prefect's own client: a basic-auth string (self-hosted server with
    # PREFECT_SERVER_API_AUTH_STRING) wins over an API key (Prefect Cloud).
    if auth_string:
        token = base64.b64encode(auth_string.encode("utf-8")).decode("ascii")
        return {"Authorization": f"Basic {token}"}
    if api_key:
        return {"Authorization": f"Bearer {api_key}"}
    return {}


class Receiver:
    """The webhook endpoint, the outbox and the forwarder; ``.app`` is the ASGI application.

    The forwarder task runs while the app's lifespan is active. ``forward_pending_once()`` can
    also be awaited directly (tests); call ``aclose()`` afterwards when the lifespan never ran.
    """

    def __init__(
        self,
        *,
        secret: str,
        outbox_path: Path,
        prefect_api_url: str,
        prefect_api_key: str | None = None,
        prefect_auth_string: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        batch_size: int = FORWARD_BATCH_SIZE,
        backoff_initial: float = BACKOFF_INITIAL_SECONDS,
        backoff_max: float = BACKOFF_MAX_SECONDS,
        forward_timeout: float = 10.0,
        retention: timedelta = RETENTION,
        api_probe_seconds: float | None = API_PROBE_SECONDS,
    ) -> None:
        if not secret:
            raise ValueError("the Fivetran webhook secret is empty: refusing to accept unsigned")
        if max_body_bytes <= 0 or batch_size <= 0:
            raise ValueError("max_body_bytes and batch_size must be positive")
        self._secret = secret
        self.outbox_path = Path(outbox_path)
        self.prefect_api_url = prefect_api_url.rstrip("/")
        # For logs and errors: the URL without any user:password it may carry.
        self._api_display = str(httpx.URL(self.prefect_api_url).copy_with(userinfo=b""))
        self.max_body_bytes = max_body_bytes
        self.batch_size = batch_size
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.retention = retention
        self.api_probe_seconds = api_probe_seconds
        self.last_forward_error: str | None = None
        # Why the last event could not be stored (healthz), until one is stored again.
        self.last_record_error: str | None = None
        # POST /events attempts since start (healthz): how many events each request carries.
        self.forward_requests = 0

        # The outbox is used from the event loop directly. A WAL commit without fsync costs tens
        # of microseconds, less than a round trip to a worker thread (measured: ~100 us of CPU
        # and GIL hand-offs per request); the occasional checkpoint fsync stalls the loop for a
        # few milliseconds, which the requests would have waited for anyway.
        self.outbox = Outbox(self.outbox_path)
        # The start of the current outage of the API (UTC ISO-8601), None while it answers.
        self.api_unreachable_since = self.outbox.api_unreachable_since()
        # The start of an outage the API has answered since, whose end is not yet queued.
        self._outage_to_end: str | None = None
        self._client = httpx.AsyncClient(
            base_url=self.prefect_api_url,
            headers={
                "Content-Type": "application/json",
                **_auth_header(prefect_api_key, prefect_auth_string),
            },
            timeout=forward_timeout,
        )
        self._wake = asyncio.Event()
        self._forward_lock = asyncio.Lock()
        self._forwarder: asyncio.Task[None] | None = None
        # Group commit: requests queue their row here, and one callback commits everything
        # queued during the current loop iteration in one transaction.
        self._to_record: list[tuple[str, str, asyncio.Future[bool]]] = []
        self._next_prune = 0.0
        self.app = Starlette(
            routes=[
                Route("/webhooks/fivetran", self._fivetran, methods=["POST"]),
                Route("/healthz", self._healthz, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )
        self.app.state.receiver = self

    def __repr__(self) -> str:  # never the secret or the API key
        return f"Receiver(outbox={self.outbox_path}, api={self._api_display})"

    # -- lifecycle --

    @asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self._forwarder = asyncio.create_task(self._forward_forever(), name="postload-forwarder")
        try:
            yield
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop the forwarder, try one last bounded flush, release the client and the file."""
        if self._forwarder is not None:
            self._forwarder.cancel()
            with suppress(asyncio.CancelledError):
                await self._forwarder
            self._forwarder = None
            # Best effort only: whatever is still pending is forwarded at the next start.
            with suppress(Exception):
                await asyncio.wait_for(self.forward_pending_once(), timeout=2.0)
        await self._client.aclose()
        self.outbox.close()

    # -- HTTP --

    async def _fivetran(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        log: dict[str, Any] = {}
        headers: dict[str, str] = {}
        try:
            status, body = await self._handle_fivetran(request, log)
        except sqlite3.Error as exc:
            # The outbox refused the write (disk full, read-only file or file system, locked):
            # the event is not stored, so it must not be acknowledged. 503 + Retry-After makes
            # Fivetran deliver it again; nothing acknowledged before is touched.
            self.last_record_error = f"{type(exc).__name__}: {exc}"
            log["error"] = "outbox_unwritable"
            logger.error(
                "the outbox %s could not store an event (%s): answering 503 so Fivetran retries",
                self.outbox_path,
                self.last_record_error,
            )
            status, body = (
                503,
                {
                    "error": "the event could not be stored (the receiver's outbox is not "
                    "writable): not accepted; retry later"
                },
            )
            headers["Retry-After"] = str(OUTBOX_UNWRITABLE_RETRY_AFTER_SECONDS)
        except Exception:
            # The event was not recorded: a 5xx makes Fivetran deliver it again later.
            logger.exception("unexpected error handling a Fivetran webhook")
            status, body = 500, {"error": "internal error: the event was not recorded; retry"}
        else:
            if status == 202:
                self.last_record_error = None
        _log_request(request, status, started, **log)
        return JSONResponse(body, status_code=status, headers=headers or None)

    async def _handle_fivetran(
        self, request: Request, log: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        try:
            raw_body = await self._read_body(request)
        except _TooLarge:
            log["error"] = "too_large"
            return 413, {
                "error": f"request body exceeds the {self.max_body_bytes}-byte limit",
            }

        # Authenticity before anything else looks at the content.
        problem = signature_problem(raw_body, request.headers.get(SIGNATURE_HEADER), self._secret)
        if problem is not None:
            log["error"] = "signature"
            return 401, {"error": problem}

        try:
            data = json.loads(raw_body, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            # UnicodeDecodeError is a ValueError; NaN/Infinity are refused because they would
            # make the stored event invalid JSON for the Prefect API.
            log["error"] = "not_json"
            return 400, {"error": "body is not JSON"}
        if not isinstance(data, dict):
            log["error"] = "not_object"
            return 400, {"error": "body is not a JSON object (expected a Fivetran webhook event)"}

        # Fivetran's connectivity check (sent when a webhook is created or activated) has no
        # sync_id and placeholder values: answer 2xx without validating or recording it.
        if data.get("event") == TEST_EVENT:
            log["event"] = TEST_EVENT
            return 200, {"accepted": False, "reason": TEST_EVENT}

        unstorable = _unstorable(data)
        if unstorable is not None:
            log["error"] = "unstorable"
            return 400, {"error": f"body cannot become a Prefect event: {unstorable}"}

        try:
            hook = FivetranWebhook.model_validate(data)
        except ValidationError as exc:
            invalid = _describe_invalid(exc)
            # Field names only (they are ours), never the values.
            log["error"] = "invalid: " + ", ".join(p["field"] for p in invalid["invalid"])
            return 400, invalid
        log["connector_id"] = hook.connector_id

        event = to_prefect_event(hook)
        assert event is not None  # only test_event maps to None, handled above
        event_id = event["id"]
        log["event_id"] = event_id
        # Committed before the 202: once Fivetran hears "accepted", the event is on disk.
        inserted = await self._record(event_id, json.dumps(event, separators=(",", ":")))
        log["duplicate"] = not inserted
        return 202, {"accepted": True, "event_id": event_id, "duplicate": not inserted}

    async def _read_body(self, request: Request) -> bytes:
        """The body, at most ``max_body_bytes``; the declared length and the bytes actually
        received are both checked (a client may lie about, or omit, Content-Length)."""
        declared = request.headers.get("content-length")
        if (
            declared
            and declared.isascii()
            and declared.isdigit()
            and int(declared) > self.max_body_bytes
        ):
            await self._drain(request, already=0)
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._drain(request, already=size)
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    async def _drain(request: Request, *, already: int) -> None:
        # With "Expect: 100-continue" the client waits for us and never sends the body.
        if request.headers.get("expect", "").lower() == "100-continue" and already == 0:
            return
        seen = already
        with suppress(Exception):
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > DRAIN_LIMIT_BYTES:
                    return

    async def _healthz(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        counts = self.outbox.counts()
        age = None
        if counts.oldest_pending_received_at is not None:
            oldest = datetime.fromisoformat(counts.oldest_pending_received_at)
            age = round((datetime.now(UTC) - oldest).total_seconds(), 3)
        body = {
            # "degraded": the last event could not be stored (answered 503); forwarding goes on
            "status": "ok" if self.last_record_error is None else "degraded",
            "last_record_error": self.last_record_error,
            "pending": counts.pending,
            "forwarded": counts.forwarded,
            "rejected": counts.rejected,
            "oldest_pending_age_seconds": age,
            "last_forward_error": self.last_forward_error,
            "forward_requests": self.forward_requests,
            "api_unreachable_since": self.api_unreachable_since,
        }
        _log_request(request, 200, started)
        return JSONResponse(body)

    async def _record(self, event_id: str, event_json: str) -> bool:
        """Commit the event to the outbox; False if it was already there (a redelivery).

        Returns only once the row is committed. Requests handled in the same loop iteration
        share one transaction: under load a commit, not an insert, is what costs.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._to_record.append((event_id, event_json, done))
        if len(self._to_record) == 1:  # the first of a batch schedules its commit
            loop.call_soon(self._commit_queued)
        return await done

    def _commit_queued(self) -> None:
        batch, self._to_record = self._to_record, []
        try:
            results = self.outbox.record_many([(event_id, data) for event_id, data, _ in batch])
        except Exception as exc:
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for (_, _, done), inserted in zip(batch, results, strict=True):
            if not done.done():  # the client may have gone away; the row is stored anyway
                done.set_result(inserted)
        if any(results):
            self._wake.set()

    # -- forwarding --

    async def forward_pending_once(self) -> int:
        """Forward up to one batch of pending events to ``POST {api}/events``.

        Returns how many rows left the pending state (forwarded, or rejected by the API as
        invalid); 0 when nothing was pending. Raises ``ForwardError`` when the API could not take
        them (unreachable, 5xx, auth); those rows stay pending, with ``attempts`` and
        ``last_error`` updated.
        """
        async with self._forward_lock:
            if self._outage_to_end is not None:
                await self._end_outage(self._outage_to_end)
            rows = _cut_at_bytes(self.outbox.pending(self.batch_size), FORWARD_BATCH_BYTES)
            if not rows:
                return 0
            handled = await self._forward(rows)
            self.last_forward_error = None
            return handled

    async def _forward(self, rows: list[tuple[str, str]]) -> int:
        ids = [event_id for event_id, _ in rows]
        # The stored JSON is sent as is: no decode/encode round trip per event.
        content = "[" + ",".join(event_json for _, event_json in rows) + "]"
        self.forward_requests += 1
        try:
            response = await self._client.post("/events", content=content.encode("utf-8"))
        except httpx.HTTPError as exc:
            self._api_unreachable()
            raise self._forward_failed(ids, f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 500:
            self._api_unreachable()
        else:
            self._api_reachable()
        if response.is_success:
            self.outbox.mark_forwarded(ids)
            return len(ids)
        if response.status_code in (400, 422):
            # The API refused the content. Isolate the culprit(s) so one bad event cannot block
            # the queue forever; a refused event is kept (rejected_at), never deleted.
            if len(rows) > 1:
                handled = 0
                for row in rows:
                    handled += await self._forward([row])
                return handled
            error = f"HTTP {response.status_code}: {_snippet(response.text)}"
            self.outbox.mark_rejected(ids[0], error)
            _log(
                logging.ERROR,
                "prefect refused the event; kept as rejected",
                event_id=ids[0],
                error=error,
            )
            return 1
        error = f"HTTP {response.status_code}: {_snippet(response.text)}"
        raise self._forward_failed(ids, error)

    def _api_unreachable(self) -> None:
        if self.api_unreachable_since is None:
            self.api_unreachable_since = self.outbox.mark_api_unreachable(_now_iso())
            _log(logging.WARNING, "prefect api unreachable", since=self.api_unreachable_since)

    def _api_reachable(self) -> None:
        """The API answered: if it was unreachable, that outage's end is queued next pass."""
        if self.api_unreachable_since is None:
            return
        self._outage_to_end = self.api_unreachable_since
        self.api_unreachable_since = None
        self._wake.set()

    async def _end_outage(self, since: str) -> None:
        """Queue the outage's catch-up event, and again the events forwarded just before it
        that Prefect did not store. On an error the outage stays recorded: tried next pass."""
        start = datetime.fromisoformat(since) - RESEND_BEFORE_OUTAGE
        recent = self.outbox.forwarded_since(start.isoformat(timespec="microseconds"))
        try:
            stored = await self._stored_event_ids(recent)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            _log(logging.WARNING, "could not read prefect's events", error=str(exc))
            return
        missing = [event_id for event_id in recent if event_id not in stored]
        event = catch_up_event(since, datetime.now(UTC))
        queued, resent = self.outbox.end_outage(
            event["id"], json.dumps(event, separators=(",", ":")), resend=missing
        )
        self._outage_to_end = None
        _log(
            logging.INFO,
            "prefect api reachable again: catch-up event queued",
            since=since,
            event_id=event["id"],
            queued=queued,
            resent=resent,
        )

    async def _stored_event_ids(self, ids: list[str]) -> set[str]:
        """Which of ``ids`` Prefect's event store holds (POST /events/filter, by id)."""
        stored: set[str] = set()
        until = (datetime.now(UTC) + timedelta(days=1)).isoformat()
        for i in range(0, len(ids), 200):
            body = {
                "filter": {
                    "id": {"id": ids[i : i + 200]},
                    # the store's default window is recent; these ids are found in any
                    "occurred": {"since": "2000-01-01T00:00:00+00:00", "until": until},
                },
                "limit": 50,  # the API's maximum page; next_page has the rest
            }
            response = await self._client.post("/events/filter", json=body)
            while True:
                response.raise_for_status()
                page = response.json()
                stored |= {str(event["id"]) for event in page["events"]}
                if not page.get("next_page"):
                    break
                response = await self._client.get(page["next_page"])
        return stored

    async def probe_api_once(self) -> bool:
        """GET {api}/health; True when the API answered (any status below 500)."""
        try:
            response = await self._client.get("/health")
        except httpx.HTTPError:
            self._api_unreachable()
            return False
        if response.status_code >= 500:
            self._api_unreachable()
            return False
        self._api_reachable()
        return True

    def _forward_failed(self, ids: list[str], error: str) -> ForwardError:
        """Record a failed attempt on the rows; returns the error for the caller to raise."""
        error = f"POST {self._api_display}/events failed: {error}"
        self.last_forward_error = error
        self.outbox.mark_failed(ids, error)
        return ForwardError(error)

    async def _forward_forever(self) -> None:
        delay = self.backoff_initial
        while True:
            # Cleared before reading the outbox: a row recorded after the read sets it again,
            # so the wait below cannot miss it.
            self._wake.clear()
            try:
                handled = await self.forward_pending_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, ForwardError):
                    # A bug or a broken outbox file: keep the task alive and keep retrying.
                    logger.exception("unexpected forwarder error")
                    self.last_forward_error = f"{type(exc).__name__}: {exc}"
                _log(
                    logging.WARNING,
                    "forward failed",
                    retry_in_s=delay,
                    error=self.last_forward_error,
                )
                # New events do not cut the backoff short: hammering a down API helps nobody.
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            delay = self.backoff_initial
            self._maybe_prune()
            if handled:
                continue  # more may be waiting: go again until a pass finds nothing
            if self.api_probe_seconds is None:
                await self._wake.wait()
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), self.api_probe_seconds)
            except TimeoutError:
                with suppress(Exception):  # a probe that fails is recorded, never fatal
                    await self.probe_api_once()

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY_SECONDS
        with suppress(sqlite3.Error):
            self.outbox.prune(datetime.now(UTC) - self.retention)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def catch_up_event(api_unreachable_since: str, reachable_at: datetime) -> dict[str, Any]:
    """The Prefect event that asks for a catch-up run after an outage of the API that began at
    ``api_unreachable_since``: one id per outage (from its start), so sent once."""
    return {
        "id": str(uuid5(NAMESPACE_URL, f"postload:catch-up:{api_unreachable_since}")),
        "occurred": reachable_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "event": CATCH_UP_EVENT,
        "resource": {
            "prefect.resource.id": "postload.receiver",
            "prefect.resource.name": "postload receiver",
        },
        "payload": {
            "api_unreachable_since": api_unreachable_since,
            "api_reachable_at": reachable_at.astimezone(UTC).isoformat(timespec="seconds"),
        },
    }


def _cut_at_bytes(rows: list[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """The leading rows whose JSON fits in ``limit`` bytes (always at least the first)."""
    total = 0
    for i, (_, event_json) in enumerate(rows):
        total += len(event_json)
        if total > limit and i > 0:
            return rows[:i]
    return rows


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unstorable(body: Any) -> str | None:
    """Why the parsed body cannot be forwarded as a Prefect event, or None.

    Each reason is something ``json.loads`` accepts but the Prefect API cannot store: it answers
    500 for a lone UTF-16 surrogate (a ``"\\ud800"`` escape) and for deep nesting, which would
    block the outbox, and ``1e400`` parses as infinity, which is not JSON at all.
    """
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"nested deeper than {MAX_JSON_DEPTH} levels"
        for child in [*node, *node.values()] if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
            elif isinstance(child, str) and not child.isascii() and not _is_utf8(child):
                return "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)"
            elif isinstance(child, float) and not math.isfinite(child):
                return "a number is out of the range of a double"
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


def _describe_invalid(exc: ValidationError) -> dict[str, Any]:
    """A 400 body naming each invalid field and its expected form, without echoing the input."""
    problems = []
    for err in exc.errors(include_input=False, include_url=False, include_context=False):
        field = ".".join(str(part) for part in err["loc"]) or "(body)"
        problems.append({"field": field, "expected": err["msg"]})
    listed = problems[:MAX_LISTED_ERRORS]
    fields = ", ".join(p["field"] for p in listed)
    more = len(problems) - len(listed)
    return {
        "error": f"invalid Fivetran webhook body: {fields}" + (f" and {more} more" if more else ""),
        "invalid": listed,
    }


def _log(level: int, msg: str, **fields: Any) -> None:
    logger.log(level, msg, extra={"fields": fields})


def _log_request(request: Request, status: int, started: float, **fields: Any) -> None:
    """One line per request. Never the body, the signature header or any secret."""
    _log(
        logging.INFO,
        "request",
        method=request.method,
        path=request.scope["path"],  # not request.url: building a URL costs ~20 us
        status=status,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        connector_id=fields.pop("connector_id", None),
        event_id=fields.pop("event_id", None),
        **fields,
    )


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, the record's ``fields`` and, for
    ``logger.exception``, the traceback as one string field (so a line is still one record)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


# --- entry points ----------------------------------------------------------------------------


def create_app(
    *,
    secret: str,
    outbox_path: Path,
    prefect_api_url: str,
    prefect_api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    **options: Any,
) -> Starlette:
    """The ASGI app; ``app.state.receiver`` is the ``Receiver`` (options: see its signature)."""
    return Receiver(
        secret=secret,
        outbox_path=outbox_path,
        prefect_api_url=prefect_api_url,
        prefect_api_key=prefect_api_key,
        max_body_bytes=max_body_bytes,
        **options,
    ).app


def _configure_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr for the receiver's logger (idempotent)."""
    if any(isinstance(h.formatter, JsonLogFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def serve(
    host: str = "127.0.0.1",
    port: int = 8787,
    *,
    secret_source: str | None = None,
    **options: Any,
) -> None:
    """Run the receiver with uvicorn until SIGINT/SIGTERM (options: ``create_app``'s).

    ``secret_source`` only names where the secret came from, for the start-up log line. After a
    graceful shutdown the function returns normally, so the process exits 0.
    """
    import uvicorn

    _configure_logging()
    app = create_app(**options)
    receiver: Receiver = app.state.receiver
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        # Our own request line replaces uvicorn's access log (it has the event id and no query).
        access_log=False,
        log_level="info",
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    config.load()  # imports uvicorn's protocol modules now, so the freeze below covers them
    _log(
        logging.INFO,
        "starting",
        host=host,
        port=port,
        outbox=str(receiver.outbox_path),
        prefect_api=receiver._api_display,
        max_body_bytes=receiver.max_body_bytes,
        secret_source=secret_source,
    )
    # Everything allocated so far (modules, the app) lives as long as the process: moving it out
    # of the collector's reach makes full collections cheap. Measured on the ack path: p99
    # 55 ms -> 36 ms at 32 concurrent requests (bench/receiver.py), the same CPU per request.
    gc.collect()
    gc.freeze()
    server = uvicorn.Server(config)
    with _exit_cleanly_after_shutdown(server):
        server.run()


@contextmanager
def _exit_cleanly_after_shutdown(server: Any) -> Iterator[None]:
    """Make a completed graceful shutdown end the process with exit code 0.

    uvicorn handles SIGTERM/SIGINT itself (drain, lifespan shutdown, last outbox flush), then
    raises the same signal again with the handler that was installed before it started, so that
    the default action still happens: death by SIGTERM (exit 143) or a KeyboardInterrupt. A
    supervisor (systemd, Docker, Kubernetes) reads either as a crash although the shutdown was
    complete, so the handler installed here lets that second delivery pass. A signal that comes
    before uvicorn took over still stops the process at once, with the conventional 128 + signal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers; uvicorn installs none there either
        return

    def after_shutdown(signum: int, frame: Any) -> None:
        if not server.should_exit:
            raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, after_shutdown) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
