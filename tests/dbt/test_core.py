"""CoreDbtRunner through prefect-dbt: node tasks are done when a build returns, and cheap to start."""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from unittest.mock import patch
from uuid import UUID

import duckdb
import pytest
from dbt.adapters.duckdb import environments as duckdb_environments
from prefect import flow
from prefect._internal.uuid7 import uuid7
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import StateType
from prefect.context import SettingsContext, hydrated_context, serialize_context
from prefect.exceptions import UpstreamTaskError
from prefect.settings import get_current_settings
from prefect.tasks import Task
from prefect.utilities.engine import resolve_to_final_result
from prefect_dbt import PrefectDbtSettings
from prefect_dbt.core.runner import execute_dbt_node

from postload.config import NodeTaskMode, Selection, load_pipeline_config
from postload.dbt import DbtBuildResult, _core
from postload.dbt._core import NODE_TASK_THREAD_PREFIX, CoreDbtRunner
from postload.dbt._prefect_dbt import DbtSettings, FinishedNode, LiveSettingsContext, NodeTasks
from postload.local.demo_data import DEMO_SOURCES, write_demo_batch
from postload.warehouse._duckdb import DuckDBWarehouse
from tests.conftest import REPO, PostloadHome, recorded_task_runs

EVENTS = Selection(select="source:events+")


def node_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(NODE_TASK_THREAD_PREFIX)]


def loaded_warehouse(home: PostloadHome) -> DuckDBWarehouse:
    pipeline = load_pipeline_config(home.root / "postload.yaml")
    warehouse = DuckDBWarehouse(home.duckdb, home.stage, pipeline)
    warehouse.ensure_schema()
    for source in DEMO_SOURCES:
        write_demo_batch(home.stage, source, 1)
        warehouse.load(pipeline.source(source), None)
    return warehouse


def run_context() -> dict[str, Any]:
    """The context prefect-dbt serializes at the start of invoke(), as postload's runner has it."""
    live = SettingsContext.get()
    assert live is not None
    with LiveSettingsContext(profile=live.profile, settings=live.settings):
        return serialize_context()


def test_hydrating_the_node_task_context_reuses_the_live_settings(prefect_server: str) -> None:
    """Rebuilding Settings on each hydration cost ~0.15 s of CPU, twice per dbt node."""
    live = SettingsContext.get()
    assert live is not None
    context = run_context()
    started = time.perf_counter()
    for _ in range(20):
        with hydrated_context(context):
            assert get_current_settings() is live.settings
    assert time.perf_counter() - started < 2.0


def test_profiles_yml_is_resolved_only_when_it_has_prefect_templates(tmp_path: Path) -> None:
    settings = DbtSettings(project_dir=tmp_path, profiles_dir=tmp_path)
    profiles = tmp_path / "profiles.yml"
    profiles.write_text("p:\n  outputs:\n    d:\n      path: \"{{ env_var('X') }}\"\n")
    with settings.resolve_profiles_yml() as resolved:
        assert resolved == str(tmp_path)
    profiles.write_text('p:\n  outputs:\n    d:\n      schema: "{{ prefect.variables.s }}"\n')
    with patch.object(PrefectDbtSettings, "resolve_profiles_yml") as upstream:
        upstream.return_value.__enter__.return_value = "/tmp/resolved"
        with settings.resolve_profiles_yml() as resolved:
            assert resolved == "/tmp/resolved"


def test_a_node_dbt_never_finishes_does_not_keep_its_task_waiting(prefect_server: str) -> None:
    """dbt can skip a node after its NodeStart (upstream failed): no NodeFinished ever comes."""

    @flow
    def start_a_node_task_and_finish() -> tuple[list[str], Any]:
        tracker = NodeTasks(contextvars.copy_context())
        task = Task(fn=execute_dbt_node, cache_policy=NO_CACHE, task_run_name="model never_done")
        tracker.start_task("model.demo.never_done", task)
        tracker.run_task_in_thread(
            "model.demo.never_done",
            task,
            task_run_id=uuid7(),
            parameters={
                "task_state": tracker,
                "node_id": "model.demo.never_done",
                "asset_id": None,
            },
            context=run_context(),
        )
        still_running = tracker.finish(timeout_s=60)
        return still_running, tracker.get_task_result("model.demo.never_done")

    still_running, state = start_a_node_task_and_finish()
    assert still_running == []
    assert state is not None and state.is_completed()
    assert node_threads() == []


