"""Failure → Slack message latency on a local Prefect server (goal: p50 ≤ 5 s).

A loopback HTTP server stands in for Slack; ``postload.alerts.apply_automations`` wires the
automations to a ``postload-slack``-style block pointing at it. Each round runs a flow that fails
(in this process, against a ``prefect_test_harness`` server whose startup is not timed) and
measures the flow run's Failed state timestamp → the Slack message's arrival. Prints p50/p95.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from postload.local.stack import use_local_server_settings

use_local_server_settings()  # the test server runs as `postload stack` runs its own
os.environ.setdefault("DO_NOT_TRACK", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)

    from prefect import flow
    from prefect.automations import Automation
    from prefect.testing.utilities import prefect_test_harness

    from postload.alerts import apply_automations, automation_specs
    from postload.blocks import slack_notification_block

    arrivals: dict[str, float] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            arrivals.setdefault(body["text"].split("`")[1], time.time())  # the flow run name
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    slack = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=slack.serve_forever, daemon=True).start()

    # Same name as a postload flow, so the automation's flow filter matches it.
    @flow(name="load-and-transform")
    def failing() -> None:
        raise RuntimeError("dbt build --select source:orders+ failed: fct_orders (error: boom)")

    with prefect_test_harness(server_startup_timeout=180):
        url = f"http://127.0.0.1:{slack.server_port}/services/T/B/X"
        block_id = slack_notification_block(url).save(f"bench-{uuid.uuid4().hex[:6]}")
        apply_automations(block_id)
        latencies = []
        for _ in range(args.rounds):
            state = failing(return_state=True)
            failed_at = state.timestamp.timestamp()
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                name = client.read_flow_run(state.state_details.flow_run_id).name
            deadline = time.monotonic() + 60
            while name not in arrivals and time.monotonic() < deadline:
                time.sleep(0.02)
            latencies.append(arrivals[name] - failed_at)
            print(f"  {name}: Failed → Slack {latencies[-1]:.2f} s", flush=True)
        for spec in automation_specs():
            Automation.read(name=spec.name).delete()
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    print(
        f"\nfailure → Slack message, {len(latencies)} failures: p50 {statistics.median(latencies):.2f} s, "
        f"p95 {p95:.2f} s, max {ordered[-1]:.2f} s (goal ≤ 5 s: "
        f"{'met' if statistics.median(latencies) <= 5 else 'MISSED'})"
    )
    slack.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
