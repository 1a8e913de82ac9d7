"""dbt node task runs recorded from a forked child process (postload/dbt/_node_process.py)."""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

import pytest
from dbt.task.runnable import GraphRunnableTask
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import TaskRun
from prefect_dbt import PrefectDbtRunner

from postload.config import NodeTaskMode, Selection
from postload.dbt import _node_process
from postload.dbt._node_process import NodeTaskProcess
from tests.conftest import PostloadHome, recorded_task_runs
from tests.dbt.test_core import EVENTS, build_in_a_flow


def task_runs_of(flow_run_id: UUID, expected: int) -> dict[str, TaskRun]:
    """The flow run's task runs by name, once the server has recorded `expected` final ones."""

    def done(runs: list[TaskRun]) -> bool:
        return sum(1 for r in runs if r.state is not None and r.state.is_final()) >= expected

    return {t.name: t for t in recorded_task_runs(flow_run_id, done)}


@pytest.mark.parametrize("mode", [NodeTaskMode.PROCESS, NodeTaskMode.THREAD])
def test_every_dbt_node_is_a_task_run_with_its_upstream_nodes(
    prefect_server: str, postload_home: PostloadHome, mode: NodeTaskMode
) -> None:
    build, flow_run_id = build_in_a_flow(postload_home, EVENTS, mode)
    assert build.status == "success"
    expected = {f"{n.resource_type} {n.name}" for n in build.nodes}
    runs = task_runs_of(flow_run_id, len(expected))
    assert set(runs) == expected
    assert {r.state_name for r in runs.values()} == {"Completed"}
    # fct_daily_events reads stg_events: its task run waited for stg_events' task run
    upstream = [i.id for i in runs["model fct_daily_events"].task_inputs["wait_for"]]
    assert runs["model stg_events"].id in upstream


def test_a_failing_model_is_a_failed_task_run_and_its_children_never_start(
    prefect_server: str, postload_home: PostloadHome
) -> None:
    models = postload_home.root / "dbt_project" / "models"
    (models / "marts" / "broken_mart.sql").write_text(
        "select no_such_column from {{ ref('stg_events') }}\n"
    )
    (models / "marts" / "after_broken.sql").write_text("select * from {{ ref('broken_mart') }}\n")
    build, flow_run_id = build_in_a_flow(
        postload_home, Selection(select="stg_events+"), NodeTaskMode.PROCESS
    )
    statuses = {n.name: n.status for n in build.nodes}
    assert statuses["broken_mart"] == "error"
    assert statuses["after_broken"] == "skipped"
    runs = task_runs_of(flow_run_id, len([s for s in statuses.values() if s != "skipped"]))
    assert runs["model broken_mart"].state_name == "Failed"
    assert runs["model stg_events"].state_name == "Completed"
    assert not any(name.startswith("model after_broken") for name in runs)


def killed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    start = NodeTaskProcess.start

    def start_then_kill(self: NodeTaskProcess) -> None:
        start(self)
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)

    monkeypatch.setattr(NodeTaskProcess, "start", start_then_kill)


def fails_before_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("the child failed before serving")

    # Replaced in the child only: it is called there, after the fork. Returning into dbt's
    # stack, the child would go on as a second copy of the flow run and never answer: the dbt
    # process would wait for it, then kill it (-9).
    monkeypatch.setattr(_node_process, "_serve_node_tasks", broken)


def dies_with_events_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    def dies_once_sent_an_event(connection: socket.socket, *args: Any) -> None:
        select.select([connection], [], [], 60)
        os._exit(3)  # with the event unread: the dbt process's end of the connection is reset

    monkeypatch.setattr(_node_process, "_serve_node_tasks", dies_once_sent_an_event)


@pytest.mark.parametrize(
    ("end_early", "exit_code"),
    [(killed_at_once, -9), (fails_before_serving, 1), (dies_with_events_unread, 3)],
    ids=["killed", "fails-before-serving", "dies-with-events-unread"],
)
def test_the_build_goes_on_when_the_recording_process_ends_early(
    prefect_server: str,
    postload_home: PostloadHome,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    end_early: Callable[[pytest.MonkeyPatch], None],
    exit_code: int,
) -> None:
    end_early(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="postload.dbt._node_process"):
        build, _ = build_in_a_flow(postload_home, EVENTS, NodeTaskMode.PROCESS)
    assert build.status == "success"
    assert "stg_events" in [n.name for n in build.nodes]
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"ended with exit code {exit_code}" in m for m in messages), messages


