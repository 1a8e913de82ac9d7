"""transform-on-sync as users run it: signed webhooks → receiver → Prefect → trigger → served run.

Every part is a real process on loopback: the session's Prefect test server, the webhook receiver
and a ``serve`` runner for the ``transform-on-sync`` deployment built from ``prefect.yaml``
(triggers, concurrency limit and collision strategy as written there). The home's sources are fed
by simulated Fivetran connectors: a "sync" lands rows in the raw table, then its signed
``sync_end`` webhook is posted. Assertions read the flow runs from the API and the dbt results
the runs recorded in the warehouse.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)

from postload.config import Settings
from postload.local.demo_data import write_demo_batch
from postload.warehouse._duckdb import DuckDBWarehouse
from postload.writer import warehouse_writer
from tests.conftest import (
    DEMO_MODELS,
    REPO,
    FakeSlack,
    PostloadHome,
    assert_no_secret_in,
    sentinel,
    sql,
    suite_secret,
)
from tests.fivetran.test_receiver import free_port

# Starts real processes (a Prefect server, a served runner, a receiver): the system tier.
pytestmark = pytest.mark.system

SECRET = suite_secret("served: webhook secret", "whsec-served-8c41d2")
DEPLOYMENT = "transform-on-sync"
START_TIMEOUT = 120.0
SETTLE_TIMEOUT = 240.0

POSTLOAD = str(Path(sys.executable).with_name("postload"))  # the CLI users run

ALL_MODELS = DEMO_MODELS


@dataclass
class ServedStack:
    home: PostloadHome
    prefect_api: str
    receiver_url: str
    deployment_id: uuid.UUID
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]
    runner_argv: list[str] = field(default_factory=list)
    runner_env: dict[str, str] = field(default_factory=dict)
    seen: set[uuid.UUID] = field(default_factory=set)

    def receiver_up(self) -> bool:
        try:
            return httpx.get(f"{self.receiver_url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def restart_runner(self) -> None:
        """Start ``postload serve`` again (after its process was killed), logging to the same file."""
        with self.logs[1].open("ab") as out:
            self.procs[1] = subprocess.Popen(
                self.runner_argv, cwd=REPO, env=self.runner_env, stdout=out, stderr=out
            )

    def land(self, source: str, batch: int) -> None:
        """A Fivetran sync's effect: new rows in the raw table (the embedded warehouse has one
        writer at a time, so this waits while a transform holds it, as the flow runs would)."""
        settings = Settings(project_dir=self.home.root)
        write_demo_batch(self.home.stage, source, batch)
        pipeline = settings.load_pipeline()
        warehouse = DuckDBWarehouse(settings.duckdb_file, settings.stage_root_path, pipeline)
        with warehouse_writer(settings):
            warehouse.ensure_schema()
            assert warehouse.load(pipeline.source(source), None)

    def post_sync_end(self, source: str, status: str = "SUCCESSFUL", sync_id: str | None = None):
        body = json.dumps(
            {
                "event": "sync_end",
                "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "connector_type": "postgres",
                "connector_id": f"conn_{source}",
                "connector_name": f"{source} db",
                "sync_id": sync_id or str(uuid.uuid4()),
                "destination_group_id": "warm_ambitious",
                "data": {"status": status},
            }
        ).encode()
        signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        response = httpx.post(
            f"{self.receiver_url}/webhooks/fivetran",
            content=body,
            headers={"Content-Type": "application/json", "X-Fivetran-Signature-256": signature},
        )
        assert response.status_code == 202, response.text
        return json.loads(body)["sync_id"]

    def runs(self) -> list[Any]:
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.deployment_id]))
            )

    def check_alive(self) -> None:
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                raise AssertionError(f"{log.name} exited {proc.returncode}:\n{log.read_text()}")

    def wait_for(self, predicate, what: str, timeout: float = SETTLE_TIMEOUT) -> Any:
        return self.wait_for_state(predicate, what, timeout, check_alive=True)

    def wait_for_state(
        self, predicate, what: str, timeout: float = SETTLE_TIMEOUT, *, check_alive: bool = False
    ) -> Any:
        """``wait_for`` that may also run while the runner is down (``check_alive=False``)."""
        deadline = time.monotonic() + timeout
        while True:
            if check_alive:
                self.check_alive()
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                states = [(str(r.id)[:8], r.state_name) for r in self.runs()]
                raise AssertionError(f"timed out waiting for {what}; runs: {states}")
            time.sleep(0.2)

    def settle(self, at_least: int) -> list[Any]:
        """The runs created since the last settle, once there are enough and all are final."""

        def done() -> list[Any] | None:
            runs = self.runs()
            new = [r for r in runs if r.id not in self.seen]
            final = all(r.state is not None and r.state.is_final() for r in runs)
            return new if len(new) >= at_least and final else None

        new = self.wait_for(done, f"{at_least} new runs to finish")
        self.seen |= {r.id for r in new}
        return new


def builds_of(home: PostloadHome, runs: list[Any]) -> list[dict[str, Any]]:
    """One entry per dbt invocation the runs made: when it started and the models it built."""
    ids = [str(r.id) for r in runs]
    if not ids:
        return []
    rows = sql(
        home,
        f"select invocation_id, min(started_at), list(distinct name order by name) "
        f"filter (where resource_type = 'model') from ops.dbt_run_results "
        f"where flow_run_id in ({','.join('?' * len(ids))}) group by 1 order by 2",
        ids,
    )
    return [{"invocation": i, "started": s, "models": set(m or [])} for i, s, m in rows]


def transformed_sources(home: PostloadHome, runs: list[Any]) -> list[str]:
    ids = [str(r.id) for r in runs]
    rows = sql(
        home,
        f"select source from ops.transform_runs where flow_run_id in ({','.join('?' * len(ids))})",
        ids,
    )
    return sorted(source for (source,) in rows)


def stop_parts(procs: list[subprocess.Popen[bytes]]) -> None:
    """Ctrl-C each part, as a person would; kill what has not stopped after 30 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_parts(
    commands: dict[str, list[str]], root: Path, env: dict[str, str]
) -> tuple[list[subprocess.Popen[bytes]], list[Path]]:
    """Start each command (the receiver, the runner) from the checkout, logging to root/<name>.log."""
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    for name, argv in commands.items():
        log = root / f"{name}.log"
        with log.open("wb") as out:
            procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=out))
        logs.append(log)
    return procs, logs


