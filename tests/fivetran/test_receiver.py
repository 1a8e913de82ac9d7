"""The webhook receiver as a real process: signed requests in, Prefect events out.

Each receiver is a ``python -c`` subprocess running ``postload.fivetran.receiver.serve`` (or the
``postload receiver`` command) on a free loopback port with its own outbox file, forwarding to
the session's Prefect test server (or to a closed port, to play an outage). Readiness is
``GET /healthz`` answering; arrival in Prefect is polled on ``POST /events/filter``; both are
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.blocks.system import Secret

from postload.fivetran.receiver import Receiver
from tests.conftest import assert_no_secret_in, suite_secret

REPO = Path(__file__).resolve().parents[2]
POSTLOAD = Path(sys.executable).parent / "postload"
SECRET = suite_secret("receiver: webhook secret", "whsec-itest-5d7e0c2a9b")
HEADER = "X-Fivetran-Signature-256"
READY_TIMEOUT = 30.0
ARRIVAL_TIMEOUT = 60.0  # the server's event persister flushes every few seconds

# The secret travels in the environment, not argv: argv is visible to every user via `ps`.
SERVE = """
import os
from pathlib import Path
from postload.fivetran.receiver import serve
serve(
    "127.0.0.1",
    int(os.environ["RECEIVER_PORT"]),
    secret=os.environ["RECEIVER_SECRET"],
    outbox_path=Path(os.environ["RECEIVER_OUTBOX"]),
    prefect_api_url=os.environ["RECEIVER_API_URL"],
)
"""


def cli_env(workdir: Path, **values: str) -> dict[str, str]:
    """The environment of a ``postload`` process: this one's without any postload setting or
    Prefect API/profile of the machine (so only ``values`` decide), run from ``workdir``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(
            ("POSTLOAD_", "PREFECT_API_", "PREFECT_PROFILES_PATH", "PREFECT_HOME")
        )
    }
    env |= {"PREFECT_HOME": str(workdir / "prefect-home"), "POSTLOAD_PROJECT_DIR": str(workdir)}
    return env | values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def now_iso(offset_seconds: float = 0.0) -> str:
    # Prefect's event filter stops at "now": an event must not be dated in the future.
    moment = datetime.now(UTC) - timedelta(seconds=5) + timedelta(seconds=offset_seconds)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_connector() -> str:
    return f"conn_{uuid.uuid4().hex[:12]}"


def webhook(connector_id: str, event: str = "sync_end", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event": event,
        "created": now_iso(),
        "connector_type": "postgres",
        "connector_id": connector_id,
        "connector_name": f"pg {connector_id}",
        "sync_id": str(uuid.uuid4()),
        "destination_group_id": "warm_ambitious",
    }
    if event == "sync_end":
        body["data"] = {"status": "SUCCESSFUL"}
    body.update(overrides)
    return body


