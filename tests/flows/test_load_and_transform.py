"""End to end on the embedded stack: real Prefect server, real DuckDB, real dbt."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    TaskRunFilter,
    TaskRunFilterName,
    TaskRunFilterStartTime,
    TaskRunFilterState,
    TaskRunFilterStateName,
)
from prefect.types._datetime import now

from flows.load_and_transform import load_and_transform
from postload.config import UnknownSourceError
from postload.load import LoadVerificationError
from postload.local.demo_data import write_demo_batch
from tests.conftest import REPO, PostloadHome, land_and_load, make_home, recorded_task_runs, sql

EVENTS_MODELS = {"stg_events", "fct_daily_events"}


def built_models(home: PostloadHome, flow_run_id: str) -> set[str]:
    rows = sql(
        home,
        "select name from ops.dbt_run_results where flow_run_id = ? and resource_type = 'model'",
        [flow_run_id],
    )
    return {name for (name,) in rows}


@dataclass
class Run:
    source: str
    flow_run_id: str
    result: dict[str, Any]


@dataclass
class Scenario:
    home: PostloadHome
    runs: list[Run]

    def run(self, index: int) -> Run:
        return self.runs[index]


def run_flow(source: str) -> Run:
    state = load_and_transform(source, return_state=True)
    return Run(source, str(state.state_details.flow_run_id), state.result())


@pytest.fixture(scope="module")
def scenario(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """customers, orders, events land and load; then a second events batch; then a re-run."""
    root = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as mp:
        home = make_home(root / "checkout", mp)
        for source in ("customers", "orders", "events"):
            write_demo_batch(home.stage, source, 1)
        runs = [run_flow(s) for s in ("customers", "orders", "events")]
        write_demo_batch(home.stage, "events", 2)
        runs.append(run_flow("events"))  # [3] selective: events only
        runs.append(run_flow("events"))  # [4] nothing new
        yield Scenario(home, runs)


def test_each_load_builds_its_downstream_models(scenario: Scenario) -> None:
    customers, orders, events = scenario.runs[:3]
    assert customers.result["outcome"] == "loaded_with_rejects"
    assert customers.result["rows_loaded"] == 48 and customers.result["rows_rejected"] == 2
    # customers run on an empty warehouse: stg_orders (the mart's other parent) did not exist,
    # so it was built first instead of failing customer_orders / fct_orders.
    assert built_models(scenario.home, customers.flow_run_id) == {
        "stg_customers",
        "customer_orders",
        "fct_orders",
        "stg_orders",
    }
    assert built_models(scenario.home, orders.flow_run_id) == {
        "stg_orders",
        "customer_orders",
        "fct_orders",
    }
    assert built_models(scenario.home, events.flow_run_id) == EVENTS_MODELS
    statuses = sql(scenario.home, "select distinct status from ops.dbt_run_results")
    assert set(statuses) <= {("success",), ("pass",), ("warn",)}


def test_selective_run_builds_only_downstream_of_loaded_source(scenario: Scenario) -> None:
    second_events = scenario.run(3)
    assert second_events.result["rows_loaded"] == 48
    assert built_models(scenario.home, second_events.flow_run_id) == EVENTS_MODELS
    nodes = sql(
        scenario.home,
        "select unique_id from ops.dbt_run_results where flow_run_id = ?",
        [second_events.flow_run_id],
    )
    assert nodes and all("event" in uid for (uid,) in nodes), nodes
    # the mart joining customers and orders was not rebuilt: it still holds the first build
    assert sql(scenario.home, "select count(*) from analytics.customer_orders") == [(48,)]
    assert sql(scenario.home, "select count(*) from analytics.stg_events") == [(96,)]


def test_rerun_loads_nothing_twice_and_skips_dbt(scenario: Scenario) -> None:
    rerun = scenario.run(4)
    assert rerun.result["outcome"] == "no_new_files"
    assert rerun.result["dbt_status"] == "skipped"
    assert sql(scenario.home, "select count(*) from raw.events") == [(96,)]
    assert sql(scenario.home, "select count(*) from ops.load_log where source = 'events'") == [(2,)]
    assert sql(
        scenario.home,
        "select count(*) from ops.transform_runs where flow_run_id = ?",
        [rerun.flow_run_id],
    ) == [(0,)]


def test_pipeline_status_view_reports_load_to_transform(scenario: Scenario) -> None:
    rows = sql(
        scenario.home,
        "select source, rows_loaded, rows_rejected, transform_status, load_to_transform_minutes, "
        "awaiting_transform from ops.pipeline_status order by source",
    )
    assert [r[:4] for r in rows] == [
        ("customers", 48, 2, "success"),
        ("events", 96, 4, "success"),
        ("orders", 48, 2, "success"),
    ]
    for *_, minutes, awaiting in rows:
        assert minutes is not None and 0 <= minutes < 10
        assert awaiting is False
    assert scenario.run(4).result["status"][1]["source"] == "events"


def test_dbt_nodes_are_prefect_tasks_and_rejects_are_an_artifact(scenario: Scenario) -> None:
    run = scenario.run(3)
    task_runs = recorded_task_runs(
        run.flow_run_id, lambda runs: any(t.name.startswith("model stg_events") for t in runs)
    )
    with get_client(sync_client=True) as client:
        artifacts = client.read_latest_artifacts()
    names = {t.name for t in task_runs}
    assert any(n.startswith("model stg_events") for n in names), names
    assert {"load", "verify-load", "transform", "report-status"} <= {
        n.rsplit("-", 1)[0] for n in names
    }
    keys = {a.key for a in artifacts}
    assert {"load-rejects-events", "pipeline-status", "load-and-transform-events"} <= keys
    rejects = next(a for a in artifacts if a.key == "load-rejects-events")
    assert "events_0002.jsonl" in str(rejects.data)


def test_files_present_but_nothing_loaded_fails_the_run(
    prefect_server: str, postload_home: PostloadHome
) -> None:
    (postload_home.stage / "events").mkdir(parents=True)
    (postload_home.stage / "events" / "broken.jsonl").write_text("not json\n{also not\n")
    state = load_and_transform("events", return_state=True)
    assert state.is_failed()
    with pytest.raises(LoadVerificationError, match=r"staged but 0 rows loaded.*broken.jsonl"):
        state.result()


def test_missing_stage_folder_fails_with_clear_message(
    prefect_server: str, postload_home: PostloadHome
) -> None:
    state = load_and_transform("orders", return_state=True)
    assert state.is_failed()
    with pytest.raises(FileNotFoundError, match=r"stage folder for source 'orders' does not exist"):
        state.result()


def test_unknown_source_lists_known_ones(prefect_server: str, postload_home: PostloadHome) -> None:
    with pytest.raises(UnknownSourceError, match="known sources: customers, orders, events"):
        load_and_transform("evnts")


def test_selection_matching_nothing_warns_and_says_so(
    prefect_server: str, postload_home: PostloadHome, caplog: pytest.LogCaptureFixture
) -> None:
    config = postload_home.root / "postload.yaml"
    config.write_text(
        config.read_text().replace("{selector: events_pipeline}", '{select: "tag:no_such_tag"}')
    )
    write_demo_batch(postload_home.stage, "events", 1)
    result = load_and_transform("events")
    assert result["dbt_status"] == "nothing_selected"
    assert result["dbt_nodes"] == []
    assert "matched no nodes: nothing was built" in caplog.text
    status = sql(postload_home, "select status, message from ops.transform_runs")
    assert status == [("nothing_selected", "the selection matched no dbt nodes")]


def test_two_processes_writing_one_warehouse_queue_instead_of_crashing(
    prefect_server: str, postload_home: PostloadHome
) -> None:
    """DuckDB allows one writing process per file: the Prefect concurrency limit serialises runs."""
    for source in ("customers", "events"):
        write_demo_batch(postload_home.stage, source, 1)
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "POSTLOAD_RETRIES": "0"}
    code = "import sys; from flows.load_and_transform import load_and_transform; load_and_transform(sys.argv[1])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, source],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for source in ("customers", "events")
    ]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    windows = sql(
        postload_home, "select started_at, completed_at from ops.transform_runs order by started_at"
    )
    assert len(windows) == 2
    (_, first_end), (second_start, _) = windows
    assert first_end <= second_start, "the two runs' transforms overlapped"


def _load_completed(runs: list[Any]) -> bool:
    return any(t.name.startswith("load-") and t.state_name == "Completed" for t in runs)


def test_transient_warehouse_failure_is_retried_without_duplicate_loads(
    prefect_server: str, postload_home: PostloadHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warehouse is unavailable mid-load (after one file): the task retries, loads the rest."""
    from postload.warehouse import WarehouseUnavailableError
    from postload.warehouse._duckdb import DuckDBWarehouse

    monkeypatch.setenv("POSTLOAD_RETRIES", "2")
    stage = postload_home.stage / "orders"
    stage.mkdir(parents=True)
    for n in (1, 2):
        (stage / f"o{n}.jsonl").write_text(
            f'{{"order_id": {n}, "customer_id": 1, "amount": 1.5, "status": "placed", '
            '"ordered_at": "2024-01-01T00:00:00Z"}\n'
        )
    original = DuckDBWarehouse._load_file
    attempts: list[str] = []

    def unavailable_once_after_first_file(self, con, source, table, path, name, md5, run_id):  # type: ignore[no-untyped-def]
        attempts.append(name)
        if attempts == ["o1.jsonl", "o2.jsonl"]:
            raise WarehouseUnavailableError("connection dropped (simulated)")
        return original(self, con, source, table, path, name, md5, run_id)

    monkeypatch.setattr(DuckDBWarehouse, "_load_file", unavailable_once_after_first_file)
    state = load_and_transform("orders", return_state=True)
    assert state.is_completed(), state.message
    assert attempts == ["o1.jsonl", "o2.jsonl", "o2.jsonl"]
    assert sql(
        postload_home, "select file, count(*) from ops.load_log group by file order by file"
    ) == [
        ("o1.jsonl", 1),
        ("o2.jsonl", 1),
    ]
    assert sql(postload_home, "select count(*) from raw.orders") == [(2,)]
    runs = recorded_task_runs(state.state_details.flow_run_id, _load_completed)
    (load_run,) = [t for t in runs if t.name.startswith("load-")]
    assert load_run.run_count == 2


