"""Shared fixtures: one Prefect test server for the session, an isolated postload home, and a
loopback Slack with postload's failure automations pointed at it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from postload.local.stack import use_local_server_settings

os.environ.setdefault("DO_NOT_TRACK", "1")
# A run woken while another run of its deployment is in progress waits for it (ENQUEUE): the test
# server lets it try again after 1 s (the local stack uses 2, Prefect's default is 30).
os.environ.setdefault("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "1")
# Except its leases: kept on disk under PREFECT_HOME, which the test servers of parallel workers
# share while each has a database of its own (a server of its own home is tested apart).
os.environ.setdefault(
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.memory"
)
use_local_server_settings()  # the test server runs as the local stack's does

REPO = Path(__file__).resolve().parent.parent


# Every secret value the suite uses (webhook secrets, API keys, passwords, Slack URLs), by name.
# Test modules register theirs with ``suite_secret`` when they are imported, so the list is whole
# before the first test runs. No test's captured output (stdout and stderr at the file-descriptor
# level, log records, the failure report) may contain one: a test whose output does fails, named
# with the secret's name, never its value. Subprocess logs are checked with ``assert_no_secret_in``.
SUITE_SECRETS: dict[str, str] = {}


def suite_secret(name: str, value: str) -> str:
    SUITE_SECRETS[name] = value
    return value


# The secret part of the loopback Slack's webhook URL, as in hooks.slack.com/services/T/B/<secret>.
FAKE_SLACK_PATH = suite_secret("fake Slack: webhook path", "secretpath-5e0b9c")


def leaked_secrets(text: str) -> list[str]:
    """The names of the suite's secrets that appear in ``text``."""
    return sorted(name for name, value in SUITE_SECRETS.items() if value in text)


def assert_no_secret_in(path: Path) -> None:
    leaked = leaked_secrets(path.read_text(errors="replace")) if path.exists() else []
    assert not leaked, f"{path.name} contains secret(s): {', '.join(leaked)}"


# The test tiers. A test's tier is its explicit marker, else ``flows`` when it uses the session's
# Prefect test server, else ``unit``. `make test-fast` runs the unit tier with no Prefect server
# reachable, so a test that needs one and is not marked fails there instead of passing slowly.
TIERS = {
    "unit": "needs no Prefect server: plain functions, DuckDB, dbt, fakes at the HTTP layer",
    "flows": "runs flows or calls the API on the session's Prefect test server",
    "system": "starts real processes: the local stack, a served runner, a receiver process",
}


# Tests too slow for the suite's budget, each run by a make target of its own (markers in
# pyproject.toml). Unless the -m expression names their marker they are deselected, which pytest
# counts in its summary line, and the summary says how to run them: never skipped in silence.
OWN_TARGET = {"worker": "make test-worker"}
_own_target_deselected = pytest.StashKey[dict[str, int]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        item.add_marker("flows" if "prefect_server" in item.fixturenames else "unit")

    markexpr = config.getoption("markexpr") or ""
    counts: dict[str, int] = {}
    for marker in OWN_TARGET:
        if re.search(rf"\b{marker}\b", markexpr):
            continue
        deselected = [item for item in items if item.get_closest_marker(marker)]
        if deselected:
            counts[marker] = len(deselected)
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not item.get_closest_marker(marker)]
    config.stash[_own_target_deselected] = counts


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    for marker, count in config.stash.get(_own_target_deselected, {}).items():
        terminalreporter.write_line(
            f"{count} `{marker}` test(s) deselected (-m does not name `{marker}`): "
            f"run them with `{OWN_TARGET[marker]}`"
        )


def pytest_configure(config: pytest.Config) -> None:
    for tier, meaning in TIERS.items():
        config.addinivalue_line("markers", f"{tier}: {meaning}")
    config.addinivalue_line(
        "markers",
        "upstream_secret_leak(name, line, reason): a library outside postload prints the named "
        "secret on lines matching the regex `line`; only those lines are exempt from the scan",
    )