def test_a_refused_fork_records_the_nodes_in_threads_instead(
    prefect_server: str,
    postload_home: PostloadHome,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_more_processes() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_more_processes)
    with caplog.at_level(logging.WARNING, logger="postload.dbt._node_process"):
        build, flow_run_id = build_in_a_flow(postload_home, EVENTS, NodeTaskMode.PROCESS)
    assert build.status == "success"
    assert any("cannot fork" in r.getMessage() for r in caplog.records)
    expected = {f"{n.resource_type} {n.name}" for n in build.nodes}
    assert set(task_runs_of(flow_run_id, len(expected))) == expected


def test_the_child_is_forked_once_dbt_runs_nodes_and_gets_what_dbt_said_before(
    prefect_server: str,
    postload_home: PostloadHome,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forked after dbt's parse (which would otherwise pay the copy-on-write), with the warning
    dbt gave while parsing still reaching the flow run's logs, and every node still recorded."""
    project_file = postload_home.root / "dbt_project" / "dbt_project.yml"
    project_file.write_text(
        project_file.read_text() + "    no_such_folder:\n      +materialized: view\n"
    )
    running_nodes: list[bool] = []
    forks_while: list[bool] = []
    execute_with_hooks = GraphRunnableTask.execute_with_hooks
    real_fork = os.fork

    def running(self: GraphRunnableTask, *args: Any, **kwargs: Any) -> Any:
        running_nodes.append(True)
        return execute_with_hooks(self, *args, **kwargs)

    def fork() -> int:
        forks_while.append(bool(running_nodes))
        return real_fork()

    monkeypatch.setattr(GraphRunnableTask, "execute_with_hooks", running)
    monkeypatch.setattr(os, "fork", fork)
    build, flow_run_id = build_in_a_flow(postload_home, EVENTS, NodeTaskMode.PROCESS)
    assert build.status == "success"
    assert forks_while == [True]
    expected = {f"{n.resource_type} {n.name}" for n in build.nodes}
    assert set(task_runs_of(flow_run_id, len(expected))) == expected
    assert any("no_such_folder" in m for m in flow_run_logs(flow_run_id, "no_such_folder"))


def test_a_selection_that_matches_nothing_forks_no_process(
    prefect_server: str, postload_home: PostloadHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    forks: list[int] = []
    real_fork = os.fork

    def fork() -> int:
        forks.append(1)
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)
    build, _ = build_in_a_flow(
        postload_home, Selection(select="no_such_model"), NodeTaskMode.PROCESS
    )
    assert build.nodes == []
    assert build.message == "the selection matched no dbt nodes"
    assert forks == []


def flow_run_logs(flow_run_id: UUID, waiting_for: str) -> list[str]:
    """The flow run's log messages, once one holds `waiting_for` (logs are shipped in batches)."""
    logs = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            messages = [log.message for log in client.read_logs(log_filter=logs)]
            if any(waiting_for in m for m in messages) or time.monotonic() > deadline:
                return messages
            time.sleep(0.5)


def test_prefect_dbt_uses_the_manifest_dbt_is_running_instead_of_reading_it_again(
    prefect_server: str, postload_home: PostloadHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In thread mode, where the test can watch it: prefect-dbt never loads manifest.json."""
    loads: list[int] = []
    load = PrefectDbtRunner._set_manifest_from_project_dir

    def counted(self: PrefectDbtRunner) -> None:
        loads.append(1)
        load(self)

    monkeypatch.setattr(PrefectDbtRunner, "_set_manifest_from_project_dir", counted)
    build, flow_run_id = build_in_a_flow(postload_home, EVENTS, NodeTaskMode.THREAD)
    assert build.status == "success"
    expected = {f"{n.resource_type} {n.name}" for n in build.nodes}
    assert set(task_runs_of(flow_run_id, len(expected))) == expected
    assert loads == []
