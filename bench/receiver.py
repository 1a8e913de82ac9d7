"""Receiver benchmark: signed Fivetran webhooks over loopback, ack latency and forwarded rate.

Starts ``postload.fivetran.receiver.serve`` as a subprocess (exactly as deployed: uvicorn, one
process, SQLite outbox) and drives it with a small keep-alive HTTP/1.1 client written on raw asyncio
streams (cheaper per request than httpx, so on a 2-core box more of the CPU is left to the
receiver). Every request is a distinct signed ``sync_end`` (its own sync_id), so each one is a
real outbox insert, not a duplicate. Bodies and signatures are built before the clock starts.

Two runs:

* **ack** — the receiver forwards to a closed port, so only the acknowledgement path is measured
  (verify, validate, commit to the outbox, answer 202); the forwarder just backs off.
* **forwarded** — the receiver forwards to a local ``prefect_test_harness`` server (startup not
  timed); also reported: the time until the outbox is drained and the forwarded rate, the
  number of events the Prefect API then returns for this run's connector, and the **Prefect-side
  cost per event**: the server's CPU (its uvicorn process, from ``/proc``, from the first request
  until every event is stored and the server is idle again), the growth of its database file and
  the ``POST /events`` requests the forwarder made, each divided by the events forwarded. The
  server has postload's automations applied (pointed at a closed port, they never match a
  successful sync), so every event is also evaluated by the trigger service as in production.

Reported per run: requests/s, ack latency p50/p95/p99/max (client side, request written to
response read), non-202 answers, the receiver's RSS (current and peak). Goal: p99 <= 50 ms.
Exit code is 0 when the run completed, whatever the figures (the script reports, it does not
gate). The work directory under ``bench/.work/`` is removed unless ``--keep``.

    .venv/bin/python bench/receiver.py [--requests 5000] [--concurrency 32] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from orchestration import cpu_seconds, server_pids, wait_until_idle

ROOT = Path(__file__).resolve().parent.parent
WORK_ROOT = ROOT / "bench" / ".work"
SECRET = "bench-webhook-secret"
GOAL_P99_MS = 50.0
READY_TIMEOUT = 30.0

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the receiver process --------------------------------------------------------------------


class ReceiverProcess:
    def __init__(self, work: Path, name: str, api_url: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = work / f"{name}.log"
        env = {
            **os.environ,
            "RECEIVER_PORT": str(self.port),
            "RECEIVER_SECRET": SECRET,
            "RECEIVER_OUTBOX": str(work / f"{name}.sqlite3"),
            "RECEIVER_API_URL": api_url,
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVE], cwd=ROOT, env=env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver exited:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"receiver not ready after {READY_TIMEOUT}s")
            time.sleep(0.05)

    def health(self) -> dict:
        return httpx.get(f"{self.base_url}/healthz", timeout=10).json()

    def rss_mib(self) -> tuple[float, float]:
        """Current and peak resident set size (Linux /proc), in MiB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return fields.get("VmRSS", float("nan")), fields.get("VmHWM", float("nan"))

    def cpu_seconds(self) -> float:
        """User + system CPU time the receiver has used so far (Linux /proc)."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- the load generator ----------------------------------------------------------------------


def build_requests(n: int, port: int, connector_id: str) -> list[bytes]:
    """``n`` complete HTTP/1.1 requests, each a distinct signed sync_end."""
    created = (datetime.now(UTC) - timedelta(seconds=5)).isoformat(timespec="milliseconds")
    requests = []
    for _ in range(n):
        body = json.dumps(
            {
                "event": "sync_end",
                "created": created.replace("+00:00", "Z"),
                "connector_type": "postgres",
                "connector_id": connector_id,
                "connector_name": "bench",
                "sync_id": str(uuid.uuid4()),
                "destination_group_id": "bench_group",
                "data": {"status": "SUCCESSFUL"},
            }
        ).encode()
        signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        head = (
            f"POST /webhooks/fivetran HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Fivetran-Signature-256: {signature}\r\n\r\n"
        ).encode()
        requests.append(head + body)
    return requests


@dataclass
class LoadResult:
    seconds: float
    latencies_ms: list[float]
    statuses: dict[int, int] = field(default_factory=dict)
    receiver_cpu_seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def pct(self, p: float) -> float:
        """Nearest-rank percentile."""
        ordered = sorted(self.latencies_ms)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def drive(port: int, requests: list[bytes], concurrency: int, limit_s: float) -> LoadResult:
    """Send every request over ``concurrency`` keep-alive connections; stop early at ``limit_s``."""
    queue = iter(range(len(requests)))
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + limit_s

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in queue:
                if time.perf_counter() > deadline:
                    return
                started = time.perf_counter()
                writer.write(requests[i])
                status = await _read_response(reader)
                latencies.append((time.perf_counter() - started) * 1000)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(time.perf_counter() - started, latencies, statuses)


# --- runs ------------------------------------------------------------------------------------


def measure(
    receiver: ReceiverProcess, args: argparse.Namespace, connector_id: str
) -> tuple[LoadResult, float, float]:
    warmup = build_requests(args.warmup, receiver.port, f"{connector_id}_warmup")
    asyncio.run(drive(receiver.port, warmup, args.concurrency, args.max_seconds))
    requests = build_requests(args.requests, receiver.port, connector_id)
    cpu_before = receiver.cpu_seconds()
    result = asyncio.run(drive(receiver.port, requests, args.concurrency, args.max_seconds))
    result.receiver_cpu_seconds = receiver.cpu_seconds() - cpu_before
    rss, peak = receiver.rss_mib()
    return result, rss, peak


def report(name: str, result: LoadResult, rss: float, peak: float) -> None:
    p99 = result.pct(99)
    verdict = "met" if p99 <= GOAL_P99_MS else "MISSED"
    others = {k: v for k, v in result.statuses.items() if k != 202}
    print(
        f"{name:<10} {len(result.latencies_ms):>6} req in {result.seconds:6.2f} s  "
        f"{result.rate:7.0f} req/s  ack ms p50 {result.pct(50):6.2f}  p95 {result.pct(95):6.2f}  "
        f"p99 {p99:6.2f}  max {max(result.latencies_ms):7.2f}  "
        f"RSS {rss:5.1f} MiB (peak {peak:5.1f})  non-202 {others or 0}  goal p99<=50ms: {verdict}"
    )
    cpu_ms = result.receiver_cpu_seconds * 1000 / max(1, len(result.latencies_ms))
    print(
        f"{'':<10} receiver CPU {result.receiver_cpu_seconds:.2f} s = {cpu_ms:.2f} ms/request "
        f"({result.receiver_cpu_seconds / result.seconds:.0%} of one core during the run)"
    )


def wait_drained(receiver: ReceiverProcess, expected: int, timeout: float) -> float | None:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        health = receiver.health()
        if health["pending"] == 0 and health["forwarded"] >= expected:
            return time.perf_counter()
        time.sleep(0.02)
    return None


def count_in_prefect(api_url: str, connector_id: str) -> int:
    response = httpx.post(
        f"{api_url}/events/filter",
        json={
            "filter": {"resource": {"id": [f"fivetran.connector.{connector_id}"]}},
            "limit": 1,
        },
        timeout=30,
    )
    response.raise_for_status()
    return response.json()["total"]


def apply_postload_automations() -> None:
    """postload's failure automations, notifying a closed port: the trigger service then evaluates
    every forwarded event against them, as it does on a production server."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from postload.alerts import apply_automations

    block = CustomWebhookNotificationBlock(
        name="bench", url=f"http://127.0.0.1:{free_port()}/", json_data={"text": "{{body}}"}
    )
    apply_automations(block.save("bench-closed-port", overwrite=True))


