"""Prove it under faults: a burst of signed webhooks, a receiver SIGKILL, a Prefect API outage
and a Prefect server SIGKILL.

A system test, not a benchmark: CI runs ``make faults-quick`` and fails when an invariant does.
The real path, every part a separate process on loopback (started with bench/sync.py's helpers)::

    signed POSTs ──> receiver (outbox) ──> fault proxy ──> Prefect API /events ──> trigger
        ──> transform-on-sync run (`postload serve`, talks to the API directly) ──> dbt (DuckDB)

`postload serve` serves prefect.yaml's transform-on-sync (its triggers as they are) with the
sweep every ``--sweep`` seconds instead of 15 minutes.

On bench/sync.py's generated 20-source project (sources s0..s19, connectors conn_s0..conn_s19):

1. ``--rounds`` rounds; each lands a new batch in every source's raw table (what a Fivetran sync
   does), then posts, for every connector, one ``sync_end`` with a fresh sync_id and
   ``--deliveries`` - 1 redeliveries of the same signed body, all shuffled and sent at once from a
   pool of ``--concurrency`` threads. A delivery that gets no 2xx (connection refused or reset,
   5xx) is retried with backoff, as Fivetran does.
2. The receiver forwards through a TCP proxy written here. From the middle round on, the proxy
   cuts every connection it holds and resets every new one for ``--outage`` seconds: the API is
   unreachable for the receiver only. Halfway through that round's deliveries the receiver is
   killed with SIGKILL and started again on the same port and outbox file.
3. Rounds after the outage's first run during it; the last round (with 3 or more rounds) waits
   for the API to come back.
4. The server kill (unless ``--no-server-kill``), one more round: every source lands, every
   sync's first delivery is accepted and forwarded, then, with its redeliveries arriving, the
   Prefect server's process group is SIGKILLed and started again on the same port and SQLite
   database. No new event follows the restart (redeliveries are duplicates), so what Prefect
   held of the burst must come back from its database, postload's catch-up event or the sweep.
   The suite waits until every source of that round is covered and times it from the restart.
5. Then: the receiver's /healthz reports nothing pending, every accepted event is in Prefect,
   every due flow run is final and no new one appears for ``--quiet`` seconds.
6. Figures and invariants: every delivery accepted, every accepted event forwarded (outbox, read
   directly) and stored by Prefect (lost = 0), no failed run, every source's latest load covered
   by a successful transform, no load transformed twice; for the server kill: the round's events
   in Prefect or the outbox, every source pending at the kill covered, within one sweep of the
   restart. Exit 1 when an invariant fails.

The Prefect server is ``prefect server start`` on loopback with its own ``PREFECT_HOME``, run with
the local stack's settings (``postload.local.stack.LOCAL_SERVER_SETTINGS``). Nothing leaves the
machine. Work files go to ``bench/.work/faults-*`` (git-ignored; removed unless ``--keep``).

    .venv/bin/python tests/system/faults.py [--quick] [--outage 60] [--sweep 120] [--keep]

``make faults`` runs the full suite, ``make faults-quick`` the short one (what CI runs). Not named
``test_*.py``: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

# bench/sync.py: the served stack's helpers (home, landing, processes). This suite gates CI, so a
# change to those helpers must keep `make faults-quick` passing.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import sync

ROOT = sync.ROOT  # the repository root
EVENT = "fivetran.sync.succeeded"
SETTLE_TIMEOUT = 1200.0
ACTION_GRACE = 60.0
SERVER_START_TIMEOUT = 240.0
CATCH_UP = "postload.catch-up"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the fault proxy -------------------------------------------------------------------------


class Proxy:
    """A loopback TCP proxy in front of the Prefect API, used by the receiver only.

    While down it aborts every connection it is carrying and every new one as soon as it is
    accepted, so the receiver sees resets and disconnects, never an answer.
    """

    def __init__(self, upstream_url: str) -> None:
        url = httpx.URL(upstream_url)
        self._host = url.host
        self._port = url.port
        self._path = url.path.rstrip("/")
        self.up = True
        self.refused = 0
        self.proxied = 0
        self.cut = 0
        self._pairs: set[tuple[asyncio.BaseTransport, asyncio.BaseTransport]] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self._path}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        except OSError:
            writer.transport.abort()
            return
        self.proxied += 1
        pair = (writer.transport, up_writer.transport)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._pairs.discard(pair)
            writer.close()
            up_writer.close()

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                target.write(data)
                await target.drain()
            if target.can_write_eof():
                target.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            pass  # cut by an outage, or the other side went away

    def _call(self, fn: Any) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)

    def down(self) -> None:
        def go() -> None:
            self.up = False
            for pair in list(self._pairs):
                self.cut += 1
                for transport in pair:
                    transport.abort()

        self._call(go)

    def restore(self) -> None:
        def go() -> None:
            self.up = True

        self._call(go)

    def close(self) -> None:
        def go() -> None:
            self._server.close()
            for pair in list(self._pairs):
                for transport in pair:
                    transport.abort()
            self._loop.stop()

        self._loop.call_soon_threadsafe(go)
        self._thread.join(10)


# --- the Prefect server ----------------------------------------------------------------------


class PrefectServer:
    """``prefect server start`` on a fixed loopback port with its SQLite database in ``home``,
    run as ``postload stack`` runs its own (``LOCAL_SERVER_SETTINGS``), in a session of its own
    so that ``kill()`` SIGKILLs the whole process group and ``start()`` again reuses port and
    database."""

    def __init__(self, work: Path) -> None:
        from postload.local.stack import LOCAL_SERVER_SETTINGS, free_port

        self.home = work / "prefect-home"
        self.home.mkdir(parents=True)
        self.port = free_port()  # below the ephemeral range: nothing else takes it meanwhile
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.work = work
        self.starts = 0
        self.proc: Any = None
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")},
            **{k: os.environ.get(k, v) for k, v in LOCAL_SERVER_SETTINGS.items()},
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }

    def start(self) -> float:
        """Start the server and wait for its health check; returns the seconds it took."""
        import subprocess

        self.starts += 1
        started = time.monotonic()
        with (self.work / f"prefect-server-{self.starts}.log").open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--analytics-off",
                ],
                cwd=self.work,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = started + SERVER_START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                log_file = self.work / f"prefect-server-{self.starts}.log"
                raise RuntimeError(f"the Prefect server exited:\n{log_file.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Prefect server is not healthy after {SERVER_START_TIMEOUT} s"
                )
            time.sleep(0.25)

    def kill(self) -> None:
        """SIGKILL the server and every process of its group: nothing gets to flush."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