HOLD_THE_WAREHOUSE = (
    "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
    "sys.stdin.read()"
)


def test_warehouse_locked_by_another_process_is_waited_out_by_retries_with_backoff(
    prefect_server: str, postload_home: PostloadHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone else's process (a notebook, the duckdb CLI) holds the warehouse file: the load task
    fails on DuckDB's own lock, retries with backoff and, once the file is free, loads every file
    exactly once."""
    monkeypatch.setenv("POSTLOAD_RETRIES", "10")
    monkeypatch.setenv("POSTLOAD_RETRY_BACKOFF_SECONDS", "0.5")  # 0.5, 1, 2, 4 s ...
    monkeypatch.setenv("POSTLOAD_RETRY_JITTER_FACTOR", "0")
    land_and_load(postload_home, "orders", 1)  # the warehouse exists, with its schema
    write_demo_batch(postload_home.stage, "orders", 2)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_WAREHOUSE, str(postload_home.duckdb)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    result: dict[str, Any] = {}
    started = now("UTC")
    flow = threading.Thread(
        target=lambda: result.update(state=load_and_transform("orders", return_state=True))
    )
    flow.start()
    try:

        def load_awaiting_retry() -> bool:
            with get_client(sync_client=True) as client:
                tasks = client.read_task_runs(
                    task_run_filter=TaskRunFilter(
                        name=TaskRunFilterName(like_="load-"),
                        state=TaskRunFilterState(
                            name=TaskRunFilterStateName(any_=["AwaitingRetry"])
                        ),
                        start_time=TaskRunFilterStartTime(after_=started),
                    )
                )
            return bool(tasks)

        deadline = time.monotonic() + 120
        while not load_awaiting_retry():
            assert flow.is_alive() and time.monotonic() < deadline, "the load never retried"
            time.sleep(0.2)
    finally:
        holder.communicate("", timeout=30)  # the other process lets go of the file
        flow.join(timeout=300)

    state = result["state"]
    assert state.is_completed(), state.message
    assert sql(postload_home, "select file, count(*) from ops.load_log group by 1 order by 1") == [
        ("orders_0001.jsonl", 1),
        ("orders_0002.jsonl", 1),
    ]
    runs = recorded_task_runs(state.state_details.flow_run_id, _load_completed)
    (load_run,) = [t for t in runs if t.name.startswith("load-")]
    assert load_run.run_count >= 2
    assert load_run.state_name == "Completed"
