"""Five Fivetran connectors, as a team's warehouse has them, through the served webhook path.

The home is tests/fixtures/fivetran_project: a dbt project with one source per Fivetran
connection schema (salesforce, stripe, hubspot, zendesk, shopify; 4 tables each, every one with
``loaded_at_field: _fivetran_synced`` and a freshness block), a staging view per table, marts
joining connectors; its postload.yaml maps each source to a connector id with no ``raw_table``
(the tables come from the dbt manifest) and opts in to full builds (``full_run: {}``).

A sync is ``postload.fivetran.simulate.simulate_sync``: rows upserted into the connection's own
schema with an aware ``_fivetran_synced``, no ``ops.load_log`` row, nothing in ``raw``. Then its
signed ``sync_end`` webhook goes to a ``postload receiver`` process, which forwards it to the
session's Prefect test server, whose triggers wake both ``transform-on-sync`` and
``full-run-when-fresh`` served by one ``postload serve`` process. What was built is read from
``ops.dbt_run_results`` of the runs, and compared node for node with ``dbt ls`` of the selection
the changed tables call for (``DbtProject.list_nodes``). The tests share the stack and run in
order, each on the state the previous one left.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
)

from postload.config import Selection, Settings
from postload.dbt import DbtProject
from postload.fivetran.simulate import SimulatedSync, simulate_sync
from postload.fivetran.webhook import SIGNATURE_HEADER, sign, sync_end_body
from postload.sources import source_tables
from postload.warehouse._duckdb import DuckDBWarehouse
from postload.writer import warehouse_writer
from tests.conftest import REPO, PostloadHome, assert_no_secret_in, sql, suite_secret
from tests.fivetran.test_receiver import free_port
from tests.system.test_transform_on_sync_served import (
    POSTLOAD,
    START_TIMEOUT,
    ServedStack,
    start_parts,
    stop_parts,
)

# Starts real processes (a served runner, a receiver) against the session's Prefect server.
pytestmark = pytest.mark.system

PROJECT = REPO / "tests" / "fixtures" / "fivetran_project"
SECRET = suite_secret("fivetran connectors: webhook secret", "whsec-connectors-2f9e61")
TRANSFORM = "transform-on-sync"
FULL_RUN = "full-run-when-fresh"
OK_STATUSES = {"success", "pass"}

TABLES = {
    "salesforce": ["account", "contact", "opportunity", "user"],
    "stripe": ["customer", "charge", "invoice", "subscription"],
    "hubspot": ["company", "contact", "deal", "owner"],
    "zendesk": ["ticket", "user", "organization", "ticket_comment"],
    "shopify": ["customer", "order", "product", "order_line"],
}


def _day(i: int) -> datetime:
    return datetime(2026, 11, 1 + i % 28, 9, 30)


def _ref(i: int) -> int:
    """The parent row a child row points at: ids 1-3 always exist."""
    return i % 3 + 1


# Each table's row ``i`` as the connector delivers it at version ``v`` of the source data.
ROWS: dict[tuple[str, str], Any] = {
    ("salesforce", "account"): lambda i, v: {
        "id": f"001A{i:04d}",
        "name": f"Account {i}",
        "industry": ["Software", "Retail", "Health"][i % 3],
        "annual_revenue": 1e6 * i + v,
        "created_date": _day(i),
    },
    ("salesforce", "contact"): lambda i, v: {
        "id": f"003A{i:04d}",
        "account_id": f"001A{_ref(i):04d}",
        "email": f"contact{i}@example.com",
        "first_name": "Ada",
        "last_name": f"Lovelace-{v}",
    },
    ("salesforce", "opportunity"): lambda i, v: {
        "id": f"006A{i:04d}",
        "account_id": f"001A{_ref(i):04d}",
        "name": f"Opportunity {i}",
        "stage_name": ["Prospecting", "Negotiation", "Closed Won"][(i + v) % 3],
        "amount": 1000.0 * i + v,
        "close_date": date(2026, 12, 1 + i % 28),
        "is_won": (i + v) % 3 == 2,
    },
    ("salesforce", "user"): lambda i, v: {
        "id": f"005A{i:04d}",
        "name": f"Rep {i}",
        "email": f"rep{i}@example.com",
        "is_active": (i + v) % 2 == 0,
    },
    ("stripe", "customer"): lambda i, v: {
        "id": f"cus_{i:04d}",
        "email": f"billing{i}@example.com",
        "name": f"Customer {i} v{v}",
        "salesforce_account_id": f"001A{_ref(i):04d}",
        "created": _day(i),
    },
    ("stripe", "charge"): lambda i, v: {
        "id": f"ch_{i:04d}",
        "customer_id": f"cus_{_ref(i):04d}",
        "amount": 1000 * i + v,
        "currency": "usd",
        "status": "succeeded" if i % 4 else "failed",
        "created": _day(i),
    },
    ("stripe", "invoice"): lambda i, v: {
        "id": f"in_{i:04d}",
        "customer_id": f"cus_{_ref(i):04d}",
        "amount_due": 500 * i + v,
        "status": ["draft", "open", "paid"][(i + v) % 3],
        "created": _day(i),
    },
    ("stripe", "subscription"): lambda i, v: {
        "id": f"sub_{i:04d}",
        "customer_id": f"cus_{_ref(i):04d}",
        "status": "active" if (i + v) % 2 else "past_due",
        "plan_amount": 4900,
        "current_period_end": _day(i + v),
    },
    ("hubspot", "company"): lambda i, v: {
        "id": 100 + i,
        "name": f"Company {i}",
        "domain": f"company{i}.example.com",
        "salesforce_account_id": f"001A{_ref(i):04d}",
    },
    ("hubspot", "contact"): lambda i, v: {
        "id": 200 + i,
        "company_id": 100 + _ref(i),
        "email": f"lead{i}@example.com",
        "lifecycle_stage": ["lead", "opportunity", "customer"][(i + v) % 3],
    },
    ("hubspot", "deal"): lambda i, v: {
        "id": 300 + i,
        "company_id": 100 + _ref(i),
        "deal_name": f"Deal {i}",
        "deal_stage": ["appointmentscheduled", "contractsent", "closedwon"][(i + v) % 3],
        "amount": 250.0 * i + v,
        "close_date": date(2026, 12, 1 + i % 28),
    },
    ("hubspot", "owner"): lambda i, v: {
        "id": 400 + i,
        "email": f"owner{i}@example.com",
        "first_name": "Grace",
        "last_name": f"Hopper-{v}",
    },
    ("zendesk", "ticket"): lambda i, v: {
        "id": 500 + i,
        "organization_id": 600 + _ref(i),
        "requester_id": 700 + _ref(i),
        "status": ["new", "open", "pending", "solved"][(i + v) % 4],
        "priority": ["low", "normal", "high"][i % 3],
        "created_at": _day(i),
    },
    ("zendesk", "user"): lambda i, v: {
        "id": 700 + i,
        "organization_id": 600 + _ref(i),
        "email": f"agent{i}@example.com",
        "role": ["end-user", "agent", "admin"][(i + v) % 3],
    },
    ("zendesk", "organization"): lambda i, v: {
        "id": 600 + i,
        "name": f"Org {i} v{v}",
        "external_id": f"001A{i:04d}",
    },
    ("zendesk", "ticket_comment"): lambda i, v: {
        "id": 800 + i,
        "ticket_id": 500 + _ref(i),
        "author_id": 700 + _ref(i),
        "public": (i + v) % 2 == 0,
        "created_at": _day(i),
    },
    ("shopify", "customer"): lambda i, v: {
        "id": 900 + i,
        "email": f"shopper{i}@example.com",
        "first_name": "Alan",
        "last_name": f"Turing-{v}",
    },
    ("shopify", "order"): lambda i, v: {
        "id": 1000 + i,
        "customer_id": 900 + _ref(i),
        "total_price": 20.0 * i + v,
        "currency": "USD",
        "financial_status": "paid" if (i + v) % 3 else "pending",
        "created_at": _day(i),
    },
    ("shopify", "product"): lambda i, v: {
        "id": 1100 + i,
        "title": f"Product {i} v{v}",
        "product_type": ["mug", "shirt"][i % 2],
        "vendor": "Acme",
    },
    ("shopify", "order_line"): lambda i, v: {
        "id": 1200 + i,
        "order_id": 1000 + _ref(i),
        "product_id": 1100 + _ref(i),
        "quantity": i + v,
        "price": 9.5,
    },
}


def downstream(changes: dict[str, list[str]]) -> str:
    """The selection a sync that changed these tables calls for: each table and what reads it."""
    return " ".join(f"source:{s}.{t}+" for s, tables in changes.items() for t in tables)


@dataclass
class Built:
    """What a set of flow runs built, from ``ops.dbt_run_results``."""

    runs: set[str]  # the flow runs that recorded dbt results
    invocations: set[str]
    nodes: set[str]  # unique ids
    statuses: set[str]


def summary(label: str, built: Built, expected: set[str]) -> None:
    """The numbers, for ``pytest -s``: what was built against what ``dbt ls`` selects."""
    models = len([n for n in built.nodes if n.startswith("model.")])
    print(
        f"{label}: built {len(built.nodes)} nodes ({models} models, {len(built.nodes) - models} "
        f"tests) in {len(built.invocations)} invocation(s); dbt ls: {len(expected)}"
    )


def built_by(home: PostloadHome, runs: Iterable[Any]) -> Built:
    ids = [str(r.id) for r in runs]
    rows = (
        sql(
            home,
            "select flow_run_id, invocation_id, unique_id, status from ops.dbt_run_results "
            f"where flow_run_id in ({','.join('?' * len(ids))})",
            ids,
        )
        if ids
        else []
    )
    return Built(
        runs={r[0] for r in rows},
        invocations={r[1] for r in rows},
        nodes={r[2] for r in rows},
        statuses={r[3] for r in rows},
    )


@dataclass
class ConnectorStack(ServedStack):
    """The served stack with both event-driven deployments, fed by simulated connectors."""

    deployments: dict[str, uuid.UUID] = field(default_factory=dict)
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    connectors: dict[str, str] = field(default_factory=dict)  # source -> connector id
    versions: dict[str, int] = field(default_factory=dict)  # source -> syncs so far
    lister: DbtProject | None = None

    def runs(self) -> list[Any]:
        """This module's runs of both deployments (a session's server has other modules' too)."""
        if not self.deployments:
            return []
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=list(self.deployments.values()))
                ),
                flow_run_filter=FlowRunFilter(
                    expected_start_time=FlowRunFilterExpectedStartTime(after_=self.started)
                ),
            )

    def of(self, deployment: str, runs: list[Any]) -> list[Any]:
        return [r for r in runs if r.deployment_id == self.deployments[deployment]]

    def sync(self, source: str, tables: Iterable[str]) -> SimulatedSync:
        """One Fivetran sync of ``source``'s connector that changed ``tables``: the first sync
        delivers rows 1-3, each later one updates row 1 and adds a row. It takes the warehouse
        writer slot as the flow runs do: DuckDB has one writer at a time."""
        version = self.versions.get(source, 0)
        self.versions[source] = version + 1
        ids = [1, 2, 3] if version == 0 else [1, 3 + version]
        rows = {t: [ROWS[(source, t)](i, version) for i in ids] for t in tables}
        settings = Settings(project_dir=self.home.root)
        with warehouse_writer(settings):
            return simulate_sync(settings.duckdb_file, source, rows)

    def deliver(
        self, source: str, *, sync_id: str | None = None, status: str = "SUCCESSFUL"
    ) -> dict[str, Any]:
        """Fivetran's signed ``sync_end`` for ``source``'s connector; the receiver's answer."""
        body = sync_end_body(
            self.connectors[source],
            status=status,
            sync_id=sync_id or uuid.uuid4().hex,
            created=datetime.now(UTC),
            connector_name=f"{source} production",
            connector_type=source,
            group_id="warm_warehouse",
        )
        response = httpx.post(
            f"{self.receiver_url}/webhooks/fivetran",
            content=body,
            headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, SECRET)},
            timeout=30,
        )
        assert response.status_code == 202, response.text
        answer: dict[str, Any] = response.json()
        return answer

    def nodes(self, selection: str) -> set[str]:
        """``dbt ls`` of a selection: the models and tests a build of it runs."""
        assert self.lister is not None
        return set(self.lister.list_nodes(Selection(select=selection)))

    def freshness_report(self, run: Any) -> str:
        """The full-run-when-fresh run's decision, as its ``source-freshness`` artifact says it."""
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]),
                    key=ArtifactFilterKey(any_=["source-freshness"]),
                )
            )
        assert len(artifacts) == 1, artifacts
        return str(artifacts[0].data)

    def events(self, name: str, source: str) -> list[dict[str, Any]]:
        """The Prefect events of this name for ``source``'s connector since the stack started."""
        response = httpx.post(
            f"{self.prefect_api}/events/filter",
            json={
                "filter": {
                    "occurred": {"since": self.started.isoformat()},
                    "event": {"name": [name]},
                    "resource": {"id": [f"fivetran.connector.{self.connectors[source]}"]},
                },
                "limit": 50,
            },
            timeout=30,
        )
        response.raise_for_status()
        events: list[dict[str, Any]] = response.json()["events"]
        return events