# --- signed deliveries -----------------------------------------------------------------------


@dataclass(frozen=True)
class Sync:
    connector: str
    sync_id: str
    body: bytes
    signature: str
    event_id: str  # what the receiver must answer (postload.fivetran.webhook's deterministic id)


def new_sync(connector: str) -> Sync:
    from postload.fivetran.webhook import FivetranWebhook, sign, sync_end_body, to_prefect_event

    sync_id = f"fault_{uuid.uuid4().hex}"
    body = sync_end_body(connector, sync_id=sync_id, created=datetime.now(UTC), group_id="bench")
    event = to_prefect_event(FivetranWebhook.model_validate(json.loads(body)))
    assert event is not None and event["event"] == EVENT
    return Sync(connector, sync_id, body, sign(body, sync.SECRET), event["id"])


@dataclass
class Delivery:
    sync: Sync
    round: int
    status: int | None = None  # the final answer (None: never answered)
    attempts: int = 0
    failures: list[str] = field(default_factory=list)  # answers/errors before the final one
    event_id: str | None = None
    duplicate: bool | None = None
    seconds: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Poster:
    """Fivetran's side: POST a signed body until a 2xx, backing off on errors and 5xx."""

    def __init__(self, url: str, concurrency: int, give_up: float) -> None:
        self.url = f"{url}/webhooks/fivetran"
        self.give_up = give_up
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="fivetran")
        self._local = threading.local()
        self._clients: list[httpx.Client] = []

    def _client(self) -> httpx.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(timeout=10)
            self._clients.append(client)
        return client

    def submit(self, sync_: Sync, round_no: int) -> Future[Delivery]:
        return self.pool.submit(self._deliver, Delivery(sync_, round_no))

    def _deliver(self, d: Delivery) -> Delivery:
        started = time.monotonic()
        delay = 0.2
        headers = {"Content-Type": "application/json", "X-Fivetran-Signature-256": d.sync.signature}
        while True:
            d.attempts += 1
            try:
                response = self._client().post(self.url, content=d.sync.body, headers=headers)
            except httpx.TransportError as exc:
                d.failures.append(type(exc).__name__)
            else:
                if response.is_success:
                    d.status = response.status_code
                    answer = response.json()
                    d.event_id = answer.get("event_id")
                    d.duplicate = answer.get("duplicate")
                    break
                d.failures.append(f"HTTP {response.status_code}")
                if response.status_code < 500 and response.status_code != 429:
                    d.status = response.status_code  # refused for good: Fivetran gives up too
                    break
            if time.monotonic() - started > self.give_up:
                break
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 2.0)
        d.seconds = time.monotonic() - started
        return d

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for client in self._clients:
            client.close()


# --- reading the outcome ---------------------------------------------------------------------


def outbox_rows(path: Path) -> dict[str, tuple[str | None, str | None, int]]:
    """id -> (forwarded_at, rejected_at, attempts), read-only, straight from the SQLite file."""
    if not path.exists():
        return {}
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("select id, forwarded_at, rejected_at, attempts from outbox").fetchall()
    finally:
        con.close()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