def _leaks(item: pytest.Item, text: str) -> list[str]:
    """The secrets in ``text``, each outside the lines a library is known to leak it on."""
    leaked = []
    for name in leaked_secrets(text):
        rest = text
        for marker in item.iter_markers("upstream_secret_leak"):
            if marker.kwargs["name"] == name:
                pattern = re.compile(marker.kwargs["line"])
                rest = "\n".join(line for line in rest.splitlines() if not pattern.search(line))
        if SUITE_SECRETS[name] in rest:
            leaked.append(name)
    return leaked


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    # Each phase's report also carries the earlier phases' sections ("Captured stdout call" in the
    # teardown report): only this phase's are scanned, so a leak is reported once.
    captured = "\n".join(
        content for title, content in report.sections if title.endswith(f" {report.when}")
    )
    if leaked := _leaks(item, f"{captured}\n{report.longreprtext}"):
        # The original report may hold the value itself: replaced, not shown.
        report.outcome = "failed"
        report.longrepr = (
            f"secret(s) in the captured output of {item.nodeid} ({report.when}): "
            f"{', '.join(leaked)}"
        )
        report.sections = []


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A real Prefect API server (SQLite) for the whole session; ~25 s to start on 2 cores."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@dataclass(frozen=True)
class PostloadHome:
    """An isolated checkout-like folder: its own warehouse, stage and dbt target."""

    root: Path
    env: dict[str, str]

    @property
    def stage(self) -> Path:
        return self.root / ".postload" / "stage"

    @property
    def duckdb(self) -> Path:
        return self.root / ".postload" / "warehouse.duckdb"


def make_home(root: Path, monkeypatch: pytest.MonkeyPatch) -> PostloadHome:
    """Settings point at a copy of the pipeline config and dbt project under root."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "postload.yaml", root / "postload.yaml")
    shutil.copytree(
        REPO / "dbt_project",
        root / "dbt_project",
        ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"),
    )
    env = {
        "POSTLOAD_PROJECT_DIR": str(root),
        "POSTLOAD_RETRY_BACKOFF_SECONDS": "0",
        # Unique per home so runs of different tests never share a concurrency slot by accident.
        "POSTLOAD_WAREHOUSE_CONCURRENCY_LIMIT": f"postload-warehouse-{root.parent.name}",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return PostloadHome(root=root, env=env)


def sql(home: PostloadHome, query: str, params: list[Any] | None = None) -> list[tuple]:
    """Query the home's warehouse. Read-write like dbt-duckdb: DuckDB refuses a second handle on
    the same file in one process with a different configuration."""
    con = duckdb.connect(str(home.duckdb))
    try:
        return con.execute(query, params or []).fetchall()
    finally:
        con.close()


def recorded_task_runs(
    flow_run_id: uuid.UUID | str, until: Callable[[list[Any]], bool], timeout: float = 30.0
) -> list[Any]:
    """The flow run's task runs, read until ``until`` holds of them or ``timeout`` passes.

    Task runs reach the server as events and are recorded in batches flushed every second
    (LOCAL_SERVER_SETTINGS): a Completed flow run's last task runs may still be on their way.
    Past the timeout the last read is returned, for the caller's assert to say what is missing.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(str(flow_run_id))]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=flow_runs)
            if until(runs) or time.monotonic() > deadline:
                return runs
            time.sleep(0.25)


