"""dbt Core through prefect-dbt's ``PrefectDbtRunner``.

Inside a flow run every dbt node becomes a Prefect task with its asset lineage; outside one (the
benchmarks, ``postload plan``) the same runner just runs dbt.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import click
import duckdb
import orjson
from dbt.artifacts.schemas.results import RunStatus, TestStatus
from dbt.cli.main import dbtRunner
from dbt.contracts.graph.manifest import Manifest
from dbt.contracts.results import RunExecutionResult
from dbt_common.events.base_types import EventLevel, EventMsg
from prefect import get_client
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import State
from prefect.context import FlowRunContext, SettingsContext, TaskRunContext
from prefect.futures import PrefectFuture, PrefectTaskRunFuture
from prefect.results import ResultRecord
from prefect.settings import get_current_settings
from prefect.task_engine import run_task_sync
from prefect.tasks import Task
from prefect.utilities.templating import (
    PLACEHOLDER_CAPTURE_REGEX,
    PlaceholderType,
    determine_placeholder_type,
)
from prefect_dbt import PrefectDbtRunner, PrefectDbtSettings
from prefect_dbt.core._tracker import NodeTaskTracker

from postload.config import NodeTaskMode, Selection
from postload.dbt import DbtBuildResult, NodeResult
from postload.dbt._node_process import RUN_BEGINS, NodeTaskProcess

# The checked-in profiles.yml reads the warehouse path from this variable — the same one Settings
# reads — so users can run plain `dbt` against the same file by exporting it.
DUCKDB_PATH_ENV = "POSTLOAD_DUCKDB_PATH"

# How long invoke() waits for the per-node task runs to record their final state once dbt is done.
# They only have their end state left to report by then; the bound is for a Prefect API that hangs.
NODE_TASKS_TIMEOUT_S = 120.0
NODE_TASK_THREAD_PREFIX = "prefect-dbt-node"

# dbt events prefect-dbt forwards to the flow run's logs: warnings and errors. Its default,
# Prefect's own level (INFO), also ships dbt's START/OK line of every node and the run's summary
# lines: on the demo build that cost ~0.25 s of a ~0.9 s bare build (processing each event, the
# log API and the server). Node outcomes stay visible as task states, failures as ERROR events.
# dbt's own log file keeps INFO, as with prefect-dbt's default.
DBT_EVENTS_TO_PREFECT_LOGS = EventLevel.WARN
DBT_LOG_FILE_LEVEL = "info"

logger = logging.getLogger(__name__)


@contextmanager
def _profile_env(duckdb_path: Path) -> Iterator[None]:
    """Expose the warehouse path to profiles.yml for one dbt invocation only, then let go of it.

    Restored afterwards so it never leaks into later runs or child processes of a long-lived
    worker (where it would override another run's settings).
    """
    previous = os.environ.get(DUCKDB_PATH_ENV)
    os.environ[DUCKDB_PATH_ENV] = str(duckdb_path)
    try:
        yield
    finally:
        release_duckdb_file()
        if previous is None:
            os.environ.pop(DUCKDB_PATH_ENV, None)
        else:
            os.environ[DUCKDB_PATH_ENV] = previous


def release_duckdb_file() -> None:
    """Close dbt-duckdb's process-wide DuckDB handle so the file's write lock is released.

    dbt-duckdb caches one DuckDB instance per process until exit (an atexit hook in
    dbt/adapters/duckdb/connections.py), so a long-lived worker would keep the warehouse locked
    against every other process after its first dbt run. Our writer slot is released when the
    flow's warehouse work ends; the file must be released with it.
    """
    try:
        from dbt.adapters.duckdb.connections import DuckDBConnectionManager
    except ImportError:  # another adapter: nothing cached here
        return
    with DuckDBConnectionManager._LOCK:
        env, DuckDBConnectionManager._ENV = DuckDBConnectionManager._ENV, None
    if env is not None:
        env.close()


class _EndedNodeState(State):
    """A node task's end state whose in-memory result is read in the calling thread.

    Prefect's readiness check asks every upstream state of a task run for its result and throws
    it away (``resolve_to_final_result`` for ``wait_for``). ``State.result`` runs a coroutine
    through Prefect's event-loop thread and waits for it: a cross-thread round trip per dbt
    edge, ~0.4 ms of CPU across two threads (measured), to read ``ResultRecord.result`` (always None
    for prefect-dbt's node task). This reads it as ``prefect.states._get_state_result`` does for
    a completed state with an in-memory record; any other state goes the usual way.
    """

    def result(
        self, raise_on_failure: bool = True, retry_result_failure: bool = True, **kwargs: Any
    ) -> Any:
        if self.is_completed() and isinstance(self.data, ResultRecord):
            return self.data.result
        return super().result(  # type: ignore[call-overload]
            raise_on_failure=raise_on_failure, retry_result_failure=retry_result_failure, **kwargs
        )


class _FinishedNode(PrefectTaskRunFuture[Any]):
    """An upstream node's ended task run, handed to its dependents' ``wait_for`` as a future.

    Prefect walks every ``wait_for`` item with ``visit_collection`` two or three times per task
    run (task inputs, then the readiness check). A ``State`` is a pydantic model, so each walk
    descends through its details and result record (~40 objects); a future is a leaf. The
    dependent gets the same ``wait_for`` input (the upstream task run id) and the same readiness
    check on the state, whose result is read without a trip through the event loop
    (``_EndedNodeState``).
    """

    def __init__(self, state: State) -> None:
        super().__init__(task_run_id=state.state_details.task_run_id)
        self._final_state = _EndedNodeState.model_construct(
            _fields_set=state.model_fields_set, **dict(state)
        )

    def wait(self, timeout: float | None = None) -> None:
        return None

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        return self._final_state.result(raise_on_failure=raise_on_failure, _sync=True)  # type: ignore[call-overload]

    def add_done_callback(self, fn: Callable[[PrefectFuture[Any]], None]) -> None:
        fn(self)


class _NodeTasks(NodeTaskTracker):
    """prefect-dbt's per-node task bookkeeping, with the task threads kept, joined and cheap.

    prefect-dbt 0.7.25 starts one daemon thread per dbt node and never joins it, so its task runs
    may still be reporting their end state when ``invoke()`` returns, when the flow ends, and when
    the interpreter exits; a daemon thread caught in finalization aborted processes with
    "FATAL: exception not rethrown" after their flow had completed. ``run_task_in_thread`` keeps
    the thread handle, so ``finish`` can wait for them, and runs the task as Prefect's own
    ``ThreadPoolTaskRunner`` runs a task in a thread: in a copy of the invoking thread's context
    variables, which hold the flow run's context (its API client, settings, tags) as they are.
    Upstream (``prefect_dbt/core/_tracker.py``) instead hydrates prefect-dbt's serialized context
    twice per node, validating the flow run, flow and settings models again each time and
    building API clients (~30 ms of CPU each: they load the CA bundle). Upstream nodes reach
    ``wait_for`` as futures (see ``_FinishedNode``).
    """

    def __init__(self, run_context: contextvars.Context) -> None:
        super().__init__()
        self.run_context = run_context
        self._threads: list[threading.Thread] = []

    def run_task_in_thread(
        self,
        node_id: str,
        task: Task[Any, Any],
        task_run_id: UUID,
        parameters: dict[str, Any],
        context: dict[str, Any],
    ) -> None:
        def run_task() -> None:
            upstream = [
                _FinishedNode(state)
                for dep_id in self.get_node_dependencies(node_id)
                if (state := self.get_task_result(dep_id))
            ]
            state = run_task_sync(
                task,
                task_run_id=task_run_id,
                parameters=parameters,
                wait_for=upstream,
                return_type="state",
            )
            self.set_task_result(node_id, state or None)

        # Still a daemon: a wedged Prefect API must not keep the process alive forever.
        thread = threading.Thread(
            target=self.run_context.copy().run,
            args=(run_task,),
            name=f"{NODE_TASK_THREAD_PREFIX} {node_id}",
            daemon=True,
        )
        self._threads.append(thread)
        thread.start()

    def finish(self, timeout_s: float) -> list[str]:
        """Let every node task end and wait for its thread; the nodes still running after timeout_s.

        Called once dbt returned and prefect-dbt drained its callback queue, so every NodeFinished
        has been handed over. A node dbt started but never finished (it can skip one after its
        NodeStart when an upstream node fails, prefect-dbt issue
        https://github.com/PrefectHQ/prefect/issues/20199) would leave its task waiting forever.
        """
        for node_id in list(self._node_events):
            if not self.is_node_complete(node_id):
                self.set_node_status(
                    node_id,
                    {"node_info": {"node_status": "skipped"}},
                    "dbt reported this node starting but not finishing",
                )
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]


class _LiveSettingsContext(SettingsContext):
    """The current Prefect settings, serialized as the live objects rather than as a dict.

    prefect-dbt serializes the run context at the start of every ``invoke()`` (dumping all of
    Prefect's settings: ~40 ms) and hydrates it again for every node task (twice: in its thread
    and in ``run_task_sync``) and for every dbt log line without a node. Hydrating a dict rebuilds
    ``Settings`` through pydantic-settings for ~50 nested models (environment, .env,
    pyproject.toml): ~0.15 s of CPU each time, ~0.3 s per dbt node, which on 2 cores starved dbt
    itself. An instance passes pydantic validation as is, so every thread shares the settings
    the run already has: the same values, not re-read. Upstream knows the cost of rebuilding
    them: https://github.com/PrefectHQ/prefect/pull/20853 (caches a process-pool worker's
    SettingsContext; not in prefect 3.9.1).
    """

    def serialize(self, include_secrets: bool = True) -> dict[str, Any]:
        return {"profile": self.profile, "settings": self.settings}


class _DbtSettings(PrefectDbtSettings):
    @contextmanager
    def resolve_profiles_yml(self) -> Iterator[str]:
        """profiles.yml as is when it has no Prefect block or variable to resolve.

        prefect-dbt resolves ``{{ prefect.blocks... }}`` / ``{{ prefect.variables... }}``
        placeholders and ``$ref`` block references into a temporary copy on every invocation,
        through two API clients of its own (~70 ms), also when there is nothing to resolve; any
        other text (dbt's own ``env_var``) it leaves alone.
        """
        text = (self.profiles_dir / "profiles.yml").read_text(encoding="utf-8")
        prefect_types = (PlaceholderType.BLOCK_DOCUMENT, PlaceholderType.VARIABLE)
        if "$ref" in text or any(
            determine_placeholder_type(name) in prefect_types
            for _, name in PLACEHOLDER_CAPTURE_REGEX.findall(text)
        ):
            with super().resolve_profiles_yml() as resolved:
                yield resolved
        else:
            yield str(self.profiles_dir)


@functools.cache
def _unused_client(api_url: str | None) -> PrefectClient:
    """prefect-dbt 0.7.25 builds a PrefectClient per runner and never uses it; building one loads
    the CA bundle (~35 ms), so runners get this one, built once per API URL and never opened."""
    return get_client()


class _NodeEvents:
    """prefect-dbt's own handling of dbt's events, its node task runs in threads of this process.

    Thread mode runs it in the dbt process; process mode runs it in the forked child
    (``NodeTaskProcess``), which the dbt process forwards the events to.

    ``in_order``: handle each event before taking the next, in the calling thread. In the dbt
    process prefect-dbt queues them for a thread of its own, which takes every queued NodeStart
    before any NodeFinished. That is harmless while events come one at a time as dbt fires them,
    but the child receives them in bursts: a failed model's NodeFinished and its skipped child's
    NodeStart (dbt fires one for a node it skips) would be taken in the wrong order, and the
    skipped child would get a task run.
    """

    def __init__(
        self,
        runner: _NodeTaskDbtRunner,
        log_level: EventLevel,
        context: dict[str, Any],
        add_test_edges: bool,
        in_order: bool,
    ) -> None:
        self._runner = runner
        self._tracker = _NodeTasks(contextvars.copy_context())
        # Read by the callback thread prefect-dbt starts right here.
        runner._callback_context = self._tracker.run_context
        # prefect-dbt's own callback (not the runner's override, which builds this handler).
        self._callback = PrefectDbtRunner._create_unified_callback(
            runner,
            self._tracker,
            log_level,
            context,
            add_test_edges=add_test_edges,
            create_tasks_for_nodes=True,
        )
        if in_order:
            # Without its queue prefect-dbt handles each event in the thread dbt's callback is
            # called in (_queue_callback's fallback).
            runner._stop_callback_processor()

    def __call__(self, event: EventMsg) -> None:
        self._callback(event)

    def finish(self, timeout_s: float) -> list[str]:
        runner = self._runner
        # In the child: what prefect-dbt's invoke() does in the dbt process once dbt returned.
        if runner._event_queue is not None:
            runner._event_queue.join()
            runner._stop_callback_processor()
        still_running = self._tracker.finish(timeout_s)
        # A Manifest prefect-dbt loaded itself holds a multiprocessing lock, a named semaphore
        # the resource tracker watches until the lock is freed; the child leaves by os._exit,
        # which skips that.
        runner._manifest = None
        return still_running


class _NodeTaskDbtRunner(PrefectDbtRunner):
    """``PrefectDbtRunner`` whose node tasks are cheap to start and done when ``invoke()`` returns.

    Each dbt node still becomes a Prefect task with its asset lineage, from the same run context;
    only where prefect-dbt's callback and the task runs happen, what (de)serializing that context
    costs and when the task threads are waited for differ (see ``NodeTaskProcess``,
    ``_LiveSettingsContext`` and ``_NodeTasks``).
    """

    _node_tasks: _NodeEvents | NodeTaskProcess | None = None
    _callback_context: contextvars.Context | None = None
    node_task_mode: NodeTaskMode = NodeTaskMode.THREAD
    # Called in the thread invoking dbt once dbt has read its project and profile, before it
    # connects to the warehouse or runs a node (ConcurrencyLine).
    on_run_begins: Callable[[], None] | None = None

    def _create_unified_callback(
        self,
        task_state: NodeTaskTracker,
        log_level: EventLevel,
        context: dict[str, Any],
        add_test_edges: bool = False,
        create_tasks_for_nodes: bool = True,
    ) -> Callable[[EventMsg], None]:
        # Called by invoke() in the flow (or task) run's thread, before dbt starts; its tracker
        # exists only to be handed over here, ours replaces it.
        if not create_tasks_for_nodes:
            self._node_tasks = None
            return super()._create_unified_callback(
                task_state,
                log_level,
                context,
                add_test_edges=add_test_edges,
                create_tasks_for_nodes=False,
            )
        handle_here = functools.partial(_NodeEvents, self, log_level, context, add_test_edges)
        if self.node_task_mode is NodeTaskMode.PROCESS:
            self._node_tasks = NodeTaskProcess(handle_here, log_level)
        else:
            self._node_tasks = handle_here(False)
        handle = self._node_tasks

        def callback(event: EventMsg) -> None:
            if event.info.name == RUN_BEGINS:
                self._adopt_dbt_manifest()
                if self.on_run_begins is not None:
                    self.on_run_begins()
            handle(event)

        return callback

    def _adopt_dbt_manifest(self) -> None:
        """Give prefect-dbt the manifest dbt is running, instead of it reading manifest.json.

        prefect-dbt loads manifest.json at the first node (``_set_manifest_from_project_dir``):
        a full ``Manifest.from_dict``, macros included, whose deserializers mashumaro compiles on
        first use in each process: ~60 ms of CPU in each node task process, ~10 ms afterwards.
        dbt has the same manifest in memory by the time it begins running nodes, in the click
        context of the command running in this thread (``requires.manifest`` puts it there, and
        ``dbtRunner(manifest=...)`` reads it from there). Called then, before the node task
        process is forked, so the child has it too. Without one (``dbt retry`` loads its own),
        prefect-dbt reads the file as before.
        """
        if isinstance(manifest := _running_dbt_command("manifest"), Manifest):
            self._manifest = manifest

    def _callback_worker(self) -> None:
        # The callback thread hydrates the run context for every dbt log line without a node:
        # in the run's context variables that reuses the flow run's API client (see _NodeTasks).
        if (run_context := self._callback_context) is None:
            return super()._callback_worker()
        return run_context.copy().run(super()._callback_worker)

    def invoke(self, args: list[str], **kwargs: Any) -> Any:
        try:
            if (live := SettingsContext.get()) is None:
                return super().invoke(args, **kwargs)
            with _LiveSettingsContext(profile=live.profile, settings=live.settings):
                return super().invoke(args, **kwargs)
        finally:
            self._callback_context = None
            if (node_tasks := self._node_tasks) is not None:
                self._node_tasks = None
                if still_running := node_tasks.finish(NODE_TASKS_TIMEOUT_S):
                    logger.warning(
                        "%d dbt node task(s) still reporting to Prefect after %.0f s: %s",
                        len(still_running),
                        NODE_TASKS_TIMEOUT_S,
                        ", ".join(still_running[:5]),
                    )


class DbtInvocationError(RuntimeError):
    """dbt could not run at all (project fails to parse, unknown selector, bad profile)."""


class CoreDbtRunner:
    kind = "core"

    def __init__(
        self,
        project_dir: Path,
        duckdb_path: Path,
        *,
        target_path: Path | None = None,
        existing_relations: Callable[[], set[tuple[str, str]]] | None = None,
        node_retries: int = 0,
        node_retry_delay_seconds: float = 0.0,
        node_task_mode: NodeTaskMode | None = None,
        warehouse_is_duckdb: bool = False,
    ) -> None:
        self.project_dir = project_dir
        self.duckdb_path = duckdb_path
        self.warehouse_is_duckdb = warehouse_is_duckdb
        self._kept_open: duckdb.DuckDBPyConnection | None = None
        self.target_path = target_path or project_dir / "target"
        self.existing_relations = existing_relations
        self.node_retries = node_retries
        self.node_retry_delay_seconds = node_retry_delay_seconds
        self.node_task_mode = node_task_mode or NodeTaskMode.default()

    def _runner(self) -> PrefectDbtRunner:
        settings = _DbtSettings(
            project_dir=self.project_dir,
            profiles_dir=self.project_dir,
            target_path=self.target_path,
            log_level=DBT_EVENTS_TO_PREFECT_LOGS,
        )
        runner = _NodeTaskDbtRunner(
            settings=settings,
            raise_on_failure=False,
            client=_unused_client(get_current_settings().api.url),
        )
        runner.node_task_mode = self.node_task_mode
        runner.on_run_begins = self._let_go_of_duckdb_unless_dbt_shares_it
        return runner

    @contextmanager
    def _one_duckdb_instance(self) -> Iterator[None]:
        """One DuckDB instance for the build's catalog check and dbt's run, when dbt can share it.

        A ``duckdb.connect()`` that finds no open instance of the file in the process starts one
        (~11 ms, whatever the file or config), and the last connection's close checkpoints it:
        the missing-parents check and dbt-duckdb each did, one after the other. Held open here,
        both connect to this one (bench/README.md, session 9). DuckDB shares an instance only
        between connections of the same configuration, and dbt-duckdb's comes from the profile,
        which dbt has read by ConcurrencyLine: then ``_let_go_of_duckdb_unless_dbt_shares_it``
        closes this one unless dbt's connection will be like it. That check runs from
        prefect-dbt's event callback, which exists inside a flow or task run only: elsewhere
        nothing is held.
        """
        if not (self.warehouse_is_duckdb and (FlowRunContext.get() or TaskRunContext.get())):
            yield
            return
        try:
            self._kept_open = duckdb.connect(str(self.duckdb_path))
        except duckdb.Error:  # another process writes it: the usual paths wait and report
            yield
            return
        try:
            yield
        finally:
            self._let_go_of_duckdb()

    def _let_go_of_duckdb(self) -> None:
        kept, self._kept_open = self._kept_open, None
        if kept is not None:
            kept.close()

    def _let_go_of_duckdb_unless_dbt_shares_it(self) -> None:
        config = _running_dbt_command("runtime_config")
        if not _dbt_shares_duckdb_instance(getattr(config, "credentials", None), self.duckdb_path):
            self._let_go_of_duckdb()

    def invoke(self, args: list[str]) -> Any:
        """Run a dbt command through PrefectDbtRunner (nodes become Prefect tasks in a flow run)."""
        try:
            with _profile_env(self.duckdb_path):
                return self._runner().invoke(args, log_level_file=DBT_LOG_FILE_LEVEL)
        except ValueError as exc:  # prefect-dbt wraps dbt's own exception this way
            raise DbtInvocationError(str(exc)) from exc

    def invoke_metadata(self, args: list[str]) -> Any:
        """Run a dbt command that builds nothing (parse, ls) with plain dbt: no Prefect API needed."""
        with _profile_env(self.duckdb_path):
            res = dbtRunner().invoke(
                [
                    *args,
                    "--project-dir",
                    str(self.project_dir),
                    "--profiles-dir",
                    str(self.project_dir),
                    "--target-path",
                    str(self.target_path),
                    "--log-level",
                    "none",
                ]
            )
        if not res.success:
            raise DbtInvocationError(f"dbt {' '.join(args)} failed: {res.exception or res.result}")
        return res

    def build(
        self, selection: Selection, *, cause: str, job_id: int | None = None
    ) -> DbtBuildResult:
        with self._one_duckdb_instance():
            return self._build(selection)

    def _build(self, selection: Selection) -> DbtBuildResult:
        nodes: list[NodeResult] = []
        missing = self.missing_parents(selection)
        if missing:
            # A selective build relies on parents outside the selection already existing (the
            # mart joining two sources). On a young warehouse they may not: build just those
            # first instead of failing the models that need them. `run`, not `build`: their tests
            # may need yet other parents, and belong to their own source's selection anyway.
            res = self.invoke(["run", "--select", *missing])
            nodes += [node_result(r) for r in res.result.results]
        res = self.invoke(["build", *selection.cli_args()])
        execution: RunExecutionResult = res.result
        built = [node_result(r) for r in execution.results]
        invocation_id = (execution.args or {}).get("invocation_id") if execution.args else None
        retried: list[list[str]] = []
        for attempt in range(1, self.node_retries + 1):
            if not _retryable(built):
                break
            # `dbt retry` re-runs exactly the nodes that errored or were skipped because of them,
            # from this target's run_results.json; a failed *data test* is a finding about the
            # data, so a build whose only failures are tests is never retried.
            if self.node_retry_delay_seconds:
                time.sleep(self.node_retry_delay_seconds * 2 ** (attempt - 1))
            again = [node_result(r) for r in self.invoke(["retry"]).result.results]
            retried.append([n.unique_id for n in again if n.resource_type != "operation"])
            latest = {n.unique_id: n for n in again}
            built = [latest.pop(n.unique_id, n) for n in built] + list(latest.values())
        nodes += built
        notes = []
        if missing:
            notes.append(f"built missing parents first: {', '.join(missing)}")
        if retried:
            notes.append(
                f"dbt retry ran {len(retried)} time(s) for: "
                + ", ".join(dict.fromkeys(uid.rsplit(".", 1)[-1] for a in retried for uid in a))
            )
        if not nodes:
            notes.append("the selection matched no dbt nodes")
        return DbtBuildResult(
            selection=selection.describe(),
            nodes=nodes,
            invocation_id=invocation_id or _invocation_id(),
            message="; ".join(notes) or None,
            retried=retried,
        )

    def missing_parents(self, selection: Selection) -> list[str]:
        """Models outside the selection that selected nodes read from and that do not exist yet.

        Steady state costs one catalog query and reading manifest.json: dbt is only asked to list
        the selection when some model of the project is missing from the warehouse.
        """
        if self.existing_relations is None:
            return []
        manifest = self._manifest()
        models = {
            uid: (node["schema"].lower(), (node.get("alias") or node["name"]).lower())
            for uid, node in manifest["nodes"].items()
            if node["resource_type"] in ("model", "seed", "snapshot")
            and node.get("config", {}).get("materialized") != "ephemeral"
        }
        existing = self.existing_relations()
        if all(rel in existing for rel in models.values()):
            return []
        selected = set(self.list_nodes(selection))
        parent_map: dict[str, list[str]] = manifest["parent_map"]
        missing: set[str] = set()
        frontier = list(selected)
        while frontier:
            uid = frontier.pop()
            for parent in parent_map.get(uid, []):
                if (
                    parent in models
                    and parent not in selected
                    and parent not in missing
                    and models[parent] not in existing
                ):
                    missing.add(parent)
                    frontier.append(parent)
        return sorted(manifest["nodes"][uid]["name"] for uid in missing)

    def model_names(self, selection: Selection) -> list[str]:
        """Names of the models, seeds and snapshots a selection picks (its tests follow them)."""
        return self._ls(selection, ("model", "seed", "snapshot"), "name")

    def _manifest(self) -> dict[str, Any]:
        path = self.target_path / "manifest.json"
        if not path.is_file():
            self.invoke_metadata(["parse"])
        return _read_manifest(path)

    def manifest(self) -> dict[str, Any]:
        """The project's manifest, parsed again when any project file is newer than it."""
        path = self.target_path / "manifest.json"
        if not path.is_file() or _newest_project_file(self.project_dir, self.target_path) > (
            path.stat().st_mtime
        ):
            self.invoke_metadata(["parse"])
        return _read_manifest(path)

    def list_nodes(self, selection: Selection) -> list[str]:
        """Unique ids of the nodes a build of this selection would run (no building)."""
        return self._ls(selection, ("model", "seed", "snapshot", "test"), "unique_id")

    def _ls(self, selection: Selection, resource_types: tuple[str, ...], key: str) -> list[str]:
        res = self.invoke_metadata(
            [
                "ls",
                *selection.cli_args(),
                "--resource-types",
                *resource_types,
                "--output",
                "json",
                "--output-keys",
                key,
            ]
        )
        return [json.loads(line)[key] for line in (res.result or [])]


def _read_manifest(path: Path) -> dict[str, Any]:
    # orjson: the missing-parents check reads manifest.json before every build (~0.7 MB for the
    # demo project): 2.0 ms, 3.3 ms with json.
    manifest: dict[str, Any] = orjson.loads(path.read_bytes())
    return manifest


def _running_dbt_command(key: str) -> Any:
    """What the dbt command running in this thread keeps under ``key`` in its click context
    (``manifest``, ``runtime_config``: dbt/cli/requires.py), or None outside one."""
    ctx = click.get_current_context(silent=True)
    return ctx.obj.get(key) if ctx is not None and isinstance(ctx.obj, dict) else None


def _dbt_shares_duckdb_instance(credentials: Any, duckdb_path: Path) -> bool:
    """Whether dbt-duckdb's connection for these credentials joins a plain connection's instance.

    dbt-duckdb 1.11 (``Environment.initialize_db``) connects with ``config_options`` and what its
    plugins add, read-write: the same configuration as ``duckdb.connect(path)`` when there are
    neither. It also attaches databases, registers filesystems and creates secrets on the
    instance, which must not meet what an earlier invocation left there: no sharing then either.
    """
    if getattr(credentials, "type", None) != "duckdb":
        return False
    if any(
        getattr(credentials, name, None)
        for name in ("config_options", "plugins", "remote", "attach", "filesystems", "secrets")
    ) or getattr(credentials, "is_motherduck", False):
        return False
    path = getattr(credentials, "path", None)
    return bool(path) and Path(path).resolve() == duckdb_path.resolve()


def _retryable(nodes: list[NodeResult]) -> bool:
    return any(
        n.status == "error" and n.resource_type in ("model", "seed", "snapshot") for n in nodes
    )


def _newest_project_file(project_dir: Path, target_path: Path) -> float:
    newest = 0.0
    skip = {
        target_path.resolve(),
        (project_dir / "logs").resolve(),
        (project_dir / "dbt_packages").resolve(),
    }
    for root, dirs, files in os.walk(project_dir):
        dirs[:] = [d for d in dirs if (Path(root) / d).resolve() not in skip]
        for name in files:
            newest = max(newest, (Path(root) / name).stat().st_mtime)
    return newest


def _invocation_id() -> str | None:
    try:
        from dbt_common.invocation import get_invocation_id

        return get_invocation_id()
    except Exception:  # an id is nice to have, never worth failing a run for
        return None


def node_result(result: Any) -> NodeResult:
    started = completed = None
    for timing in result.timing or []:
        if timing.name == "execute":
            started, completed = timing.started_at, timing.completed_at
    if started is None and result.timing:
        started, completed = result.timing[0].started_at, result.timing[-1].completed_at
    adapter = result.adapter_response or {}
    status = (
        result.status.value
        if isinstance(result.status, RunStatus | TestStatus)
        else str(result.status)
    )
    return NodeResult(
        unique_id=result.node.unique_id,
        name=result.node.name,
        resource_type=str(result.node.resource_type),
        status=status,
        started_at=_naive_utc(started),
        completed_at=_naive_utc(completed),
        execution_time_s=result.execution_time,
        rows_affected=adapter.get("rows_affected"),
        message=result.message,
    )


def _naive_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)