def fivetran_home(root: Path, monkeypatch: pytest.MonkeyPatch) -> PostloadHome:
    """A checkout whose settings point at a copy of the Fivetran-shaped project and its config.

    postload.yaml sits outside the dbt project, so changing it (a test does) does not make the
    flows parse the project again.
    """
    root.mkdir(parents=True, exist_ok=True)
    project = root / "fivetran_project"
    shutil.copytree(
        PROJECT,
        project,
        ignore=shutil.ignore_patterns("target", "logs", "dbt_packages", "postload.yaml"),
    )
    shutil.copy(PROJECT / "postload.yaml", root / "postload.yaml")
    env = {
        "POSTLOAD_PROJECT_DIR": str(root),
        "POSTLOAD_DBT_PROJECT_DIR": str(project),
        "POSTLOAD_PIPELINE_CONFIG": str(root / "postload.yaml"),
        "POSTLOAD_RETRY_BACKOFF_SECONDS": "0",
        "POSTLOAD_WAREHOUSE_CONCURRENCY_LIMIT": f"postload-warehouse-{root.parent.name}",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return PostloadHome(root=root, env=env)


def pending_tables(stack: ConnectorStack) -> list[tuple[str, str]]:
    """The tables with rows no successful build covered yet."""
    assert stack.lister is not None
    settings = Settings(project_dir=stack.home.root)
    pipeline = settings.load_pipeline()
    tables = source_tables(pipeline, stack.lister.manifest(), settings.pipeline_config_path)
    warehouse = DuckDBWarehouse(settings.duckdb_file, settings.stage_root_path, pipeline)
    marks = warehouse.watermarks([t for ts in tables.values() for t in ts])
    return sorted(key for key, mark in marks.items() if mark.pending)


@pytest.fixture(scope="module")
def stack(
    prefect_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ConnectorStack]:
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("connectors")
    home = fivetran_home(root / "checkout", monkeypatch)
    config = yaml.safe_load((home.root / "postload.yaml").read_text())
    connectors = {s["name"]: s["loader"]["connector_id"] for s in config["sources"]}
    assert sorted(connectors) == sorted(TABLES)

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
        "serve": [POSTLOAD, "serve", "--only", TRANSFORM, "--only", FULL_RUN, "--no-schedules"],
    }
    started = datetime.now(UTC)
    procs, logs = start_parts(commands, root, env)
    stack = ConnectorStack(
        home,
        prefect_server,
        f"http://127.0.0.1:{port}",
        uuid.uuid4(),
        procs,
        logs,
        runner_argv=commands["serve"],
        runner_env=env,
        started=started,
        connectors=connectors,
    )
    settings = Settings()
    stack.lister = DbtProject(
        settings.dbt_project_path, settings.duckdb_file, target_path=root / "ls-target"
    )
    try:
        # (a) The first sync of every connector, every table, built once by a full build, in this
        # process while the receiver and runner start (nothing wakes them meanwhile).
        from flows.full_run_when_fresh import full_run_when_fresh

        for source, tables in TABLES.items():
            stack.sync(source, tables)
        assert full_run_when_fresh(reason="initial sync")["built"] is True

        def served() -> dict[str, uuid.UUID] | None:
            # Both deployments registered by this runner, which polls for their runs.
            found = {}
            with get_client(sync_client=True) as client:
                for name in (TRANSFORM, FULL_RUN):
                    try:
                        deployment = client.read_deployment_by_name(f"{name}/{name}")
                    except Exception:
                        return None
                    if deployment.last_polled is None or deployment.last_polled < started:
                        return None
                    found[name] = deployment.id
            return found

        stack.deployments = stack.wait_for(served, "the served deployments", START_TIMEOUT)
        stack.deployment_id = stack.deployments[TRANSFORM]
        stack.wait_for(stack.receiver_up, "the receiver", START_TIMEOUT)
        stack.seen = {r.id for r in stack.runs()}
        yield stack
    finally:
        stop_parts(procs)
        try:
            _leave_the_server_clean(stack)
        finally:
            monkeypatch.undo()
        for log in logs:
            assert_no_secret_in(log)


