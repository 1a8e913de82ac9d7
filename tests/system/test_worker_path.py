"""transform-on-sync on a process work pool with a worker, as production runs it (prefect.yaml).

The served tests (test_transform_on_sync_served.py) run the deployments with ``postload serve``;
this runs the path prefect.yaml documents for a work pool, every part a real process on loopback:
``prefect work-pool create --type process``, ``POSTLOAD_VERSION=<HEAD> prefect deploy --all``
from a copy of the checkout whose sources are fed by simulated Fivetran connectors, and
``POSTLOAD_PROJECT_DIR=<copy> prefect worker start --pool postload-local``. Each flow run then
changes into the worker's POSTLOAD_PROJECT_DIR (the pull step) and imports its flow from there.

About 2 minutes after the server's start: deselected from ``make test``, run by
``make test-worker`` (tests/system/README.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.exceptions import ObjectNotFound

from postload.alerts import HEARTBEAT_EVENT, apply_automations
from tests.conftest import (
    REPO,
    FakeSlack,
    assert_no_secret_in,
    land_and_load,
    make_home,
    sentinel,
)
from tests.fivetran.test_receiver import free_port
from tests.system.test_transform_on_sync_served import (
    SECRET,
    SLOW_MODEL,
    START_TIMEOUT,
    ServedStack,
    _children,
    builds_of,
    stop_parts,
    transformed_sources,
)
from tests.test_deploy import PREFECT, cli_env, head_commit, remove

pytestmark = [pytest.mark.system, pytest.mark.worker]

POSTLOAD = str(Path(sys.executable).with_name("postload"))
DEPLOYMENT = "transform-on-sync"
DOCUMENT = yaml.safe_load((REPO / "prefect.yaml").read_text())
POOL = DOCUMENT["definitions"]["work_pools"]["local"]
DEPLOYMENTS = [spec["name"] for spec in DOCUMENT["deployments"]]
# What `dbt build --select source:orders+` builds in the demo project: the closure of orders.
ORDERS_CLOSURE = {"stg_orders", "fct_orders", "customer_orders"}


class WorkerStack(ServedStack):
    """The served tests' stack with a worker where their runner was: procs = [receiver, worker]."""

    worker_cwd: Path

    def restart_runner(self) -> None:
        """Start a worker again (the machine came back), logging to the same file."""
        with self.logs[1].open("ab") as out:
            self.procs[1] = start_worker(self.runner_argv, self.worker_cwd, self.runner_env, out)


def start_worker(argv: list[str], cwd: Path, env: dict[str, str], out: Any) -> Any:
    # A session of its own, as a service manager gives it: its process group is the worker's.
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=out, start_new_session=True)