def test_node_tasks_record_their_upstream_node_and_a_task_run_each(prefect_server: str) -> None:
    """Node tasks run in the flow run's own context variables and get their upstream nodes as
    futures: each is still a task run of its own, with its upstream task run as wait_for."""

    def run_node(tracker: NodeTasks, node_id: str, upstream: list[str]) -> UUID:
        task = Task(fn=execute_dbt_node, cache_policy=NO_CACHE, task_run_name=f"model {node_id}")
        task_run_id = uuid7()
        tracker.start_task(node_id, task)
        tracker.set_node_dependencies(node_id, upstream)
        tracker.run_task_in_thread(
            node_id,
            task,
            task_run_id=task_run_id,
            parameters={"task_state": tracker, "node_id": node_id, "asset_id": None},
            context=run_context(),
        )
        tracker.set_node_status(node_id, {"node_info": {"node_status": "success"}}, "OK")
        return task_run_id

    @flow
    def two_nodes() -> tuple[UUID, UUID]:
        tracker = NodeTasks(contextvars.copy_context())
        upstream_id = run_node(tracker, "model.demo.a", [])
        tracker._threads[0].join(60)  # model.demo.a's state is set once its thread ends
        downstream_id = run_node(tracker, "model.demo.b", ["model.demo.a"])
        assert tracker.finish(timeout_s=60) == []
        return upstream_id, downstream_id

    state = two_nodes(return_state=True)
    upstream_id, downstream_id = state.result()
    recorded = recorded_task_runs(state.state_details.flow_run_id, lambda r: len(r) == 2)
    runs = {t.id: t for t in recorded}
    assert set(runs) == {upstream_id, downstream_id}
    assert all(run.state_type == StateType.COMPLETED for run in runs.values())
    assert [i.id for i in runs[downstream_id].task_inputs["wait_for"]] == [upstream_id]
    assert runs[upstream_id].task_inputs.get("wait_for", []) == []


def test_a_finished_node_reads_as_the_state_it_stands_for(prefect_server: str) -> None:
    """Upstream nodes reach wait_for as FinishedNode: a completed one gives its result, a failed
    one its exception, and the readiness check stops a dependent of a failed node."""

    ended: list[Any] = []  # returned states would decide the flow's own state

    def answer() -> int:
        return 42

    def broken() -> None:
        raise ValueError("model failed")

    @flow
    def ended_states() -> None:
        ended.extend(
            Task(fn=fn, cache_policy=NO_CACHE)(return_state=True) for fn in (answer, broken)
        )

    ended_states()
    ok, failed = ended
    finished_ok, finished_failed = FinishedNode(ok), FinishedNode(failed)

    assert finished_ok.result() == 42
    assert finished_ok.state.result(raise_on_failure=False, _sync=True) == 42
    assert resolve_to_final_result(finished_ok, {}) == 42
    assert finished_ok.task_run_id == ok.state_details.task_run_id

    assert str(finished_failed.result(raise_on_failure=False)) == "model failed"
    with pytest.raises(ValueError, match="model failed"):
        finished_failed.state.result(_sync=True)
    with pytest.raises(UpstreamTaskError, match=str(failed.state_details.task_run_id)):
        resolve_to_final_result(finished_failed, {})


def test_build_in_a_flow_returns_with_every_node_task_done(
    prefect_server: str, postload_home: PostloadHome
) -> None:
    warehouse = loaded_warehouse(postload_home)
    project = postload_home.root / "dbt_project"

    @flow
    def transform() -> tuple[str, list[str], list[str]]:
        runner = CoreDbtRunner(
            project, postload_home.duckdb, existing_relations=warehouse.relations
        )
        build = runner.build(EVENTS, cause="test")
        return build.status, [n.name for n in build.nodes], node_threads()

    state = transform(return_state=True)
    status, nodes, alive_after_build = state.result()
    assert status == "success"
    assert "stg_events" in nodes
    assert alive_after_build == [], "node task threads outlived the dbt invocation"

    # Each node is a Prefect task run
    def stg_events(runs: list[Any]) -> bool:
        return any(t.name.startswith("model stg_events") for t in runs)

    runs = recorded_task_runs(state.state_details.flow_run_id, stg_events)
    assert stg_events(runs), sorted(t.name for t in runs)


# The flow ends right after the build, then the interpreter exits: node task threads still
# running at that point aborted the process (SIGABRT, "FATAL: exception not rethrown") after its
# flow had completed. With prefect-dbt's own tracker and log level warn it did so every time.
_FLOW_THEN_EXIT = """
import sys, threading
from pathlib import Path
import pytest
from prefect import flow
from postload.config import Selection, load_pipeline_config
from postload.dbt._core import NODE_TASK_THREAD_PREFIX, CoreDbtRunner
from postload.warehouse._duckdb import DuckDBWarehouse

root = Path(sys.argv[1])

@flow
def transform():
    warehouse = DuckDBWarehouse(
        root / ".postload" / "warehouse.duckdb",
        root / ".postload" / "stage",
        load_pipeline_config(root / "postload.yaml"),
    )
    runner = CoreDbtRunner(
        root / "dbt_project",
        root / ".postload" / "warehouse.duckdb",
        target_path=root / sys.argv[2],
        existing_relations=warehouse.relations,
    )
    from prefect.runtime import flow_run

    build = runner.build(Selection(select="source:events+"), cause="test")
    print("flow run:", flow_run.id, "nodes:", len(build.nodes))
    return build.status

print("status:", transform())
# prefect-dbt's own tracker names its threads "Thread-N (run_task)".
print("node threads at exit:", [
    t.name for t in threading.enumerate()
    if t.name.startswith(NODE_TASK_THREAD_PREFIX) or t.name.endswith("(run_task)")
])
"""