def prefect_database_file() -> Path | None:
    """The test server's SQLite file (None for another database)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    secret = url.get_secret_value() if url is not None else ""
    prefix = "sqlite+aiosqlite:///"
    return Path(secret[len(prefix) :]) if secret.startswith(prefix) else None


def _size(path: Path | None) -> float | None:
    """Bytes of the database file and its write-ahead log, if any."""
    if path is None:
        return None
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def forward_requests(receiver: ReceiverProcess) -> float | None:
    return receiver.health().get("forward_requests")


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def report_prefect_cost(
    events: int,
    *,
    server_cpu: float | None,
    database_bytes: float | None,
    forward_requests: float | None,
) -> None:
    def per_event(value: float | None, scale: float, unit: str) -> str:
        if value is None:
            return "n/a"
        return f"{value * scale / events:.2f} {unit}/event"

    print(
        f"{'':<10} Prefect-side cost for {events} events: server CPU "
        f"{'n/a' if server_cpu is None else f'{server_cpu:.2f} s'} = "
        f"{per_event(server_cpu, 1000, 'ms')}; database growth "
        f"{per_event(database_bytes, 1 / 1024, 'KiB')}; POST /events "
        f"{'n/a' if forward_requests is None else int(forward_requests)} = "
        f"{per_event(forward_requests, 1, 'requests')} (events per request "
        f"{'n/a' if not forward_requests else f'{events / forward_requests:.1f}'})"
    )


def run(args: argparse.Namespace, work: Path) -> None:
    print(
        f"receiver benchmark: {args.requests} signed sync_end requests, concurrency "
        f"{args.concurrency}, {args.warmup} warm-up requests first, loopback, "
        f"{os.cpu_count()} CPU(s) shared by client and receiver"
    )

    # Run 1: forwarding target is a closed port, so only the ack path does work.
    unreachable = f"http://127.0.0.1:{free_port()}/api"
    receiver = ReceiverProcess(work, "ack", unreachable)
    try:
        result, rss, peak = measure(receiver, args, "bench_ack")
        report("ack", result, rss, peak)
        print(f"{'':<10} outbox pending after the run: {receiver.health()['pending']}")
    finally:
        receiver.stop()

    if args.skip_forwarded:
        return

    # Run 2: a real local Prefect API; the forwarder drains while requests arrive.
    from postload.local.stack import use_local_server_settings

    use_local_server_settings()  # the test server runs as `postload stack` runs its own
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    started = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=180):
        api_url = PREFECT_API_URL.value()
        print(f"{'':<10} (prefect_test_harness started in {time.perf_counter() - started:.1f} s)")
        apply_postload_automations()
        server = server_pids()
        database = prefect_database_file()
        wait_until_idle(server)
        receiver = ReceiverProcess(work, "forwarded", api_url)
        try:
            connector = f"bench_{uuid.uuid4().hex[:8]}"
            server_cpu_before = cpu_seconds(server)
            database_before = _size(database)
            forwards_before = forward_requests(receiver)
            load_started = time.perf_counter()
            result, rss, peak = measure(receiver, args, connector)
            report("forwarded", result, rss, peak)
            sent = len(result.latencies_ms) + args.warmup
            drained = wait_drained(receiver, sent, timeout=args.max_seconds)
            if drained is None:
                print(
                    f"{'':<10} outbox NOT drained within {args.max_seconds} s: {receiver.health()}"
                )
            else:
                # The warm-up is sent first on the same receiver: count it in the rate too.
                span = drained - load_started
                print(
                    f"{'':<10} outbox drained {drained - load_started - result.seconds:5.2f} s "
                    f"after the last ack; forwarded {sent} events in {span:.2f} s = "
                    f"{sent / span:.0f} events/s (incl. {args.warmup} warm-up)"
                )
            deadline = time.monotonic() + 60
            stored = count_in_prefect(api_url, connector)
            while stored < len(result.latencies_ms) and time.monotonic() < deadline:
                time.sleep(1)
                stored = count_in_prefect(api_url, connector)
            print(
                f"{'':<10} Prefect API returns {stored} events for the run's connector "
                f"(expected {len(result.latencies_ms)})"
            )
            wait_until_idle(server)
            report_prefect_cost(
                sent,
                server_cpu=_delta(cpu_seconds(server), server_cpu_before),
                database_bytes=_delta(_size(database), database_before),
                forward_requests=_delta(forward_requests(receiver), forwards_before),
            )
        finally:
            receiver.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests first")
    parser.add_argument(
        "--max-seconds", type=float, default=120.0, help="bound on each load phase and drain"
    )
    parser.add_argument("--skip-forwarded", action="store_true", help="only the ack run")
    parser.add_argument("--quick", action="store_true", help="1000 requests (CI smoke)")
    parser.add_argument("--keep", action="store_true", help="keep bench/.work/receiver-*")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 1000)
    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="receiver-", dir=WORK_ROOT))
    try:
        run(args, work)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