def healthz(url: str) -> dict[str, Any] | None:
    try:
        response = httpx.get(f"{url}/healthz", timeout=5)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def prefect_events(since: datetime, **name: list[str]) -> list[Any]:
    """Every event the Prefect API has stored since ``since`` whose name matches ``name``
    (``name=[...]`` or ``prefix=[...]``, as ``EventNameFilter`` takes them)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    flt = EventFilter(
        occurred=EventOccurredFilter(since=since, until=datetime.now(UTC) + timedelta(hours=1)),
        event=EventNameFilter(**name),
    )
    events: list[Any] = []
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=flt, limit=50)
        while True:
            events += page.events
            if not page.next_page:
                return events
            page = client.read_events_page(str(page.next_page))


def prefect_event_ids(since: datetime) -> set[str]:
    """Ids of every fivetran.sync.succeeded event the Prefect API has stored since ``since``."""
    return {str(e.id) for e in prefect_events(since, name=[EVENT])}


def automation_events(since: datetime) -> tuple[dict[str, int], list[str]]:
    """Prefect's automation events since ``since``: count per name (without the
    ``prefect.automation.`` prefix), and the reason of each failed action."""
    counts: dict[str, int] = {}
    failures: list[str] = []
    for event in prefect_events(since, prefix=["prefect.automation."]):
        name = event.event.removeprefix("prefect.automation.")
        counts[name] = counts.get(name, 0) + 1
        if name == "action.failed":
            failures.append(str(event.payload.get("reason", event.payload))[:200])
    return counts, failures


def unacted(counts: dict[str, int]) -> int:
    """Automation firings whose action has not (yet) been triggered, run or failed."""
    started = counts.get("action.triggered", 0)
    ended = counts.get("action.executed", 0) + counts.get("action.failed", 0)
    return max(0, counts.get("triggered", 0) - started) + max(0, started - ended)


def deployment_runs(deployment_id: uuid.UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs: list[Any] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                limit=200,
                offset=len(runs),
            )
            runs += page
            if len(page) < 200:
                return runs


def served_prefect_yaml(work: Path, sweep: float) -> Path:
    """prefect.yaml as it is (triggers included) but transform-on-sync's sweep every ``sweep`` s
    instead of 15 min; entrypoints made absolute (serve resolves them against the file's folder)."""
    import yaml

    document = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for entry in document["deployments"]:
        entry["entrypoint"] = str(ROOT / entry["entrypoint"])
        if entry["name"] == sync.DEPLOYMENT:
            entry["schedules"] = [{"interval": sweep, "active": True}]
    path = work / "prefect.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def naive_utc(moment: datetime) -> datetime:
    """What the warehouse's timestamps are: naive UTC."""
    return moment.astimezone(UTC).replace(tzinfo=None)


def due_runs(runs: list[Any]) -> list[Any]:
    """The runs that are not the sweep's future runs (scheduled, not yet due)."""
    now = datetime.now(UTC)
    return [
        r
        for r in runs
        if not (
            r.state is not None
            and r.state.type.value == "SCHEDULED"
            and r.expected_start_time is not None
            and r.expected_start_time > now
        )
    ]


def land(home: Path, source: str, batch: int) -> None:
    """What a Fivetran sync does (``sync.land`` takes the writer lock, so runs may be building)."""
    sync.land(home, source, batch, generated=True)


def warehouse_query(home: Path, sql: str, params: list[Any] | None = None) -> list[tuple]:
    """sync.query inside the warehouse-writer slot, retried while the DuckDB file is busy.

    In the slot: a read-only connection open in this process makes a flow run's write
    connection fail ("Could not set lock"), so reads taken while runs go on must queue with them.
    """
    import duckdb

    from postload.config import Settings

    deadline = time.monotonic() + 120
    while True:
        try:
            with sync._writer(Settings(project_dir=home)):
                return sync.query(home, sql, params)
        except duckdb.IOException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# --- the run ---------------------------------------------------------------------------------


class Faults:
    def __init__(self, args: argparse.Namespace, work: Path, server: PrefectServer) -> None:
        self.args = args
        self.work = work
        self.server = server
        self.api_url = api_url = server.url
        self.home = sync.generated_home(work / "gen", args.connectors)
        self.outbox = self.home / ".postload" / "receiver-outbox.sqlite3"
        self.proxy = Proxy(api_url)
        self.receiver_port = sync.free_port()
        self.receiver_url = f"http://127.0.0.1:{self.receiver_port}"
        self.restarts = 0
        self.notes: dict[str, Any] = {}
        base = {
            **os.environ,
            "POSTLOAD_PROJECT_DIR": str(self.home),
            "PREFECT_RUNNER_POLL_FREQUENCY": str(args.poll),
            "POSTLOAD_FIVETRAN_WEBHOOK_SECRET": sync.SECRET,
        }
        self.serve_env = {**base, "PREFECT_API_URL": api_url}
        self.receiver_env = {**base, "PREFECT_API_URL": self.proxy.url}
        self.serve: sync.Proc | None = None
        self.receiver: sync.Proc | None = None
        self.outage_started: float | None = None
        self.outage_ended: float | None = None
        self.since = datetime.now(UTC)
        # The server kill: what it left pending and how the warehouse caught up.
        self.kill: dict[str, Any] = {}

    # processes

    def procs(self) -> list[sync.Proc]:
        return [p for p in (self.serve, self.receiver) if p is not None]

    def start_receiver(self) -> None:
        name = "receiver" if self.restarts == 0 else f"receiver-{self.restarts + 1}"
        self.receiver = sync.Proc(
            name,
            [sync.POSTLOAD, "receiver", "--port", str(self.receiver_port)],
            self.receiver_env,
            self.work,
        )

    def kill_and_restart_receiver(self) -> None:
        assert self.receiver is not None
        killed = time.monotonic()
        self.receiver.proc.send_signal(signal.SIGKILL)
        self.receiver.proc.wait()
        rows = outbox_rows(self.outbox)
        pending = sum(1 for fwd, rej, _ in rows.values() if fwd is None and rej is None)
        self.notes["outbox rows when killed"] = len(rows)
        self.notes["pending when killed"] = pending
        log(f"receiver SIGKILLed: outbox holds {len(rows)} events, {pending} not forwarded")
        self.restarts += 1
        self.start_receiver()
        sync.wait_healthy(self.receiver_url, self.procs())
        self.notes["receiver down s"] = time.monotonic() - killed
        log(f"receiver restarted, healthy after {self.notes['receiver down s']:.1f} s")

    def end_outage(self) -> None:
        self.proxy.restore()
        self.outage_ended = time.monotonic()
        log("outage over: the proxy forwards again")

    def run(self) -> int:
        args = self.args
        names = [f"s{k}" for k in range(args.connectors)]
        os.environ["POSTLOAD_PROJECT_DIR"] = str(self.home)
        if args.debounce is not None:
            os.environ["POSTLOAD_SYNC_DEBOUNCE_SECONDS"] = str(args.debounce)
            self.serve_env["POSTLOAD_SYNC_DEBOUNCE_SECONDS"] = str(args.debounce)
        log(f"bootstrap: first load and build of {len(names)} sources (not timed)")
        sync.bootstrap(self.home, names, generated=True)

        # The sweep is the safety net the server kill is measured against: short here.
        deployments = served_prefect_yaml(self.work, args.sweep)
        self.serve = sync.Proc(
            "serve",
            [
                sync.POSTLOAD,
                "serve",
                "--only",
                sync.DEPLOYMENT,
                "--warm",
                "--prefect-yaml",
                str(deployments),
            ],
            self.serve_env,
            self.work,
        )
        self.start_receiver()
        try:
            deployment_id = sync.wait_for_deployment(self.procs(), sync.DEPLOYMENT)
            sync.wait_healthy(self.receiver_url, self.procs())
            return self._faults(names, deployment_id)
        finally:
            for proc in self.procs():
                proc.stop()
            self.proxy.close()

    def _faults(self, names: list[str], deployment_id: uuid.UUID) -> int:
        args = self.args
        known = {r.id for r in deployment_runs(deployment_id)}
        since = self.since = datetime.now(UTC) - timedelta(minutes=5)
        outage_round = max(1, args.rounds // 2)
        last_in_outage = max(outage_round, args.rounds - 2)
        poster = Poster(self.receiver_url, args.concurrency, give_up=args.outage + 300)
        deliveries: list[Delivery] = []
        timer: threading.Timer | None = None
        started = time.monotonic()
        load_start = os.getloadavg()
        log(
            f"burst: {args.rounds} rounds x {args.connectors} connectors x {args.deliveries} "
            f"deliveries; outage of {args.outage:.0f} s from round {outage_round + 1}, "
            f"receiver SIGKILL halfway through it"
        )
        try:
            for round_no in range(args.rounds):
                if round_no == outage_round:
                    self.proxy.down()
                    self.outage_started = time.monotonic()
                    timer = threading.Timer(args.outage, self.end_outage)
                    timer.start()
                    log(f"outage begins: the receiver cannot reach the API for {args.outage:.0f} s")
                if round_no > last_in_outage and timer is not None:
                    log("waiting for the outage to end before the last round")
                    timer.join()
                t0 = time.monotonic()
                for name in names:
                    land(self.home, name, round_no + 2)
                landed = time.monotonic() - t0
                syncs = [new_sync(f"conn_{name}") for name in names]
                batch = [s for s in syncs for _ in range(args.deliveries)]
                random.shuffle(batch)
                futures = [poster.submit(s, round_no) for s in batch]
                if round_no == outage_round:
                    for i, _ in enumerate(as_completed(futures), start=1):
                        if i >= len(futures) // 2:
                            break
                    self.kill_and_restart_receiver()
                wait(futures)
                deliveries += [f.result() for f in futures]
                ok = sum(f.result().accepted for f in futures)
                log(
                    f"round {round_no + 1}/{args.rounds}: landed {len(names)} sources in "
                    f"{landed:.1f} s, {ok}/{len(futures)} deliveries accepted, "
                    f"{time.monotonic() - t0:.1f} s"
                )
                for proc in self.procs():
                    proc.alive()
            if timer is not None:
                timer.join()
            if args.server_kill:
                if self.outage_ended is None:
                    self.end_outage()
                deliveries += self._server_round(args.rounds, names, poster)
            burst_end = time.monotonic()
        finally:
            if timer is not None:
                timer.cancel()
            poster.close()
        if self.outage_ended is None:
            self.end_outage()

        # --- recovery ---
        log("waiting for the receiver to forward everything it holds")
        health = self._wait_drained()
        drained = time.monotonic()
        accepted_ids = {d.sync.event_id for d in deliveries if d.accepted}
        log(f"waiting for Prefect to store the {len(accepted_ids)} accepted events")
        in_prefect = self._wait_events(accepted_ids, since)
        log("waiting for every flow run to be final and no new one to appear")
        runs = self._settle(deployment_id, known)
        if args.server_kill:
            self._attribute_recovery(runs)
        settled = time.monotonic()
        load_end = os.getloadavg()
        return self._report(
            deliveries=deliveries,
            health=health,
            in_prefect=in_prefect,
            runs=runs,
            names=names,
            times={
                "burst": burst_end - started,
                "drain": drained - (self.outage_ended or drained),
                "total": settled - started,
            },
            load=(load_start, load_end),
        )

    # --- the server kill ---

    def _server_round(self, round_no: int, names: list[str], poster: Poster) -> list[Delivery]:
        """A round whose burst the Prefect server dies in, with its database kept.

        Every source lands and every sync's first delivery is accepted and forwarded; then, with
        the redeliveries still arriving, the server is SIGKILLed and started again on the same
        port and database. The redeliveries are duplicates the receiver does not forward again,
        so no new event follows the restart: whatever Prefect held of the burst (events not yet
        stored or evaluated, actions not yet run) is recovered by the server from its database,
        by postload's catch-up, or by the sweep, and the suite measures which and how fast.
        """
        args = self.args
        t0 = time.monotonic()
        for name in names:
            land(self.home, name, round_no + 2)
        loaded = {
            n: warehouse_query(self.home, f"select max(_loaded_at) from raw.t{n[1:]}")[0][0]
            for n in names
        }
        syncs = [new_sync(f"conn_{name}") for name in names]
        # The warehouse writer is held until the server is back: the runs these syncs wake wait
        # for it, so every source is still pending at the kill whatever the machine's speed (on a
        # quiet machine they otherwise built everything first, and the kill tested nothing).
        from postload.config import Settings

        writer = contextlib.ExitStack()
        writer.enter_context(sync._writer(Settings(project_dir=self.home)))
        first = [poster.submit(s, round_no) for s in syncs]
        wait(first)
        self._wait_drained()  # every sync's event is now Prefect's alone
        redeliveries = [s for s in syncs for _ in range(args.deliveries - 1)]
        random.shuffle(redeliveries)
        rest = [poster.submit(s, round_no) for s in redeliveries]
        self.server.kill()
        killed_at = datetime.now(UTC)
        killed = time.monotonic()
        log(
            f"Prefect server SIGKILLed {killed - t0:.1f} s into round {round_no + 1}, "
            f"{len(rest)} redeliveries in flight"
        )
        try:
            self.server.start()
        finally:
            writer.close()
        restarted_at = datetime.now(UTC)
        self.kill.update(
            killed_at=killed_at,
            restarted_at=restarted_at,
            down_s=time.monotonic() - killed,
            loaded=loaded,
            event_ids={s.event_id for s in syncs},
        )
        log(f"Prefect server restarted on its database, healthy after {self.kill['down_s']:.1f} s")
        wait(rest)
        out = [f.result() for f in first + rest]
        log(
            f"round {round_no + 1} (server kill): {sum(d.accepted for d in out)}/{len(out)} "
            f"deliveries accepted, {time.monotonic() - t0:.1f} s"
        )
        # Bounded: three sweeps after the restart, every source must be covered (a sweep alone
        # covers them in one); the invariant is one sweep.
        deadline = time.monotonic() + 3 * args.sweep + 120
        while self._uncovered_since(loaded):
            for proc in self.procs():
                proc.alive()
            if time.monotonic() > deadline:
                log("sources still pending three sweeps after the restart")
                break
            time.sleep(2)
        return out

    def _uncovered_since(self, loaded: dict[str, Any]) -> list[str]:
        """Sources whose load ``loaded[source]`` no successful transform covers yet."""
        covered = dict(
            warehouse_query(
                self.home,
                "select source, max(covers_loaded_at) from ops.transform_runs "
                "where status in ('success', 'nothing_selected') group by source",
            )
        )
        return [n for n, at in loaded.items() if covered.get(n) is None or covered[n] < at]

    def _attribute_recovery(self, runs: list[Any]) -> None:
        """When, and by which runs, each source loaded in the server round was covered."""
        loaded: dict[str, Any] = self.kill["loaded"]
        restarted = naive_utc(self.kill["restarted_at"])
        killed = naive_utc(self.kill["killed_at"])
        rows = warehouse_query(
            self.home,
            "select source, covers_loaded_at, completed_at, flow_run_id from ops.transform_runs "
            "where status in ('success', 'nothing_selected')",
        )
        # A run created before the kill was recovered from Prefect's database; one created after
        # the restart was woken by something sent or scheduled after it.
        reason = {
            str(r.id): f"{(r.parameters or {}).get('reason', 'sweep')} (created "
            + ("before the kill)" if r.created < self.kill["killed_at"] else "after it)")
            for r in runs
        }
        first: dict[str, tuple[datetime, str]] = {}
        for source, covers, completed, run_id in rows:
            if (
                source in loaded
                and covers is not None
                and covers >= loaded[source]
                and (source not in first or completed < first[source][0])
            ):
                first[source] = (completed, run_id)
        self.kill["uncovered"] = sorted(set(loaded) - set(first))
        self.kill["before_kill"] = sorted(s for s, (at, _) in first.items() if at <= killed)
        pending = {s: v for s, v in first.items() if v[0] > killed}
        self.kill["pending"] = len(pending) + len(self.kill["uncovered"])
        self.kill["covered_by"] = {}
        for _, run_id in pending.values():
            why = reason.get(run_id, "not a served run")
            self.kill["covered_by"][why] = self.kill["covered_by"].get(why, 0) + 1
        self.kill["recovery_s"] = (
            None
            if self.kill["uncovered"]
            else max(((at - restarted).total_seconds() for at, _ in pending.values()), default=0.0)
        )
        catch_ups = prefect_events(self.since, name=[CATCH_UP])
        self.kill["catch_up_events"] = len({str(e.id) for e in catch_ups})
        self.kill["runs_by_reason"] = {}
        for r in runs:
            if r.end_time is None or r.end_time >= self.kill["killed_at"]:
                why = (r.parameters or {}).get("reason", "sweep")
                key = f"{why} {r.state_name}"
                self.kill["runs_by_reason"][key] = self.kill["runs_by_reason"].get(key, 0) + 1

    def _wait_drained(self) -> dict[str, Any]:
        deadline = time.monotonic() + 300
        while True:
            for proc in self.procs():
                proc.alive()
            health = healthz(self.receiver_url)
            if health is not None and health.get("pending") == 0:
                return health
            if time.monotonic() > deadline:
                raise RuntimeError(f"the receiver still holds pending events: {health}")
            time.sleep(0.5)

    def _wait_events(self, accepted: set[str], since: datetime) -> set[str]:
        deadline = time.monotonic() + 180
        while True:
            ids = prefect_event_ids(since)
            if accepted <= ids or time.monotonic() > deadline:
                return ids
            time.sleep(1)

    def _settle(self, deployment_id: uuid.UUID, known: set[uuid.UUID]) -> list[Any]:
        """All runs final and no run created for ``--quiet`` seconds (the triggers lag)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        count, since_change = -1, time.monotonic()
        grace: float | None = None
        while True:
            for proc in self.procs():
                proc.alive()
            runs = [r for r in due_runs(deployment_runs(deployment_id)) if r.id not in known]
            if len(runs) != count:
                count, since_change = len(runs), time.monotonic()
            final = all(r.state and r.state.is_final() for r in runs)
            if final and time.monotonic() - since_change >= self.args.quiet:
                # Also wait (up to ACTION_GRACE s) for every automation firing's action to have
                # run: an action still queued in Prefect would create a run later.
                grace = grace or time.monotonic() + ACTION_GRACE
                if not unacted(automation_events(self.since)[0]) or time.monotonic() > grace:
                    return runs
            else:
                grace = None
            if time.monotonic() > deadline:
                states = [(str(r.id)[:8], r.state_name) for r in runs if not r.state.is_final()]
                raise RuntimeError(f"runs did not settle in {SETTLE_TIMEOUT:.0f} s: {states}")
            time.sleep(1)

    # --- figures ---

    def _report(
        self,
        *,
        deliveries: list[Delivery],
        health: dict[str, Any],
        in_prefect: set[str],
        runs: list[Any],
        names: list[str],
        times: dict[str, float],
        load: tuple[tuple[float, ...], tuple[float, ...]],
    ) -> int:
        args = self.args
        accepted = [d for d in deliveries if d.accepted]
        accepted_ids = {d.sync.event_id for d in accepted}
        accepted_syncs = {(d.sync.connector, d.sync.sync_id) for d in accepted}
        all_syncs = {(d.sync.connector, d.sync.sync_id) for d in deliveries}
        wrong_ids = [d for d in accepted if d.event_id != d.sync.event_id]
        retried = [d for d in deliveries if d.failures]
        failure_kinds: dict[str, int] = {}
        for d in deliveries:
            for failure in d.failures:
                failure_kinds[failure] = failure_kinds.get(failure, 0) + 1
        rows = outbox_rows(self.outbox)
        forwarded = {i for i, (fwd, _, _) in rows.items() if fwd is not None}
        rejected = {i for i, (_, rej, _) in rows.items() if rej is not None}
        pending = set(rows) - forwarded - rejected
        lost = accepted_ids - in_prefect
        not_forwarded = accepted_ids - forwarded
        ours_in_prefect = accepted_ids & in_prefect

        states: dict[str, int] = {}
        for r in runs:
            kind = r.state.type.value if r.state else "NONE"
            states[kind] = states.get(kind, 0) + 1
        bad_runs = [
            r for r in runs if r.state is None or r.state.type.value in ("FAILED", "CRASHED")
        ]
        ids = [str(r.id) for r in runs]
        marks = ",".join("?" * len(ids)) or "null"
        invocations = (
            warehouse_query(
                self.home,
                "select count(distinct invocation_id) from ops.dbt_run_results "
                f"where flow_run_id in ({marks})",
                ids,
            )[0][0]
            if ids
            else 0
        )
        transforms = warehouse_query(
            self.home,
            "select source, status, covers_loaded_at, flow_run_id from ops.transform_runs",
        )
        served = set(ids)
        served_transforms = [t for t in transforms if t[3] in served]
        covered: dict[str, datetime] = {}
        for source, status, covers, _ in transforms:
            if status in ("success", "nothing_selected") and covers is not None:
                covered[source] = max(covered.get(source, covers), covers)
        latest = {
            name: warehouse_query(self.home, f"select max(_loaded_at) from raw.t{name[1:]}")[0][0]
            for name in names
        }
        loaded = [n for n in names if latest[n] is not None]
        uncovered = [n for n in loaded if covered.get(n) is None or covered[n] < latest[n]]
        seen: dict[tuple[str, Any], int] = {}
        for source, status, covers, _ in transforms:
            if status in ("success", "nothing_selected"):
                seen[(source, covers)] = seen.get((source, covers), 0) + 1
        duplicates = {key: n for key, n in seen.items() if n > 1}
        failed_transforms = [t for t in served_transforms if t[1] == "error"]
        # Which sync events woke a flow run (the trigger passes sync_id as a parameter), by round.
        woke = {(r.parameters or {}).get("sync_id") for r in runs}
        round_of = {d.sync.sync_id: d.round for d in deliveries}
        per_round = [0] * (args.rounds + int(args.server_kill))
        for sync_id, round_no in round_of.items():
            per_round[round_no] += sync_id in woke
        automation, action_failures = automation_events(self.since)
        outage = (self.outage_ended or 0) - (self.outage_started or 0)

        checks: list[tuple[str, bool, str]] = [
            (
                "every delivery answered 2xx",
                len(accepted) == len(deliveries),
                f"{len(accepted)}/{len(deliveries)}",
            ),
            (
                "every sync accepted",
                accepted_syncs == all_syncs,
                f"{len(accepted_syncs)}/{len(all_syncs)}",
            ),
            (
                "answered event ids = postload.fivetran.webhook's",
                not wrong_ids,
                f"{len(wrong_ids)} differ",
            ),
            (
                "receiver drained (healthz)",
                health.get("pending") == 0 and not pending,
                f"pending {health.get('pending')} (outbox {len(pending)})",
            ),
            (
                "every accepted event forwarded",
                not not_forwarded and not rejected,
                f"{len(not_forwarded)} not forwarded, {len(rejected)} rejected",
            ),
            ("lost events = 0", not lost, f"{len(lost)} lost"),
            (
                "no failed or crashed flow run",
                not bad_runs and not failed_transforms,
                f"{len(bad_runs)} runs, {len(failed_transforms)} transforms",
            ),
            (
                "every loaded source transformed",
                not uncovered,
                f"{len(loaded) - len(uncovered)}/{len(loaded)}",
            ),
            ("no load transformed twice", not duplicates, f"{len(duplicates)} duplicates"),
        ]
        if args.server_kill:
            kill = self.kill
            held = kill["event_ids"] & accepted_ids
            missing = held - in_prefect - pending
            recovery = kill.get("recovery_s")
            checks += [
                (
                    "server kill: events in Prefect or outbox",
                    not missing,
                    f"{len(held) - len(missing)}/{len(held)} ({len(missing)} lost)",
                ),
                (
                    "server kill: pending sources covered",
                    not kill["uncovered"],
                    f"{kill['pending'] - len(kill['uncovered'])}/{kill['pending']}",
                ),
                (
                    "server kill: covered within one sweep",
                    recovery is not None and recovery <= args.sweep,
                    "never"
                    if recovery is None
                    else f"{recovery:.1f} s after the restart (sweep {args.sweep:.0f} s)",
                ),
            ]

        figures: list[tuple[str, str]] = [
            (
                "deliveries posted",
                f"{len(deliveries)} ({args.rounds} rounds x {args.connectors} connectors x "
                f"{args.deliveries})",
            ),
            ("  HTTP attempts", str(sum(d.attempts for d in deliveries))),
            (
                "  retried (no 2xx at first)",
                f"{len(retried)}: "
                + (", ".join(f"{k} {v}" for k, v in sorted(failure_kinds.items())) or "none"),
            ),
            ("accepted (2xx)", str(len(accepted))),
            ("  distinct (connector, sync_id)", str(len(accepted_syncs))),
            (
                "  answered duplicate / new",
                f"{sum(bool(d.duplicate) for d in accepted)} / "
                f"{sum(d.duplicate is False for d in accepted)}",
            ),
            (
                "  ack p50 / max s (incl. retries)",
                f"{sync.pct([d.seconds for d in deliveries], 0.5):.3f} / "
                f"{max(d.seconds for d in deliveries):.1f}",
            ),
            (
                "outbox rows / forwarded / rejected / pending",
                f"{len(rows)} / {len(forwarded)} / {len(rejected)} / {len(pending)}",
            ),
            (
                "  forward attempts (sum / max per event)",
                f"{sum(a for _, _, a in rows.values())} / "
                f"{max((a for _, _, a in rows.values()), default=0)}",
            ),
            (
                f"events in Prefect ({EVENT})",
                f"{len(in_prefect)} distinct ids ({len(ours_in_prefect)} of the accepted)",
            ),
            ("lost (accepted, not in Prefect)", str(len(lost))),
            (
                "flow runs: total / completed / cancelled / failed",
                f"{len(runs)} / {states.get('COMPLETED', 0)} / {states.get('CANCELLED', 0)} / "
                f"{states.get('FAILED', 0) + states.get('CRASHED', 0)}",
            ),
            (
                "  sync events that woke a run",
                f"{sum(per_round)}/{len(round_of)} (per round: "
                + " / ".join(str(n) for n in per_round)
                + ")",
            ),
            (
                "  automation events",
                ", ".join(f"{name} {n}" for name, n in sorted(automation.items())) or "none",
            ),
            ("dbt invocations", str(invocations)),
            (
                "transforms recorded (served runs)",
                f"{len(served_transforms)} ({len(failed_transforms)} errors)",
            ),
            ("sources transformed", f"{len(loaded) - len(uncovered)}/{len(loaded)}"),
            ("duplicate transforms", str(len(duplicates))),
            ("receiver restarts (SIGKILL)", str(self.restarts)),
            (
                "  outbox when killed: rows / pending",
                f"{self.notes.get('outbox rows when killed', '-')} / "
                f"{self.notes.get('pending when killed', '-')}",
            ),
            ("  receiver down (kill → healthy) s", f"{self.notes.get('receiver down s', 0):.1f}"),
            ("outage s (API unreachable for the receiver)", f"{outage:.1f}"),
            (
                "  proxy: connections refused / cut / proxied",
                f"{self.proxy.refused} / {self.proxy.cut} / {self.proxy.proxied}",
            ),
            ("  outage end → receiver drained s", f"{times['drain']:.1f}"),
            ("burst wall time s (first land → last 2xx)", f"{times['burst']:.1f}"),
            ("wall time s (first land → settled)", f"{times['total']:.1f}"),
            ("load average start / end (1 min)", f"{load[0][0]:.2f} / {load[1][0]:.2f}"),
        ]
        if args.server_kill:
            kill = self.kill
            recovery = kill.get("recovery_s")
            figures += [
                ("Prefect server SIGKILL (round, mid-burst)", f"round {args.rounds + 1}"),
                ("  server down (kill → healthy) s", f"{kill['down_s']:.1f}"),
                (
                    "  sources pending at the kill / covered before it",
                    f"{kill['pending']} / {len(kill['before_kill'])}",
                ),
                (
                    "  recovery s (restart → every pending source covered)",
                    "never" if recovery is None else f"{recovery:.1f}",
                ),
                (
                    "  pending sources covered by runs of reason",
                    ", ".join(f"{k} {v}" for k, v in sorted(kill["covered_by"].items())) or "none",
                ),
                (
                    "  runs ending after the kill (reason state)",
                    ", ".join(f"{k} {v}" for k, v in sorted(kill["runs_by_reason"].items()))
                    or "none",
                ),
                (f"  {CATCH_UP} events in Prefect", str(kill["catch_up_events"])),
                ("  sweep interval s", f"{args.sweep:.0f}"),
            ]
        at = next(i for i, (k, _) in enumerate(figures) if k == "  automation events") + 1
        figures[at:at] = [
            ("    firings whose action never ran", str(unacted(automation))),
            *(
                ("    action failed (Prefect's answer)", f"{action_failures.count(r)}x {r}")
                for r in sorted(set(action_failures))[:5]
            ),
        ]
        width = max(len(k) for k, _ in figures)
        print("\nFaults: figures")
        for key, value in figures:
            print(f"  {key:<{width}}  {value}")
        print("\nInvariants")
        for name, ok, detail in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {name:<42} {detail}")
        failed = [c for c in checks if not c[1]]
        if failed:
            self._evidence(
                lost=lost,
                not_forwarded=not_forwarded,
                uncovered=uncovered,
                latest=latest,
                covered=covered,
                duplicates=duplicates,
                bad_runs=bad_runs,
                deliveries=deliveries,
            )
        print(
            f"\n{'FAIL' if failed else 'PASS'}: {len(checks) - len(failed)}/{len(checks)} invariants"
        )
        return 1 if failed else 0

    def _evidence(self, **found: Any) -> None:
        print("\nEvidence")
        by_id = {d.sync.event_id: d.sync for d in found["deliveries"]}
        for event_id in sorted(found["lost"])[:20]:
            s = by_id[event_id]
            print(f"  lost: {event_id} ({s.connector}, {s.sync_id})")
        for event_id in sorted(found["not_forwarded"])[:20]:
            print(f"  not forwarded: {event_id}")
        for name in found["uncovered"]:
            print(
                f"  {name}: latest load {found['latest'][name]}, "
                f"newest covered {found['covered'].get(name)}"
            )
        for (source, covers), n in sorted(found["duplicates"].items(), key=str)[:20]:
            print(f"  {source} covering {covers} transformed {n} times")
        for run in found["bad_runs"]:
            message = run.state.message if run.state else ""
            print(f"  run {run.id} {run.state_name}: {message}")
        unanswered = [d for d in found["deliveries"] if not d.accepted]
        for d in unanswered[:20]:
            print(f"  delivery {d.sync.connector}/{d.sync.sync_id}: {d.status} {d.failures[-3:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="sync rounds (default 5)")
    parser.add_argument(
        "--connectors", type=int, default=20, help="sources/connectors (default 20)"
    )
    parser.add_argument(
        "--deliveries",
        type=int,
        default=None,
        help="deliveries per connector per round: 1 sync + redeliveries (default 10)",
    )
    parser.add_argument(
        "--outage",
        type=float,
        default=None,
        help="seconds the API is unreachable for the receiver (default 60)",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="posting threads (default 32)")
    parser.add_argument("--poll", type=float, default=1.0, help="runner poll seconds (default 1)")
    parser.add_argument(
        "--debounce",
        type=float,
        default=None,
        help="POSTLOAD_SYNC_DEBOUNCE_SECONDS (default: the setting's default)",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=10.0,
        help="seconds without a new flow run before the run counts as settled (default 10)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 rounds x 5 deliveries (200) and a 10 s outage",
    )
    parser.add_argument(
        "--sweep",
        type=float,
        default=120.0,
        help="transform-on-sync's sweep interval in seconds (default 120; prefect.yaml's is 900)",
    )
    parser.add_argument(
        "--no-server-kill",
        dest="server_kill",
        action="store_false",
        help="skip the last round, in which the Prefect server is SIGKILLed and restarted",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    quick = {"rounds": 2, "deliveries": 5, "outage": 10.0}
    full = {"rounds": 5, "deliveries": 10, "outage": 60.0}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rounds < 2 or args.connectors < 2 or args.deliveries < 1:
        parser.error("needs at least 2 rounds, 2 connectors and 1 delivery")

    from prefect.settings import PREFECT_API_URL, temporary_settings

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    wall = time.monotonic()
    (ROOT / "bench" / ".work").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="faults-", dir=ROOT / "bench" / ".work"))
    server = PrefectServer(work)
    try:
        log(f"starting the Prefect server on {server.url} (database in {server.home})")
        log(f"Prefect server healthy after {server.start():.1f} s")
        with temporary_settings({PREFECT_API_URL: server.url}):
            code = Faults(args, work, server).run()
    finally:
        server.stop()
        if args.keep:
            print(f"work files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"script wall time {time.monotonic() - wall:.0f} s"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