@pytest.fixture(scope="session")
def parsed_dbt_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dbt project, parsed once for the session (copy it with its target/: copytree
    keeps modification times, so the manifest stays newer than the project)."""
    from postload.dbt import DbtProject

    path = tmp_path_factory.mktemp("parsed") / "dbt_project"
    shutil.copytree(
        REPO / "dbt_project", path, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages")
    )
    DbtProject(path, path.parent / "warehouse.duckdb").manifest()
    return path


@pytest.fixture
def postload_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PostloadHome:
    """An isolated home for one test (dbt writes its own target/)."""
    return make_home(tmp_path / "checkout", monkeypatch)


DEMO_MODELS = {
    "stg_customers",
    "stg_orders",
    "stg_events",
    "customer_orders",
    "fct_orders",
    "fct_daily_events",
}


def land_and_load(home: PostloadHome, source: str, batch: int) -> None:
    """A sync: rows land in the raw table, nothing is transformed (as after a Fivetran sync)."""
    from postload.config import Settings
    from postload.local.demo_data import write_demo_batch
    from postload.warehouse._duckdb import DuckDBWarehouse

    write_demo_batch(home.stage, source, batch)
    settings = Settings()
    pipeline = settings.load_pipeline()
    warehouse = DuckDBWarehouse(settings.duckdb_file, settings.stage_root_path, pipeline)
    warehouse.ensure_schema()
    warehouse.load(pipeline.source(source), None)


def hostile(max_examples: int) -> Any:
    """hypothesis settings for the hostile-input tests: no deadline (generation is cheap next to
    a request, and timing is not what is tested) and no example database (nothing is written
    into the checkout)."""
    from hypothesis import HealthCheck, settings

    return settings(
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
        max_examples=max_examples,
    )


# Slack stand-in: a loopback HTTP server speaking Slack's incoming-webhook protocol. Slack's
# incoming webhooks take POST with a JSON body {"text": ...} and answer 200 ok; the fake accepts
# exactly that (anything else is recorded as a protocol error) and can be told to answer 500.
# "Exactly one message" is checked after a sentinel that the same automations send later arrived.


@contextlib.contextmanager
def _loopback_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """An HTTP server on a free loopback port, in a thread; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class FakeSlack:
    url: str
    block_id: uuid.UUID | None = None  # the notification block the automations send through
    status: int = 200
    messages: list[str] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)

    def wait_for(self, needle: str, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.messages if needle in m]
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"no Slack message containing {needle!r}; got {self.messages}")


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    fake = FakeSlack(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                payload = json.loads(body)
                assert self.headers.get("Content-Type", "").startswith("application/json")
                assert isinstance(payload.get("text"), str)
                fake.messages.append(payload["text"])
            except (ValueError, AssertionError):
                fake.protocol_errors.append(body.decode(errors="replace"))
            self.send_response(fake.status)
            self.end_headers()
            self.wfile.write(b"ok" if fake.status == 200 else b"internal_error")

        def log_message(self, *args: object) -> None:
            pass

    with _loopback_server(Handler) as port:
        fake.url = f"http://127.0.0.1:{port}/services/T0/B0/{FAKE_SLACK_PATH}"
        yield fake
    assert fake.protocol_errors == []


def _save_slack_blocks(slack: FakeSlack) -> uuid.UUID:
    """The automations' block (a fresh name) and the flows' failure-hook block (its fixed name)."""
    from prefect_slack import SlackWebhook

    from postload.blocks import slack_notification_block
    from postload.hooks import SLACK_HOOK_BLOCK

    SlackWebhook(url=slack.url).save(SLACK_HOOK_BLOCK, overwrite=True)
    return slack_notification_block(slack.url).save(
        f"test-slack-{uuid.uuid4().hex[:8]}", overwrite=True
    )


def _remove_alerting() -> None:
    """Other tests' failures must not message or page these fakes."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.exceptions import ObjectNotFound
    from prefect_slack import SlackWebhook

    from postload.alerts import automation_names
    from postload.blocks import PAGERDUTY_BLOCK
    from postload.hooks import SLACK_HOOK_BLOCK

    for name in automation_names():
        with contextlib.suppress(ValueError):
            Automation.read(name=name).delete()
    with contextlib.suppress(ObjectNotFound, ValueError):
        SlackWebhook.delete(SLACK_HOOK_BLOCK)
    with contextlib.suppress(ObjectNotFound, ValueError):
        CustomWebhookNotificationBlock.delete(PAGERDUTY_BLOCK)


@pytest.fixture
def automations(prefect_server: str, slack: FakeSlack) -> Iterator[FakeSlack]:
    """postload's automations (Slack only) and the flows' Slack hook, pointed at the fake."""
    from postload.alerts import apply_automations

    block_id = _save_slack_blocks(slack)
    apply_automations(block_id)
    slack.block_id = block_id
    yield slack
    _remove_alerting()


# PagerDuty stand-in: a loopback server speaking the Events API v2 (POST /v2/enqueue, JSON
# {"routing_key", "event_action", "dedup_key", "payload"}; 202 {"status": "success", "message":
# "Event processed", "dedup_key"}; 400 {"status": "invalid event"} otherwise). Anything that does
# not follow PagerDuty's documented schema is answered 400 and recorded as a protocol error.
FAKE_PAGERDUTY_KEY = suite_secret("fake PagerDuty: routing key", "R0UT1NGKEYfakepagerduty000000042")
PAGERDUTY_SEVERITIES = {"critical", "error", "warning", "info"}


@dataclass
class FakePagerDuty:
    url: str
    events: list[dict[str, Any]] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)

    def of(self, action: str, dedup_key: str) -> list[dict[str, Any]]:
        return [
            e for e in self.events if e["event_action"] == action and e["dedup_key"] == dedup_key
        ]

    def wait_for(self, action: str, dedup_key: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.of(action, dedup_key):
                return found
            time.sleep(0.2)
        raise AssertionError(f"no PagerDuty {action} for {dedup_key!r}; got {self.events}")


def _events_v2_problem(event: Any) -> str | None:
    if not isinstance(event, dict):
        return "not a JSON object"
    if event.get("routing_key") != FAKE_PAGERDUTY_KEY:
        return "wrong routing_key"
    if event.get("event_action") not in ("trigger", "acknowledge", "resolve"):
        return "bad event_action"
    key = event.get("dedup_key")
    if not isinstance(key, str) or not 0 < len(key) <= 255:
        return "dedup_key missing or longer than 255"
    if event["event_action"] == "trigger":
        payload = event.get("payload")
        if not isinstance(payload, dict):
            return "trigger without payload"
        summary = payload.get("summary")
        if not isinstance(summary, str) or not 0 < len(summary) <= 1024:
            return "payload.summary missing or longer than 1024"
        if not isinstance(payload.get("source"), str) or not payload["source"]:
            return "payload.source missing"
        if payload.get("severity") not in PAGERDUTY_SEVERITIES:
            return "bad payload.severity"
        details = payload.get("custom_details")
        if details is not None and not isinstance(details, dict):
            return "payload.custom_details not an object"
    return None


@pytest.fixture
def pagerduty() -> Iterator[FakePagerDuty]:
    fake = FakePagerDuty(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                event = json.loads(body)
            except ValueError:
                event = None
            problem = (
                "wrong path"
                if self.path != "/v2/enqueue"
                else "not application/json"
                if not self.headers.get("Content-Type", "").startswith("application/json")
                else _events_v2_problem(event)
            )
            if problem:
                # The routing key is a secret: record the problem, never the body.
                fake.protocol_errors.append(problem)
                reply, status = {"status": "invalid event", "message": problem}, 400
            else:
                fake.events.append(event)
                reply = {
                    "status": "success",
                    "message": "Event processed",
                    "dedup_key": event["dedup_key"],
                }
                status = 202
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    with _loopback_server(Handler) as port:
        fake.url = f"http://127.0.0.1:{port}/v2/enqueue"
        yield fake
    assert fake.protocol_errors == []


@dataclass
class Alerting:
    slack: FakeSlack
    pagerduty: FakePagerDuty


@pytest.fixture
def alerting(prefect_server: str, slack: FakeSlack, pagerduty: FakePagerDuty) -> Iterator[Alerting]:
    """Every automation, Slack and PagerDuty included, and the flows' hooks, at the fakes."""
    from postload.alerts import apply_automations
    from postload.blocks import PAGERDUTY_BLOCK, pagerduty_notification_block

    slack_id = _save_slack_blocks(slack)
    pagerduty_id = pagerduty_notification_block(FAKE_PAGERDUTY_KEY, pagerduty.url).save(
        PAGERDUTY_BLOCK, overwrite=True
    )
    apply_automations(slack_id, pagerduty_id)
    slack.block_id = slack_id
    yield Alerting(slack, pagerduty)
    _remove_alerting()


def crash_sentinel(flow_name: str = "transform-on-sync") -> str:
    """A run of one of our flows marked Crashed (as postload-run-lost does): it pages and gets a
    Slack message, later than anything before it. Returns the run's id."""
    from prefect import flow as prefect_flow
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    @prefect_flow(name=flow_name)
    def stand_in() -> None:  # only its name matters: the automations match flows by name
        pass

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(stand_in)
        client.set_flow_run_state(run.id, Crashed(message="sentinel: no heartbeat"), force=True)
    return str(run.id)


def post_event(api_url: str, event: str, resource: dict, payload: dict) -> None:
    httpx.post(
        f"{api_url}/events",
        json=[
            {
                "id": str(uuid.uuid4()),
                "occurred": datetime.now(UTC).isoformat(),
                "event": event,
                "resource": resource,
                "payload": payload,
            }
        ],
    ).raise_for_status()


def sentinel(api_url: str) -> str:
    """A failed-sync event whose message, once received, proves earlier ones were delivered."""
    connector = f"sentinel_{uuid.uuid4().hex[:8]}"
    post_event(
        api_url,
        "fivetran.sync.failed",
        {
            "prefect.resource.id": f"fivetran.connector.{connector}",
            "fivetran.connector_id": connector,
        },
        {"event": "sync_end", "data": {"status": "FAILURE"}},
    )
    return connector
