"""Failure → Slack message latency on a local Prefect server (goal: p50 ≤ 5 s).

A loopback HTTP server stands in for Slack; ``postload.alerts.apply_automations`` wires the
automations to a ``postload-slack``-style block pointing at it, and the flows' failure hook sends
through a prefect-slack block at it. Each round, in this process against a
``prefect_test_harness`` server whose startup is not timed: a flow with postload's hooks fails
(the hook's message: Failed state timestamp → arrival), and a flow run is marked Crashed as the
lost-run automation does (the automation's message: Crashed state timestamp → arrival). Prints
p50/p95 of each.
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
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed
    from prefect.testing.utilities import prefect_test_harness
    from prefect_slack import SlackWebhook

    from postload.alerts import apply_automations, automation_names
    from postload.blocks import slack_notification_block
    from postload.hooks import SLACK_HOOK_BLOCK, on_failure

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

    # Same name as a postload flow, so the automations' flow filter matches it.
    @flow(name="load-and-transform", on_failure=[on_failure])
    def failing() -> None:
        raise RuntimeError("dbt build --select source:orders+ failed: fct_orders (error: boom)")

    def wait_for(name: str, since: float) -> float:
        deadline = time.monotonic() + 60
        while name not in arrivals and time.monotonic() < deadline:
            time.sleep(0.02)
        return arrivals[name] - since

    latencies: dict[str, list[float]] = {"Failed (hook)": [], "Crashed (automation)": []}
    with prefect_test_harness(server_startup_timeout=180):
        url = f"http://127.0.0.1:{slack.server_port}/services/T/B/X"
        block_id = slack_notification_block(url).save(f"bench-{uuid.uuid4().hex[:6]}")
        SlackWebhook(url=url).save(SLACK_HOOK_BLOCK, overwrite=True)
        apply_automations(block_id)
        with get_client(sync_client=True) as client:
            for _ in range(args.rounds):
                state = failing(return_state=True)
                name = client.read_flow_run(state.state_details.flow_run_id).name
                latencies["Failed (hook)"].append(wait_for(name, state.timestamp.timestamp()))
                run = client.create_flow_run(failing)
                crashed = client.set_flow_run_state(run.id, Crashed(message="bench"), force=True)
                assert crashed.state is not None
                latencies["Crashed (automation)"].append(
                    wait_for(run.name, crashed.state.timestamp.timestamp())
                )
                print(
                    f"  {name}: Failed → Slack {latencies['Failed (hook)'][-1]:.2f} s; "
                    f"{run.name}: Crashed → Slack {latencies['Crashed (automation)'][-1]:.2f} s",
                    flush=True,
                )
        for automation in automation_names(pagerduty=False):
            Automation.read(name=automation).delete()
    print()
    for path, measured in latencies.items():
        ordered = sorted(measured)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        p50 = statistics.median(measured)
        print(
            f"{path} → Slack message, {len(measured)} runs: p50 {p50:.2f} s, "
            f"p95 {p95:.2f} s, max {ordered[-1]:.2f} s (goal ≤ 5 s: "
            f"{'met' if p50 <= 5 else 'MISSED'})"
        )
    slack.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