def _leave_the_server_clean(stack: ConnectorStack) -> None:
    """The session's server outlives this module: no run of ours left waiting, and no trigger
    of full-run-when-fresh (which no later module serves) left to make runs nobody starts."""
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        for run in stack.runs():
            if run.state is None or not run.state.is_final():
                client.set_flow_run_state(run.id, Cancelled(message="test module over"), force=True)
        if FULL_RUN in stack.deployments:
            client.delete_resource_owned_automations(
                f"prefect.deployment.{stack.deployments[FULL_RUN]}"
            )


def test_initial_sync_is_built_once_and_leaves_a_steady_state(stack: ConnectorStack) -> None:
    home = stack.home
    every_node = stack.nodes("fqn:*")
    runs = sql(home, "select distinct flow_run_id, selection from ops.transform_runs")
    assert [selection for _, selection in runs] == ["--select fqn:*"]
    ((run_id, _),) = runs
    (invocations,) = sql(
        home,
        "select count(distinct invocation_id) from ops.dbt_run_results where flow_run_id = ?",
        [run_id],
    )
    assert invocations == (1,)
    nodes = {
        uid
        for (uid, status) in sql(
            home,
            "select unique_id, status from ops.dbt_run_results where flow_run_id = ?",
            [run_id],
        )
        if status in OK_STATUSES
    }
    # 20 staging views, 6 marts and their tests: all of them, all passing
    summary("(a) initial full build", Built({run_id}, {"-"}, nodes, set()), every_node)
    assert nodes == every_node
    assert len([n for n in every_node if n.startswith("model.")]) == 26
    assert pending_tables(stack) == []  # nothing left for transform-on-sync to build

    # Fivetran's tables, not postload's: typed columns, aware _fivetran_synced, no ops rows
    synced_types = sql(
        home,
        "select distinct data_type from information_schema.columns "
        "where column_name = '_fivetran_synced'",
    )
    assert synced_types == [("TIMESTAMP WITH TIME ZONE",)]
    (tables,) = sql(
        home,
        "select count(*) from information_schema.columns where column_name = '_fivetran_synced'",
    )
    assert tables == (20,)
    assert sql(home, "select count(*) from ops.load_log") == [(0,)]
    assert sql(
        home, "select count(*) from information_schema.tables where table_schema = 'raw'"
    ) == [(0,)]