def test_process_exits_cleanly_right_after_a_flow_that_built(
    prefect_server: str, postload_home: PostloadHome
) -> None:
    """...and takes none of its node task runs' last events with it: the process group is killed
    the moment the process exits, as a container's end kills every process in it."""
    loaded_warehouse(postload_home)
    proc = subprocess.Popen(
        [sys.executable, "-c", _FLOW_THEN_EXIT, str(postload_home.root), "target"],
        cwd=REPO,
        env={**os.environ, "PREFECT_API_URL": prefect_server},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    stdout, stderr = proc.communicate(timeout=400)
    with contextlib.suppress(ProcessLookupError):  # nothing of the group is left: as it should be
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert "FATAL" not in stderr, stderr[-3000:]
    # The node task process leaves by os._exit: anything it registered must be let go of first.
    assert "leaked semaphore" not in stderr, stderr[-3000:]
    assert "status: success" in stdout, stdout + stderr[-3000:]
    assert "node threads at exit: []" in stdout, stdout
    flow_run_id, nodes = re.search(r"flow run: (\S+) nodes: (\d+)", stdout).groups()  # type: ignore[union-attr]

    def states(runs: list[Any]) -> list[str]:
        return sorted(str(r.state_name) for r in runs)

    runs = recorded_task_runs(flow_run_id, lambda r: states(r) == ["Completed"] * int(nodes))
    assert states(runs) == ["Completed"] * int(nodes)


def build_in_a_flow(
    home: PostloadHome, selection: Selection, mode: NodeTaskMode = NodeTaskMode.PROCESS
) -> tuple[DbtBuildResult, UUID]:
    """A build inside a flow run, on the loaded demo warehouse, as open_dbt_runner sets it up."""
    warehouse = loaded_warehouse(home)

    @flow
    def transform() -> DbtBuildResult:
        runner = CoreDbtRunner(
            home.root / "dbt_project",
            home.duckdb,
            existing_relations=warehouse.relations,
            node_task_mode=mode,
            warehouse_is_duckdb=True,
        )
        return runner.build(selection, cause="test")

    state = transform(return_state=True)
    return state.result(), state.state_details.flow_run_id


def test_dbt_shares_the_duckdb_instance_the_build_opened(
    prefect_server: str, postload_home: PostloadHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One DuckDB instance for the missing-parents check and dbt: a database-wide setting made
    on the build's own connection is what dbt-duckdb's connection sees."""
    seen_by_dbt: list[str] = []
    real_connect = duckdb.connect

    def build_connect(*args: Any, **kwargs: Any) -> duckdb.DuckDBPyConnection:
        con = real_connect(*args, **kwargs)
        con.execute("set global memory_limit = '777MB'")
        return con

    def dbt_connect(*args: Any, **kwargs: Any) -> duckdb.DuckDBPyConnection:
        con = real_connect(*args, **kwargs)
        seen_by_dbt.append(con.execute("select current_setting('memory_limit')").fetchone()[0])
        return con

    # Both names are the duckdb module: give each caller its own spy.
    monkeypatch.setattr(_core, "duckdb", _ModuleWith(duckdb, connect=build_connect))
    monkeypatch.setattr(duckdb_environments, "duckdb", _ModuleWith(duckdb, connect=dbt_connect))
    assert build_in_a_flow(postload_home, EVENTS)[0].status == "success"
    assert seen_by_dbt and all(limit.startswith("741") for limit in seen_by_dbt), seen_by_dbt


def test_a_profile_dbt_cannot_share_an_instance_with_still_builds(
    prefect_server: str, postload_home: PostloadHome
) -> None:
    """DuckDB refuses a second connection to an open file with another configuration: with
    config_options in the profile, the build lets go of its own connection before dbt connects."""
    profiles = postload_home.root / "dbt_project" / "profiles.yml"
    profiles.write_text(
        profiles.read_text().replace(
            "      threads: 4\n",
            "      threads: 4\n      config_options:\n        threads: 2\n",
            1,  # the duckdb target
        )
    )
    assert "config_options" in profiles.read_text()
    assert build_in_a_flow(postload_home, EVENTS)[0].status == "success"


class _ModuleWith:
    """A module with some attributes replaced, for one caller's view of it."""

    def __init__(self, module: Any, **replaced: Any) -> None:
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)