@pytest.fixture(scope="module")
def served(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedStack]:
    from tests.conftest import make_home

    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("served")
    home = make_home(root / "checkout", monkeypatch)
    config = yaml.safe_load((home.root / "postload.yaml").read_text())
    for source in config["sources"]:
        source["loader"] = {"type": "fivetran", "connector_id": f"conn_{source['name']}"}
    (home.root / "postload.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    port = free_port()
    env = {
        **os.environ,
        **home.env,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "POSTLOAD_FIVETRAN_WEBHOOK_SECRET": SECRET,
    }
    commands = {
        "receiver": [POSTLOAD, "receiver", "--port", str(port)],
        "serve": [POSTLOAD, "serve", "--only", DEPLOYMENT, "--no-schedules"],
    }
    procs, logs = start_parts(commands, root, env)
    stack = ServedStack(
        home,
        prefect_server,
        f"http://127.0.0.1:{port}",
        uuid.uuid4(),
        procs,
        logs,
        runner_argv=commands["serve"],
        runner_env=env,
    )
    try:
        # The first sync of every source, built once: later runs see only what lands after.
        # Built while the receiver and runner start (nothing triggers them meanwhile).
        from flows.transform_on_sync import transform_on_sync

        for source in ("customers", "orders", "events"):
            write_demo_batch(home.stage, source, 1)
        settings = Settings()
        pipeline = settings.load_pipeline()
        warehouse = DuckDBWarehouse(settings.duckdb_file, settings.stage_root_path, pipeline)
        warehouse.ensure_schema()
        for source in pipeline.sources:
            warehouse.load(source, None)
        assert transform_on_sync(reason="sweep")["builds"]

        def deployment() -> uuid.UUID | None:
            with get_client(sync_client=True) as client:
                try:
                    return client.read_deployment_by_name(f"{DEPLOYMENT}/{DEPLOYMENT}").id
                except Exception:
                    return None

        stack.deployment_id = stack.wait_for(deployment, "the served deployment", START_TIMEOUT)
        stack.wait_for(stack.receiver_up, "the receiver", START_TIMEOUT)
        stack.seen = {r.id for r in stack.runs()}
        yield stack
    finally:
        stop_parts(procs)
        monkeypatch.undo()
        for log in logs:
            assert_no_secret_in(log)


def test_burst_of_syncs_with_redeliveries_is_at_most_two_builds_of_the_union(
    served: ServedStack,
) -> None:
    for source in ("customers", "orders", "events"):
        served.land(source, 2)
    for source in ("customers", "orders", "events"):
        sync_id = served.post_sync_end(source)
        served.post_sync_end(source, sync_id=sync_id)  # Fivetran redelivers

    # One run per distinct sync (a redelivery makes none); settling on all three keeps a late one
    # out of the next test.
    runs = served.settle(at_least=3)
    assert len(runs) == 3, [(r.name, r.state_name) for r in runs]
    builds = builds_of(served.home, runs)
    assert 1 <= len(builds) <= 2, builds
    assert set().union(*(b["models"] for b in builds)) == ALL_MODELS
    # every source transformed exactly once for this data, whatever the number of runs
    assert transformed_sources(served.home, runs) == ["customers", "events", "orders"]


def test_syncs_during_a_run_get_one_follow_up_covering_them(served: ServedStack) -> None:
    served.land("events", 3)
    served.post_sync_end("events")

    def transform_in_progress() -> bool:
        new = [r.id for r in served.runs() if r.id not in served.seen]
        if not new:
            return False
        with get_client(sync_client=True) as client:
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=new))
            )
        return any(t.name.startswith("transform") for t in tasks)

    served.wait_for(transform_in_progress, "the events build to start")
    # Fivetran syncs two more sources meanwhile; on the embedded warehouse their rows land when
    # the running transform lets go of the file, then their webhooks arrive.
    served.land("orders", 3)
    served.land("customers", 3)
    served.post_sync_end("orders")
    served.post_sync_end("customers")

    # three syncs, three runs: the events build, and a run for each later sync, which waits for
    # it (ENQUEUE); the first of those to start builds both sources (and cancels the other, if
    # it was already waiting)
    runs = served.settle(at_least=3)
    builds = builds_of(served.home, runs)
    assert [b["models"] for b in builds] == [
        {"stg_events", "fct_daily_events"},
        {"stg_orders", "stg_customers", "fct_orders", "customer_orders"},
    ]
    assert transformed_sources(served.home, runs) == ["customers", "events", "orders"]