def test_a_sync_of_two_tables_builds_exactly_what_reads_them_and_no_full_build(
    stack: ConnectorStack,
) -> None:
    changed = {"salesforce": ["account", "opportunity"]}
    sync = stack.sync("salesforce", changed["salesforce"])
    assert sync.tables == ["account", "opportunity"]
    stack.deliver("salesforce")

    runs = stack.settle(at_least=2)
    (transform,) = stack.of(TRANSFORM, runs)
    (full,) = stack.of(FULL_RUN, runs)
    assert transform.state_name == "Completed" and full.state_name == "Completed"
    assert transform.parameters["connector_id"] == stack.connectors["salesforce"]

    expected = stack.nodes(downstream(changed))
    built = built_by(stack.home, [transform])
    summary("(b) salesforce account+opportunity", built, expected)
    assert built.nodes == expected
    assert len(built.invocations) == 1 and built.statuses <= OK_STATUSES
    # selective: the connector's two other tables and every other connector are left alone
    assert "model.fivetran_stack.stg_salesforce__contact" not in built.nodes
    assert "model.fivetran_stack.customer_360" in built.nodes
    assert "model.fivetran_stack.account_health" in built.nodes  # a mart on a mart
    assert sql(
        stack.home,
        "select source, selection from ops.transform_runs where flow_run_id = ?",
        [str(transform.id)],
    ) == [("salesforce", "--select source:salesforce.account+ source:salesforce.opportunity+")]

    # the same event woke the full run, which waits for the other four connectors
    assert built_by(stack.home, [full]).nodes == set()
    report = stack.freshness_report(full)
    assert "waiting for a load of" in report
    assert all(s in report.split("waiting for a load of")[1] for s in TABLES if s != "salesforce")
    assert pending_tables(stack) == []


