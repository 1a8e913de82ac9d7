"""False positives of the lost-run automation: how many healthy runs end up marked Crashed.

``postload-run-lost`` is Prefect's documented zombie-run automation: after a flow run's heartbeat,
expect another heartbeat or its end within ``3 x heartbeat`` seconds, else mark it Crashed. It is
reported upstream to crash healthy runs (PrefectHQ/prefect#21932, #18653: a heartbeat sent
between the run's Completed state and its process's exit opens a window nothing closes).

This runs ``--runs`` short flow runs (named like postload's flows, so the automation watches
them) on a served runner beating every 30 s (Prefect's minimum and postload's default), each
lasting a random 0-40 s so some end right around a beat, with every postload automation applied
and a loopback Slack. Once every run has ended it waits out the lost-run window, then counts:
runs whose final state is Crashed (goal 0), Slack "crashed" messages (goal 0), and the
automation's attempts on finished runs that the server refused (the misfire, contained).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from postload.local.stack import use_local_server_settings

use_local_server_settings()
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect import flow  # noqa: E402

HEARTBEAT_SECONDS = 30
DEPLOYMENT = "heartbeat-probe"


# Named like a postload flow: the automations filter on the flow's name.
@flow(name="transform-on-sync")
def probe(seconds: float = 1.0) -> float:
    time.sleep(seconds)
    return seconds


def serve(limit: int) -> None:
    """The runner (a subprocess of the benchmark): beats every 30 s, forks runs from a warm
    process as ``postload serve`` does."""
    import asyncio

    from prefect.runner import Runner

    from postload.local import _warm_start

    _warm_start.install()
    runner = Runner(name="heartbeat-bench", heartbeat_seconds=HEARTBEAT_SECONDS, limit=limit)
    runner.add_flow(probe, name=DEPLOYMENT)
    try:
        asyncio.run(runner.start())
    finally:
        _warm_start.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--max-seconds", type=float, default=40.0, help="longest run")
    parser.add_argument("--limit", type=int, default=40, help="runs at once on the runner")
    parser.add_argument("--seed", type=int, default=21932)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.limit)
        return 0

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.testing.utilities import prefect_test_harness

    from postload.alerts import LOST_AFTER_BEATS, apply_automations
    from postload.blocks import slack_notification_block

    messages: list[str] = []

    class Slack(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            messages.append(
                json.loads(self.rfile.read(int(self.headers["Content-Length"])))["text"]
            )
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    slack = ThreadingHTTPServer(("127.0.0.1", 0), Slack)
    threading.Thread(target=slack.serve_forever, daemon=True).start()
    lost_after = LOST_AFTER_BEATS * HEARTBEAT_SECONDS

    with prefect_test_harness(server_startup_timeout=180):
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value()
        block_id = slack_notification_block(
            f"http://127.0.0.1:{slack.server_port}/services/T0/B0/bench"
        ).save(f"bench-slack-{uuid.uuid4().hex[:8]}")
        apply_automations(block_id, heartbeat_seconds=HEARTBEAT_SECONDS)
        runner = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--limit", str(args.limit)],
            env={**os.environ, "PREFECT_API_URL": api_url},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with get_client(sync_client=True) as client:
                deployment_id = None
                deadline = time.monotonic() + 300
                while deployment_id is None:
                    found = client.read_deployments(
                        deployment_filter=DeploymentFilter(
                            name=DeploymentFilterName(any_=[DEPLOYMENT])
                        )
                    )
                    deployment_id = found[0].id if found else None
                    if time.monotonic() > deadline:
                        raise SystemExit("the runner never registered its deployment")
                    time.sleep(0.5)
                rng = random.Random(args.seed)
                started = time.monotonic()
                runs = [
                    client.create_flow_run_from_deployment(
                        deployment_id,
                        parameters={"seconds": round(rng.uniform(0, args.max_seconds), 2)},
                    ).id
                    for _ in range(args.runs)
                ]
                print(f"{args.runs} runs created; waiting for them to end", flush=True)
                while True:
                    states = [client.read_flow_run(r).state for r in runs]
                    if all(s is not None and s.is_final() for s in states):
                        break
                    if runner.poll() is not None:
                        raise SystemExit(f"the runner exited ({runner.returncode})")
                    time.sleep(2)
                ended = time.monotonic() - started
                print(
                    f"all ended in {ended:.0f} s; waiting {lost_after + 30} s for the lost-run "
                    "window of the last heartbeats to pass",
                    flush=True,
                )
                time.sleep(lost_after + 30)  # the measured window itself, not a synchronisation
                final = [client.read_flow_run(r).state for r in runs]
                refused = _refused_crashes(client)
        finally:
            runner.terminate()
            runner.wait(timeout=60)
    slack.shutdown()

    names = [s.name for s in final if s is not None]
    crashed = names.count("Crashed")
    crash_messages = [m for m in messages if "crashed" in m.lower()]
    print(
        f"\n{args.runs} healthy runs of 0-{args.max_seconds:g} s, heartbeat {HEARTBEAT_SECONDS} s, lost after {lost_after} s:"
    )
    print(f"  final states: {', '.join(f'{n} {names.count(n)}' for n in sorted(set(names)))}")
    print(f"  wrongly marked Crashed: {crashed}  (goal 0)")
    print(f"  Slack 'crashed' messages: {len(crash_messages)}  (goal 0)")
    print(f"  lost-run attempts on finished runs, refused by the server: {refused}")
    return 0 if crashed == 0 and not crash_messages else 1


def _refused_crashes(client: object) -> int:
    """The lost-run automation's actions that failed: Prefect refuses Crashed for a finished
    run (HandleFlowTerminalStateTransitions), so each is a misfire that changed nothing."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    response = httpx.post(
        f"{api}/events/filter",
        json={"filter": {"event": {"name": ["prefect.automation.action.failed"]}}, "limit": 50},
    )
    refused = 0
    while True:
        response.raise_for_status()
        page = response.json()
        refused += sum(
            1
            for e in page.get("events", [])
            if "already in terminal state" in json.dumps(e.get("payload", {})).lower()
        )
        if not page.get("next_page"):
            return refused
        response = httpx.get(page["next_page"])


if __name__ == "__main__":
    sys.exit(main())