def test_failed_sync_runs_nothing(served: ServedStack) -> None:
    failed = served.post_sync_end("orders", status="FAILURE_WITH_TASK")
    # a later successful sync of another source: once its run is over, the failure was handled
    served.land("events", 4)
    served.post_sync_end("events")

    runs = served.settle(at_least=1)
    assert all(r.parameters.get("sync_id") != failed for r in runs)
    assert all(r.parameters.get("connector_id") == "conn_events" for r in runs)
    assert transformed_sources(served.home, runs) == ["events"]


def test_lost_webhook_is_caught_by_the_next_run(served: ServedStack) -> None:
    # A customers sync whose webhook never came is built by the next run, whatever woke it.
    served.land("customers", 5)
    served.land("events", 5)
    served.post_sync_end("events")

    runs = served.settle(at_least=1)
    assert transformed_sources(served.home, runs) == ["customers", "events"]
    assert len(builds_of(served.home, runs)) == 1


SLOW_MODEL = """
import time


def model(dbt, session):
    # Long enough to be killed in the middle of the build.
    dbt.config(materialized="table")
    events = dbt.ref("stg_events")
    time.sleep(300)
    return events
"""


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _flow_run_processes(serve_pid: int) -> list[int]:
    """The processes running flow runs: children of the runner's forkserver."""
    processes = []
    for child in _children(serve_pid):
        if b"forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
            processes += _children(child)
    return processes