class ReceiverProcess:
    """One receiver subprocess; its stdout/stderr go to files (a full pipe would block it)."""

    def __init__(
        self, workdir: Path, outbox: Path, api_url: str, cli: dict[str, str] | None = None
    ) -> None:
        """``cli``: run ``postload receiver --port PORT`` with these settings added to its
        environment (the secret's), instead of calling ``serve`` directly."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.outbox = outbox
        workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = workdir / f"receiver-{self.port}.out"
        self.stderr_path = workdir / f"receiver-{self.port}.err"
        if cli is None:
            argv = [sys.executable, "-c", SERVE]
            cwd = REPO
            env = {
                **os.environ,
                "RECEIVER_PORT": str(self.port),
                "RECEIVER_SECRET": SECRET,
                "RECEIVER_OUTBOX": str(outbox),
                "RECEIVER_API_URL": api_url,
            }
        else:
            argv = [str(POSTLOAD), "receiver", "--port", str(self.port)]
            cwd = workdir  # no .env file is read
            env = cli_env(
                workdir,
                PREFECT_API_URL=api_url,
                POSTLOAD_RECEIVER_OUTBOX=str(outbox),
                # --port must win over the setting: nothing would answer on this one.
                POSTLOAD_RECEIVER_PORT=str(free_port()),
                **cli,
            )
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err)
        self.client = httpx.Client(base_url=self.base_url, timeout=10.0)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"receiver exited {self.proc.returncode}:\n{self.output()}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"receiver not ready after {READY_TIMEOUT}s:\n{self.output()}")

    def post(self, body: bytes, signature: str | None = "sign") -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if signature == "sign":
            headers[HEADER] = sign(body)
        elif signature is not None:
            headers[HEADER] = signature
        return self.client.post("/webhooks/fivetran", content=body, headers=headers)

    def send(self, payload: dict[str, Any]) -> httpx.Response:
        return self.post(json.dumps(payload).encode())

    def health(self) -> dict[str, Any]:
        response = self.client.get("/healthz")
        assert response.status_code == 200
        return response.json()

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    def stop(self) -> int:
        """Graceful stop (SIGTERM, like a deployment would), bounded; the exit code."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert_no_secret_in(self.stdout_path)
        assert_no_secret_in(self.stderr_path)
        return self.proc.returncode

    def log_records(self) -> list[dict[str, Any]]:
        """The receiver's own log lines (JSON), in order."""
        return [json.loads(line) for line in self.output().splitlines() if line.startswith("{")]

    def kill9(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class Receivers:
    """Receivers started by one fixture; closing stops them and checks their output."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[ReceiverProcess] = []

    def start(
        self, api_url: str, outbox: Path | None = None, cli: dict[str, str] | None = None
    ) -> ReceiverProcess:
        outbox = outbox or self.workdir / f"outbox-{len(self.started)}.sqlite3"
        receiver = ReceiverProcess(self.workdir, outbox, api_url, cli)
        self.started.append(receiver)
        return receiver

    def close(self) -> None:
        for receiver in self.started:
            receiver.stop()
        for receiver in self.started:
            output = receiver.output()
            assert SECRET not in output, "the webhook secret leaked into the receiver's output"
            # No signature or digest either: nothing 64-hex-long is ever logged.
            assert not re.search(r"[0-9a-fA-F]{64}", output), "a digest leaked into the output"
            for line in output.splitlines():
                if line.startswith("{"):  # the receiver's own lines are JSON, one per record
                    assert "msg" in json.loads(line)


@pytest.fixture
def start_receiver(tmp_path: Path) -> Iterator[Callable[..., ReceiverProcess]]:
    """Start receivers on demand (for outages and restarts)."""
    receivers = Receivers(tmp_path)
    yield receivers.start
    receivers.close()


@pytest.fixture(scope="module")
def receiver(
    prefect_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReceiverProcess]:
    """One receiver shared by the stateless cases (a process start costs ~1.5 s)."""
    receivers = Receivers(tmp_path_factory.mktemp("receiver"))
    yield receivers.start(prefect_server)
    receivers.close()


@pytest.fixture
def unreachable_api() -> str:
    # Nothing listens there: connections are refused at once.
    return f"http://127.0.0.1:{free_port()}/api"


def prefect_events(api_url: str, name: str, connector_id: str) -> list[dict[str, Any]]:
    response = httpx.post(
        f"{api_url}/events/filter",
        json={
            "filter": {
                "event": {"name": [name]},
                "resource": {"id": [f"fivetran.connector.{connector_id}"]},
            },
            "limit": 50,
        },
        timeout=10.0,
    )
    response.raise_for_status()
    return response.json()["events"]


def wait_for_events(
    api_url: str, name: str, connector_id: str, count: int = 1
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while True:
        events = prefect_events(api_url, name, connector_id)
        if len(events) >= count:
            return events
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(events)}/{count} {name} event(s) for {connector_id} in Prefect "
                f"after {ARRIVAL_TIMEOUT}s"
            )
        time.sleep(0.25)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def outbox_rows(outbox: Path) -> list[dict[str, Any]]:
    # A second reader on a WAL database is safe while the receiver writes.
    with sqlite3.connect(outbox) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("select * from outbox order by received_at")]


# --- the happy path --------------------------------------------------------------------------


def test_signed_sync_end_reaches_prefect(prefect_server: str, receiver: ReceiverProcess) -> None:
    connector = new_connector()
    payload = webhook(connector)
    response = receiver.send(payload)
    assert response.status_code == 202
    body = response.json()
    assert body["accepted"] is True and body["duplicate"] is False

    [event] = wait_for_events(prefect_server, "fivetran.sync.succeeded", connector)
    assert event["id"] == body["event_id"]
    assert event["resource"]["fivetran.connector_id"] == connector
    assert event["resource"]["fivetran.sync_id"] == payload["sync_id"]
    assert event["resource"]["prefect.resource.name"] == payload["connector_name"]
    assert event["payload"] == payload

    wait_until(lambda: receiver.health()["pending"] == 0, "the outbox to drain")
    health = receiver.health()
    assert health["last_forward_error"] is None
    assert health["forward_requests"] >= 1


def test_upper_case_signature_is_accepted(receiver: ReceiverProcess) -> None:
    body = json.dumps(webhook(new_connector())).encode()
    assert receiver.post(body, signature=sign(body).upper()).status_code == 202


def test_failed_sync_end_becomes_failed_event(
    prefect_server: str, receiver: ReceiverProcess
) -> None:
    connector = new_connector()
    payload = webhook(connector, data={"status": "FAILURE_WITH_TASK", "reason": "x"})
    assert receiver.send(payload).status_code == 202
    wait_for_events(prefect_server, "fivetran.sync.failed", connector)


def test_unknown_event_type_is_accepted(prefect_server: str, receiver: ReceiverProcess) -> None:
    connector = new_connector()
    response = receiver.send(webhook(connector, event="brand_new_thing"))
    assert response.status_code == 202
    wait_for_events(prefect_server, "fivetran.brand_new_thing", connector)


def test_out_of_order_delivery_is_accepted(prefect_server: str, receiver: ReceiverProcess) -> None:
    connector = new_connector()
    sync_id = str(uuid.uuid4())
    end = webhook(connector, sync_id=sync_id, created=now_iso(1))
    start = webhook(connector, "sync_start", sync_id=sync_id, created=now_iso(0))
    assert receiver.send(end).status_code == 202  # sync_end arrives first
    assert receiver.send(start).status_code == 202
    wait_for_events(prefect_server, "fivetran.sync.succeeded", connector)
    wait_for_events(prefect_server, "fivetran.sync_start", connector)


def test_duplicate_deliveries_are_one_event(prefect_server: str, receiver: ReceiverProcess) -> None:
    connector = new_connector()
    body = json.dumps(webhook(connector)).encode()
    answers = [receiver.post(body) for _ in range(5)]
    assert [a.status_code for a in answers] == [202] * 5
    assert [a.json()["duplicate"] for a in answers] == [False, True, True, True, True]
    assert len({a.json()["event_id"] for a in answers}) == 1

    assert [r["id"] for r in outbox_rows(receiver.outbox)].count(answers[0].json()["event_id"]) == 1
    wait_for_events(prefect_server, "fivetran.sync.succeeded", connector)
    wait_until(lambda: receiver.health()["pending"] == 0, "the outbox to drain")
    # Everything the receiver had is forwarded, and it had one row: still exactly one event.
    assert len(prefect_events(prefect_server, "fivetran.sync.succeeded", connector)) == 1


def test_test_event_is_acknowledged_and_not_recorded(receiver: ReceiverProcess) -> None:
    # Fivetran's creation-time ping: no sync_id, no connector_name, placeholder values.
    ping = {
        "event": "test_event",
        "created": "timestamp",
        "connector_type": "_connector_type",
        "connector_id": "_connector_1",
        "group_id": "_destination_1",
    }
    before = len(outbox_rows(receiver.outbox))
    response = receiver.send(ping)
    assert response.status_code == 200
    assert response.json() == {"accepted": False, "reason": "test_event"}
    assert len(outbox_rows(receiver.outbox)) == before


# --- refusals --------------------------------------------------------------------------------


def test_unsigned_request_is_401(receiver: ReceiverProcess) -> None:
    response = receiver.post(json.dumps(webhook(new_connector())).encode(), signature=None)
    assert response.status_code == 401
    assert "missing X-Fivetran-Signature-256" in response.json()["error"]


@pytest.mark.parametrize("signature", ["0" * 64, "garbage", "sha256=abc"])
def test_wrong_signature_is_401(receiver: ReceiverProcess, signature: str) -> None:
    body = json.dumps(webhook(new_connector())).encode()
    response = receiver.post(body, signature=signature)
    assert response.status_code == 401
    assert SECRET not in response.text and sign(body) not in response.text.lower()


def test_signed_with_another_secret_is_401(receiver: ReceiverProcess) -> None:
    body = json.dumps(webhook(new_connector())).encode()
    response = receiver.post(body, signature=sign(body, "not-the-secret"))
    assert response.status_code == 401
    assert "does not match" in response.json()["error"]
    assert sign(body) not in response.text.lower()


def test_truncated_body_is_401(receiver: ReceiverProcess) -> None:
    body = json.dumps(webhook(new_connector())).encode()
    before = len(outbox_rows(receiver.outbox))
    response = receiver.post(body[:-10], signature=sign(body))
    assert response.status_code == 401
    assert len(outbox_rows(receiver.outbox)) == before


@pytest.mark.parametrize("body", [b"not json at all", b'{"event": ', b"\xff\xfe", b"[NaN]"])
def test_non_json_is_400(receiver: ReceiverProcess, body: bytes) -> None:
    response = receiver.post(body)
    assert response.status_code == 400
    assert response.json() == {"error": "body is not JSON"}


def test_json_that_is_not_an_object_is_400(receiver: ReceiverProcess) -> None:
    response = receiver.post(b"[1, 2, 3]")
    assert response.status_code == 400
    assert "not a JSON object" in response.json()["error"]


def test_wrong_shape_is_400_naming_the_field(receiver: ReceiverProcess) -> None:
    payload = webhook("x'; drop table raw.events; --", sync_id=12)
    before = len(outbox_rows(receiver.outbox))
    response = receiver.send(payload)
    assert response.status_code == 400
    body = response.json()
    assert {p["field"] for p in body["invalid"]} == {"connector_id", "sync_id"}
    assert "connector_id" in body["error"] and "sync_id" in body["error"]
    assert "drop table" not in response.text  # the input is never echoed
    assert len(outbox_rows(receiver.outbox)) == before


def test_huge_invalid_field_is_not_echoed(receiver: ReceiverProcess) -> None:
    response = receiver.send(webhook(new_connector(), connector_name="n" * 500_000))
    assert response.status_code == 400
    assert response.json()["invalid"][0]["field"] == "connector_name"
    assert len(response.content) < 2_000


def test_huge_body_is_413(receiver: ReceiverProcess) -> None:
    body = b'{"event": "sync_end", "pad": "' + b"x" * (1 << 20) + b'"}'
    response = receiver.post(body)
    assert response.status_code == 413
    assert "1048576-byte limit" in response.json()["error"]


def test_huge_streamed_body_without_length_is_413(receiver: ReceiverProcess) -> None:
    # Chunked transfer, no Content-Length: the bytes actually received are counted.
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    response = receiver.client.post(
        "/webhooks/fivetran", content=chunks(), headers={HEADER: "0" * 64}
    )
    assert response.status_code == 413
    # The connection stays usable and the receiver healthy.
    assert receiver.health()["status"] == "ok"


# --- outages and crashes ---------------------------------------------------------------------


def test_unreachable_prefect_loses_nothing(
    prefect_server: str,
    unreachable_api: str,
    start_receiver: Callable[..., ReceiverProcess],
    tmp_path: Path,
) -> None:
    outbox = tmp_path / "outage.sqlite3"
    connectors = [new_connector() for _ in range(3)]
    down = start_receiver(unreachable_api, outbox)
    for connector in connectors:
        assert down.send(webhook(connector)).status_code == 202  # acked despite the outage

    wait_until(lambda: down.health()["last_forward_error"] is not None, "a forward attempt")
    health = down.health()
    assert health["pending"] == 3 and health["forwarded"] == 0
    assert "ConnectError" in health["last_forward_error"]
    # The forwarder keeps retrying (with backoff) every row it holds.
    wait_until(
        lambda: all(row["attempts"] >= 1 for row in outbox_rows(outbox)), "retries of every row"
    )
    assert all(row["forwarded_at"] is None for row in outbox_rows(outbox))
    down.stop()

    up = start_receiver(prefect_server, outbox)  # same outbox, the right API
    for connector in connectors:
        wait_for_events(prefect_server, "fivetran.sync.succeeded", connector)
    wait_until(lambda: up.health()["pending"] == 0, "the outbox to drain")
    # The three events, and the one postload.catch-up event of the outage the first process saw.
    assert up.health()["forwarded"] == 4
    events = [json.loads(row["event"]) for row in outbox_rows(outbox)]
    assert [e["event"] for e in events].count("postload.catch-up") == 1


def test_kill_9_after_ack_loses_nothing(
    prefect_server: str,
    unreachable_api: str,
    start_receiver: Callable[..., ReceiverProcess],
    tmp_path: Path,
) -> None:
    # The first process cannot forward, so the event is provably still pending when it dies.
    outbox = tmp_path / "crash.sqlite3"
    connector = new_connector()
    doomed = start_receiver(unreachable_api, outbox)
    response = doomed.send(webhook(connector))
    assert response.status_code == 202
    doomed.kill9()  # no shutdown hook, no final flush

    [row] = outbox_rows(outbox)
    assert row["id"] == response.json()["event_id"] and row["forwarded_at"] is None

    start_receiver(prefect_server, outbox)
    [event] = wait_for_events(prefect_server, "fivetran.sync.succeeded", connector)
    assert event["id"] == response.json()["event_id"]


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs) the test can fill."""
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as f:  # ENOSPC: the file system is full
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    return filler


def test_unwritable_outbox_answers_503_and_loses_nothing_acknowledged(
    unreachable_api: str,
    start_receiver: Callable[..., ReceiverProcess],
    small_filesystem: Path,
) -> None:
    outbox = small_filesystem / "outbox.sqlite3"
    receiver = start_receiver(unreachable_api, outbox)  # forwarding fails: rows stay pending
    accepted: set[str] = set()
    for _ in range(3):
        response = receiver.send(webhook(new_connector()))
        assert response.status_code == 202
        accepted.add(response.json()["event_id"])

    # Full disk: SQLite may still fit a row or two in pages it holds; then every delivery must
    # be refused with a 503 (never a 202 for an event it could not store).
    filler = _fill(small_filesystem)
    refused: list[dict[str, Any]] = []
    for _ in range(40):
        body = webhook(new_connector())
        response = receiver.send(body)
        assert response.status_code in (202, 503), response.text
        if response.status_code == 202:
            accepted.add(response.json()["event_id"])
            continue
        assert response.headers["Retry-After"] == "60"
        assert "not accepted" in response.json()["error"]
        refused.append(body)
        if len(refused) == 3:
            break
    assert len(refused) == 3, "a full disk never produced a 503"
    health = receiver.health()
    assert health["status"] == "degraded" and "full" in health["last_record_error"]

    # Space comes back; Fivetran's retries of the refused deliveries are accepted.
    filler.unlink()
    for body in refused:
        response = receiver.send(body)
        assert response.status_code == 202 and not response.json()["duplicate"]
        accepted.add(response.json()["event_id"])
    assert receiver.health()["status"] == "ok"

    assert receiver.health()["pending"] == len(accepted)
    receiver.stop()
    assert {row["id"] for row in outbox_rows(outbox)} == accepted


def test_event_refused_by_prefect_is_kept_aside(prefect_server: str, tmp_path: Path) -> None:
    """A row the API refuses (422) must not block the rows behind it, and is kept, not deleted."""
    outbox = tmp_path / "poison.sqlite3"
    receiver = Receiver(secret=SECRET, outbox_path=outbox, prefect_api_url=prefect_server)
    connector = new_connector()
    good = {
        "id": str(uuid.uuid4()),
        "occurred": now_iso(),
        "event": "fivetran.sync.succeeded",
        "resource": {"prefect.resource.id": f"fivetran.connector.{connector}"},
    }
    receiver.outbox.record("poison", json.dumps({"event": "no id, no occurred"}))
    receiver.outbox.record(good["id"], json.dumps(good))

    async def forward() -> int:
        try:
            return await receiver.forward_pending_once()
        finally:
            await receiver.aclose()

    assert asyncio.run(forward()) == 2
    rows = {row["id"]: row for row in outbox_rows(outbox)}
    assert rows["poison"]["rejected_at"] is not None
    assert rows["poison"]["last_error"].startswith("HTTP 422")
    assert rows[good["id"]]["forwarded_at"] is not None
    wait_for_events(prefect_server, "fivetran.sync.succeeded", connector)


def test_forward_batches_are_cut_by_size() -> None:
    from postload.fivetran.receiver import _cut_at_bytes

    rows = [(str(i), "x" * 400) for i in range(5)]
    assert [r[0] for r in _cut_at_bytes(rows, 1000)] == ["0", "1"]
    assert [r[0] for r in _cut_at_bytes(rows, 10)] == ["0"]  # one oversized event still goes
    assert _cut_at_bytes(rows, 10_000) == rows


# --- the `postload receiver` command ---------------------------------------------------------


def run_cli(workdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [str(POSTLOAD), *args],
        cwd=workdir,
        env=cli_env(workdir, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_postload_receiver_accepts_signed_webhooks_and_stops_cleanly(
    prefect_server: str, start_receiver: Callable[..., ReceiverProcess]
) -> None:
    receiver = start_receiver(prefect_server, cli={"POSTLOAD_FIVETRAN_WEBHOOK_SECRET": SECRET})
    connector = new_connector()

    response = receiver.send(webhook(connector))

    assert response.status_code == 202, response.text
    assert response.json()["accepted"] is True
    body = json.dumps(webhook(connector)).encode()
    assert receiver.post(body, signature=sign(body, "another-secret")).status_code == 401
    wait_for_events(prefect_server, "fivetran.sync.succeeded", connector)

    assert receiver.stop() == 0, receiver.output()
    output = receiver.output()
    assert "Traceback" not in output
    assert SECRET not in output
    [start] = [r for r in receiver.log_records() if r["msg"] == "starting"]
    assert start["port"] == receiver.port and start["host"] == "127.0.0.1"
    assert start["outbox"] == str(receiver.outbox)
    assert start["secret_source"] == "POSTLOAD_FIVETRAN_WEBHOOK_SECRET"
    assert start["prefect_api"] == prefect_server


def test_postload_receiver_reads_the_secret_block_when_the_variable_is_unset(
    prefect_server: str, start_receiver: Callable[..., ReceiverProcess]
) -> None:
    name = f"test-fivetran-secret-{uuid.uuid4().hex[:8]}"
    Secret(value=SECRET).save(name)
    receiver = start_receiver(prefect_server, cli={"POSTLOAD_FIVETRAN_WEBHOOK_SECRET_BLOCK": name})

    assert receiver.send(webhook(new_connector())).status_code == 202

    assert receiver.stop() == 0, receiver.output()
    [start] = [r for r in receiver.log_records() if r["msg"] == "starting"]
    assert start["secret_source"] == f"Secret block {name!r}"


def test_postload_receiver_without_a_secret_fails_naming_both_places(
    prefect_server: str, tmp_path: Path
) -> None:
    name = f"absent-secret-{uuid.uuid4().hex[:8]}"
    env = {"PREFECT_API_URL": prefect_server, "POSTLOAD_FIVETRAN_WEBHOOK_SECRET_BLOCK": name}

    result = run_cli(tmp_path, "receiver", "--port", str(free_port()), **env)

    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.startswith(
        "error: no Fivetran webhook secret: POSTLOAD_FIVETRAN_WEBHOOK_SECRET is not set (or empty) "
        f"and the Prefect Secret block {name!r} does not exist. Expected one of them:"
    )
    assert not (tmp_path / ".postload" / "receiver-outbox.sqlite3").exists()


def test_postload_receiver_without_prefect_api_url_fails_clearly(tmp_path: Path) -> None:
    result = run_cli(
        tmp_path, "receiver", "--port", str(free_port()), POSTLOAD_FIVETRAN_WEBHOOK_SECRET=SECRET
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "error: PREFECT_API_URL is not set" in result.stderr
    assert SECRET not in result.stdout + result.stderr