BURST = {
    "salesforce": ["contact", "user"],
    "stripe": ["charge", "invoice"],
    "hubspot": ["deal"],
    "zendesk": ["ticket", "organization"],
    "shopify": ["order", "order_line"],
}


def burst(stack: ConnectorStack, changes: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Every connector syncs, then their five webhooks arrive at once."""
    for source, tables in changes.items():
        stack.sync(source, tables)
    with ThreadPoolExecutor(len(changes)) as pool:
        return list(pool.map(stack.deliver, changes))


def test_a_burst_of_five_connectors_is_one_dbt_invocation_of_the_union(
    stack: ConnectorStack,
) -> None:
    # From here on, full builds at most daily (the last one was the initial build): once every
    # connector has synced, a full build would be due, and only transform-on-sync is under test
    # in this and the following cases, whichever order the runs take the warehouse in. (The
    # generation rule itself: test b here, and the flows and unit tiers.)
    config_path = stack.home.root / "postload.yaml"
    config = config_path.read_text()
    config_path.write_text(config.replace("full_run: {}", "full_run: {min_interval: 1d}"))
    burst(stack, BURST)
    # one run of each deployment per sync: the first to start covers the waiting ones
    runs = stack.settle(at_least=10)
    transforms, fulls = stack.of(TRANSFORM, runs), stack.of(FULL_RUN, runs)
    assert len(transforms) == 5 and len(fulls) == 5
    assert {r.parameters["connector_id"] for r in transforms} == set(stack.connectors.values())
    assert {r.state_name for r in runs} <= {"Completed", "Cancelled"}

    expected = stack.nodes(downstream(BURST))
    built = built_by(stack.home, transforms)
    summary("(c) burst of 5 connectors", built, expected)
    assert len(built.runs) == 1 and len(built.invocations) == 1, built
    assert built.nodes == expected and built.statuses <= OK_STATUSES
    # the union, not everything: e.g. HubSpot's other tables and Shopify's products stay put
    assert "model.fivetran_stack.stg_hubspot__owner" not in built.nodes
    assert "model.fivetran_stack.stg_shopify__product" not in built.nodes
    (run_id,) = built.runs
    assert sorted(
        s
        for (s,) in sql(
            stack.home, "select source from ops.transform_runs where flow_run_id = ?", [run_id]
        )
    ) == sorted(TABLES)
    assert built_by(stack.home, fulls).nodes == set()
    assert all(
        "min_interval" in stack.freshness_report(r) for r in fulls if r.state_name == "Completed"
    )
    assert pending_tables(stack) == []


def test_five_deliveries_of_one_sync_build_once(stack: ConnectorStack) -> None:
    changed = {"zendesk": ["ticket", "ticket_comment"]}
    stack.sync("zendesk", changed["zendesk"])
    sync_id = uuid.uuid4().hex
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: stack.deliver("zendesk", sync_id=sync_id), range(5)))
    assert len({a["event_id"] for a in answers}) == 1
    assert sorted(a["duplicate"] for a in answers) == [False, True, True, True, True]

    runs = stack.settle(at_least=2)
    (transform,) = stack.of(TRANSFORM, runs)
    (full,) = stack.of(FULL_RUN, runs)
    assert transform.parameters["sync_id"] == sync_id
    built = built_by(stack.home, [transform])
    expected = stack.nodes(downstream(changed))
    summary("(d) 5 deliveries of one zendesk sync", built, expected)
    assert len(built.invocations) == 1
    assert built.nodes == expected and built.statuses <= OK_STATUSES
    assert built_by(stack.home, [full]).nodes == set()

    def stored() -> list[dict[str, Any]]:
        return [
            e
            for e in stack.events("fivetran.sync.succeeded", "zendesk")
            if e["resource"].get("fivetran.sync_id") == sync_id
        ]

    assert len(stack.wait_for(stored, "the sync's event", timeout=60)) == 1  # one event, not five


def test_a_failed_sync_builds_nothing(stack: ConnectorStack) -> None:
    failed_sync = uuid.uuid4().hex
    assert stack.deliver("stripe", sync_id=failed_sync, status="FAILURE")["duplicate"] is False
    # A later successful sync of another connector: once its runs are over, the failure's event
    # has been through the triggers too.
    changed = {"shopify": ["customer"]}
    stack.sync("shopify", changed["shopify"])
    stack.deliver("shopify")

    runs = stack.settle(at_least=2)
    (transform,) = stack.of(TRANSFORM, runs)
    assert len(stack.of(FULL_RUN, runs)) == 1
    assert transform.parameters["connector_id"] == stack.connectors["shopify"]
    built = built_by(stack.home, runs)
    expected = stack.nodes(downstream(changed))
    summary("(e) failed stripe sync, then a shopify sync", built, expected)
    assert built.nodes == expected
    assert not any("stripe" in node for node in built.nodes)

    def failure_recorded() -> list[dict[str, Any]]:
        return [
            e
            for e in stack.events("fivetran.sync.failed", "stripe")
            if e["resource"].get("fivetran.sync_id") == failed_sync
        ]

    (event,) = stack.wait_for(failure_recorded, "the failed sync's event", timeout=60)
    assert event["payload"]["data"]["status"] == "FAILURE"
    assert all(r.parameters.get("sync_id") != failed_sync for r in stack.runs())