def _kill_mid_build(served: ServedStack, source: str, batch: int, victims: Any) -> uuid.UUID:
    """Start a build that hangs in a slow model, SIGKILL ``victims(serve_pid)`` while it runs
    (what the OOM killer or a lost machine does); returns the killed flow run's id."""
    slow = served.home.root / "dbt_project" / "models" / "marts" / "slow_events.py"
    slow.write_text(SLOW_MODEL)
    try:
        served.land(source, batch)
        served.post_sync_end(source)

        def slow_model_running() -> Any:
            new = [r.id for r in served.runs() if r.id not in served.seen]
            if not new:
                return None
            with get_client(sync_client=True) as client:
                tasks = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=new))
                )
            running = [
                t for t in tasks if t.name == "model slow_events" and t.state_name == "Running"
            ]
            return running[0].flow_run_id if running else None

        victim = served.wait_for(slow_model_running, "the slow model to be running")
        killed = victims(served.procs[1].pid)
        assert killed, "no process to kill under the runner"
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        return victim
    finally:
        slow.unlink()


def _alerted_once(served: ServedStack, automations: FakeSlack, run: Any) -> str:
    (message,) = automations.wait_for(run.name)
    automations.wait_for(sentinel(served.prefect_api))
    assert len([m for m in automations.messages if run.name in m]) == 1
    return message


def test_a_run_killed_mid_build_is_crashed_alerted_once_and_the_next_run_covers_its_data(
    served: ServedStack, automations: FakeSlack
) -> None:
    victim = _kill_mid_build(served, "events", 6, _flow_run_processes)

    crashed = served.settle(at_least=1)
    assert [(r.id, r.state_name) for r in crashed if r.id == victim] == [(victim, "Crashed")]
    assert transformed_sources(served.home, crashed) == []  # nothing claims the data was built
    # One alert: the runner reports the crash once, the automation sends one message for it.
    (victim_run,) = [r for r in crashed if r.id == victim]
    message = _alerted_once(served, automations, victim_run)
    assert "transform-on-sync crashed" in message and "ended Crashed" in message

    # No manual step: the next wake-up (here another connector's sync; the sweep would do too)
    # builds events, whose rows are still newer than its last transform.
    served.land("orders", 6)
    served.post_sync_end("orders")
    runs = served.settle(at_least=1)
    assert transformed_sources(served.home, runs) == ["events", "orders"]
    built = set().union(*(b["models"] for b in builds_of(served.home, runs)))
    assert {"stg_events", "fct_daily_events", "stg_orders"} <= built
    assert "slow_events" not in built


def _runner_and_everything_under_it(serve_pid: int) -> list[int]:
    tree, frontier = [], [serve_pid]
    while frontier:
        pid = frontier.pop()
        tree.append(pid)
        frontier += _children(pid)
    return tree


def test_a_run_lost_with_its_runner_is_crashed_by_heartbeat_alerted_once_and_covered(
    served: ServedStack, automations: FakeSlack
) -> None:
    """The runner dies with the run (machine, container or process group gone): nobody reports
    the crash, so the postload-run-lost automation does once the run's heartbeats stop.

    The served runs beat every 30 s (Settings.run_heartbeat_seconds, Prefect's minimum); the
    automation is re-applied with a 40 s window instead of the default 3 beats (90 s) to keep
    this test short: the same trigger and action, a shorter wait.
    """
    from postload.alerts import apply_automations

    apply_automations(automations.block_id, heartbeat_seconds=30, lost_after_seconds=40)
    victim = _kill_mid_build(served, "events", 7, _runner_and_everything_under_it)
    served.procs[1].wait(timeout=10)
    # The machine comes back while the lost run still says Running: a new runner starts now (its
    # ~25 s start overlaps the heartbeat window) and must leave that run to the automation.
    served.restart_runner()

    def crashed() -> Any:
        (run,) = [r for r in served.runs() if r.id == victim]
        return run if run.state_name == "Crashed" else None

    run = served.wait_for_state(crashed, "the lost run to be marked Crashed", timeout=120)
    assert "No heartbeat for 40 s" in run.state.message
    message = _alerted_once(served, automations, run)
    assert "transform-on-sync crashed" in message and "No heartbeat" in message

    # The new runner and the next sync build the lost run's data: the Crashed state released the
    # deployment's concurrency slot, so no run is kept waiting for it.
    served.seen.add(victim)
    served.land("customers", 7)
    served.post_sync_end("customers")
    runs = served.settle(at_least=1)
    assert transformed_sources(served.home, runs) == ["customers", "events"]
    built = set().union(*(b["models"] for b in builds_of(served.home, runs)))
    assert {"stg_events", "fct_daily_events", "stg_customers"} <= built