def copy_checkout(root: Path) -> Path:
    """The checkout's tracked files as they are now (no .git), sources fed by Fivetran."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if name.startswith("tests/") or not source.is_file():
            continue
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    config = yaml.safe_load((root / "postload.yaml").read_text())
    for source_config in config["sources"]:
        name = source_config["name"]
        source_config["loader"] = {"type": "fivetran", "connector_id": f"conn_{name}"}
    (root / "postload.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def cli(argv: list[str], cwd: Path, api_url: str, **env: str) -> str:
    result = subprocess.run(
        argv,
        cwd=cwd,
        env=cli_env(api_url, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def only_transform_on_sync(deployment_ids: dict[str, uuid.UUID]) -> None:
    """As the served tests serve transform-on-sync alone with no schedules: pause the sweeps,
    and the triggers of the other deployments. full-run-when-fresh is woken by the same syncs
    and takes the same warehouse lock, which would make whose build comes first a race."""
    with get_client(sync_client=True) as client:
        for name, deployment_id in deployment_ids.items():
            for schedule in client.read_deployment_schedules(deployment_id):
                client.update_deployment_schedule(deployment_id, schedule.id, active=False)
            if name != DEPLOYMENT:
                for automation in client.read_resource_related_automations(
                    f"prefect.deployment.{deployment_id}"
                ):
                    client.pause_automation(automation.id)


@pytest.fixture(scope="module")
def worker_stack(
    prefect_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerStack]:
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("worker")
    home = make_home(root / "checkout", monkeypatch)  # the settings point at it
    checkout = copy_checkout(home.root)
    procs: list[Any] = []
    logs = [root / "receiver.log", root / "worker.log"]
    deploy: Any = None
    try:
        # The documented commands, from the copy, on the session's server.
        cli(
            [PREFECT, "work-pool", "create", POOL["name"], "--type", POOL["type"]],
            checkout,
            prefect_server,
        )
        with (root / "deploy.log").open("wb") as out:
            deploy = subprocess.Popen(
                [PREFECT, "--no-prompt", "deploy", "--all"],
                cwd=checkout,
                env=cli_env(prefect_server, POSTLOAD_VERSION=head_commit()),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        port = free_port()
        env = {
            **os.environ,
            **home.env,
            "PREFECT_API_URL": prefect_server,
            # The worker asks for due runs this often (Prefect's default 10 s, the runner's 1 s
            # in the served tests).
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "POSTLOAD_FIVETRAN_WEBHOOK_SECRET": SECRET,
        }
        with logs[0].open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [POSTLOAD, "receiver", "--port", str(port)],
                    cwd=checkout,
                    env=env,
                    stdout=out,
                    stderr=out,
                )
            )

        # The first sync of every source, built once in this process while the deploy runs:
        # later runs see only what lands after.
        from flows.transform_on_sync import transform_on_sync

        for source in ("customers", "orders", "events"):
            land_and_load(home, source, 1)
        assert transform_on_sync(reason="sweep")["builds"]

        deployed = deploy.wait(timeout=300)
        assert deployed == 0, (root / "deploy.log").read_text()
        with get_client(sync_client=True) as client:
            deployments = {
                name: client.read_deployment_by_name(f"{name}/{name}") for name in DEPLOYMENTS
            }
        assert {d.version for d in deployments.values()} == {head_commit()}
        # Stored unresolved: the worker resolves the directory when each run starts.
        assert deployments[DEPLOYMENT].pull_steps == DOCUMENT["pull"]
        only_transform_on_sync({name: d.id for name, d in deployments.items()})

        worker_argv = [PREFECT, "worker", "start", "--pool", POOL["name"]]
        with logs[1].open("wb") as out:
            procs.append(start_worker(worker_argv, checkout, env, out))
        stack = WorkerStack(
            home,
            prefect_server,
            f"http://127.0.0.1:{port}",
            deployments[DEPLOYMENT].id,
            procs,
            logs,
            runner_argv=worker_argv,
            runner_env=env,
        )
        stack.worker_cwd = checkout

        def worker_polling() -> bool:
            with get_client(sync_client=True) as client:
                workers = client.read_workers_for_work_pool(POOL["name"])
            return any(w.status.value == "ONLINE" for w in workers)

        stack.wait_for(stack.receiver_up, "the receiver", START_TIMEOUT)
        stack.wait_for(worker_polling, "the worker to poll its pool", START_TIMEOUT)
        stack.seen = {r.id for r in stack.runs()}
        yield stack
    finally:
        if deploy is not None and deploy.poll() is None:
            deploy.kill()
            deploy.wait()
        stop_parts(procs)
        monkeypatch.undo()
        with get_client(sync_client=True) as client:
            remove(client, DEPLOYMENTS)
            with contextlib.suppress(ObjectNotFound):
                client.delete_work_pool(POOL["name"])
        for log in logs:
            assert_no_secret_in(log)


def test_a_signed_webhook_builds_exactly_its_sources_closure_on_the_worker(
    worker_stack: WorkerStack,
) -> None:
    worker_stack.land("orders", 2)
    worker_stack.post_sync_end("orders")

    (run,) = worker_stack.settle(at_least=1)
    assert run.state_name == "Completed", run.state
    assert run.work_pool_name == POOL["name"]
    assert run.deployment_version == head_commit()
    assert run.parameters["connector_id"] == "conn_orders"
    # One dbt invocation, of exactly the closure of the synced source, recorded in the warehouse
    # of the worker's POSTLOAD_PROJECT_DIR.
    assert [b["models"] for b in builds_of(worker_stack.home, [run])] == [ORDERS_CLOSURE]
    assert transformed_sources(worker_stack.home, [run]) == ["orders"]


def _tree(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        found.append(current)
        frontier += _children(current)
    return found


def _flow_run_of(pid: int) -> str | None:
    """The flow run a process runs (the engine's PREFECT__FLOW_RUN_ID), if any."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"PREFECT__FLOW_RUN_ID="):
            return entry.split(b"=", 1)[1].decode()
    return None


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _heartbeats(run_id: uuid.UUID, since: datetime) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_events(
            EventFilter(
                occurred=EventOccurredFilter(since=since, until=datetime.now(UTC)),
                event=EventNameFilter(name=[HEARTBEAT_EVENT]),
                resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
            ),
            limit=50,  # the server's maximum (the client's default, 100, is refused)
        ).events


def test_a_run_lost_with_its_worker_is_crashed_by_heartbeat_alerted_once_and_covered(
    worker_stack: WorkerStack, automations: FakeSlack
) -> None:
    """The worker's machine dies mid-build: nobody reports the crash, so postload-run-lost does
    once the run's heartbeats stop. The worker path's runs beat every 30 s only because the
    pool's job variables set PREFECT_FLOWS_HEARTBEAT_FREQUENCY (prefect.yaml); the automation is
    re-applied with a 40 s window instead of 3 beats (90 s) to keep this short. Not under 30 s:
    a healthy run would then be crashed between two beats."""
    stack = worker_stack
    started = datetime.now(UTC) - timedelta(seconds=5)
    apply_automations(automations.block_id, heartbeat_seconds=30, lost_after_seconds=40)
    slow = stack.home.root / "dbt_project" / "models" / "marts" / "slow_events.py"
    slow.write_text(SLOW_MODEL)
    try:
        stack.land("events", 3)
        stack.post_sync_end("events")

        def slow_model_running() -> Any:
            new = [r.id for r in stack.runs() if r.id not in stack.seen]
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

        victim = stack.wait_for(slow_model_running, "the slow model to be running")
        # Heartbeats flow on the worker path (PrefectHQ/prefect#16515 once said they did not):
        # the run's first beat is what arms the lost-run trigger.
        stack.wait_for(lambda: _heartbeats(victim, started), "the victim's first heartbeat", 60)

        # Prefect's process worker starts each flow run in a session of its own
        # (prefect/runner/_workspace_starter.py, isolate_process_group), so SIGKILL to the
        # worker's process group alone would leave the run running and reporting. A lost machine,
        # or a service manager killing the worker's cgroup, takes every group under the worker.
        worker_pid = stack.procs[1].pid
        tree = _tree(worker_pid)
        assert str(victim) in {_flow_run_of(pid) for pid in tree}, "the run is not under the worker"
        groups = {os.getpgid(pid) for pid in tree if not _gone(pid)}
        assert worker_pid in groups and len(groups) > 1, groups
        for group in groups:
            os.killpg(group, signal.SIGKILL)
        stack.procs[1].wait(timeout=10)
        stack.wait_for_state(lambda: all(map(_gone, tree)), "the killed processes to be gone", 10)
    finally:
        slow.unlink()
    # The machine comes back while the lost run still says Running: a new worker must leave it
    # to the automation.
    stack.restart_runner()

    def crashed() -> Any:
        (run,) = [r for r in stack.runs() if r.id == victim]
        return run if run.state_name == "Crashed" else None

    run = stack.wait_for_state(crashed, "the lost run to be marked Crashed", timeout=120)
    assert "No heartbeat for 40 s" in run.state.message
    (message,) = automations.wait_for(run.name)
    assert "transform-on-sync crashed" in message and "No heartbeat" in message
    # once: a sentinel sent later through the same automations has arrived, and still one message
    automations.wait_for(sentinel(stack.prefect_api))
    assert len([m for m in automations.messages if run.name in m]) == 1
    assert transformed_sources(stack.home, [run]) == []  # nothing claims its data was built

    # The next sync, on the new worker, builds the lost run's source too: the Crashed state
    # released the deployment's concurrency slot.
    stack.seen.add(victim)
    stack.land("customers", 3)
    stack.post_sync_end("customers")
    runs = stack.settle(at_least=1)
    assert [r.state_name for r in runs] == ["Completed"] * len(runs)
    assert transformed_sources(stack.home, runs) == ["customers", "events"]
    built = set().union(*(b["models"] for b in builds_of(stack.home, runs)))
    assert {"stg_events", "fct_daily_events", "stg_customers"} <= built
    assert "slow_events" not in built
