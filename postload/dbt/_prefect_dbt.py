"""postload's changes to prefect-dbt's ``PrefectDbtRunner``: node tasks that are cheap to start and
done when ``invoke()`` returns, in threads of the dbt process or a forked child.

Written against prefect-dbt 0.7.25's internals (``prefect_dbt/core/runner.py`` and
``_tracker.py``); each class says which upstream behaviour it changes and why. Used only when that
version is installed (``_prefect_dbt_public.internals_supported``).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast
from uuid import UUID

from dbt.contracts.graph.manifest import Manifest
from dbt_common.events.base_types import EventLevel, EventMsg
from prefect.client.schemas.objects import State
from prefect.context import SettingsContext
from prefect.futures import PrefectFuture, PrefectTaskRunFuture
from prefect.results import ResultRecord
from prefect.task_engine import run_task_sync
from prefect.tasks import Task
from prefect_dbt import PrefectDbtRunner
from prefect_dbt.core._tracker import NodeTaskTracker

from postload.config import NodeTaskMode
from postload.dbt._invocation import running_dbt_command
from postload.dbt._node_process import RUN_BEGINS, NodeTaskProcess
from postload.dbt._prefect_dbt_public import NODE_TASK_THREAD_PREFIX, DbtSettings, unused_client

__all__ = ["NODE_TASK_THREAD_PREFIX", "DbtSettings", "NodeTaskDbtRunner", "unused_client"]

# How long invoke() waits for the per-node task runs to record their final state once dbt is done.
# They only have their end state left to report by then; the bound is for a Prefect API that hangs.
NODE_TASKS_TIMEOUT_S = 120.0

logger = logging.getLogger(__name__)


class EndedNodeState(State):
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
        return super().result(
            raise_on_failure=raise_on_failure, retry_result_failure=retry_result_failure, **kwargs
        )


class FinishedNode(PrefectTaskRunFuture[Any]):
    """An upstream node's ended task run, handed to its dependents' ``wait_for`` as a future.

    Prefect walks every ``wait_for`` item with ``visit_collection`` two or three times per task
    run (task inputs, then the readiness check). A ``State`` is a pydantic model, so each walk
    descends through its details and result record (~40 objects); a future is a leaf. The
    dependent gets the same ``wait_for`` input (the upstream task run id) and the same readiness
    check on the state, whose result is read without a trip through the event loop
    (``EndedNodeState``).
    """

    _final_state: EndedNodeState

    def __init__(self, state: State) -> None:
        # A task run's end state: its details name the task run.
        super().__init__(task_run_id=cast(UUID, state.state_details.task_run_id))
        self._final_state = EndedNodeState.model_construct(
            _fields_set=state.model_fields_set, **dict(state)
        )

    def wait(self, timeout: float | None = None) -> None:
        return None

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        return self._final_state.result(raise_on_failure=raise_on_failure, _sync=True)

    def add_done_callback(self, fn: Callable[[PrefectFuture[Any]], None]) -> None:
        fn(self)


class NodeTasks(NodeTaskTracker):
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
    ``wait_for`` as futures (see ``FinishedNode``).
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
                FinishedNode(state)
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


class LiveSettingsContext(SettingsContext):
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


class NodeEvents:
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
        runner: NodeTaskDbtRunner,
        log_level: EventLevel,
        context: dict[str, Any],
        add_test_edges: bool,
        in_order: bool,
    ) -> None:
        self._runner = runner
        self._tracker = NodeTasks(contextvars.copy_context())
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


class NodeTaskDbtRunner(PrefectDbtRunner):
    """``PrefectDbtRunner`` whose node tasks are cheap to start and done when ``invoke()`` returns.

    Each dbt node still becomes a Prefect task with its asset lineage, from the same run context;
    only where prefect-dbt's callback and the task runs happen, what (de)serializing that context
    costs and when the task threads are waited for differ (see ``NodeTaskProcess``,
    ``LiveSettingsContext`` and ``NodeTasks``).
    """

    _node_tasks: NodeEvents | NodeTaskProcess | None = None
    _callback_context: contextvars.Context | None = None
    _manifest: Manifest | None  # prefect-dbt's (set in its __init__; it has no type information)
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
        handle_here = functools.partial(NodeEvents, self, log_level, context, add_test_edges)
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
        if isinstance(manifest := running_dbt_command("manifest"), Manifest):
            self._manifest = manifest

    def _callback_worker(self) -> None:
        # The callback thread hydrates the run context for every dbt log line without a node:
        # in the run's context variables that reuses the flow run's API client (see NodeTasks).
        if (run_context := self._callback_context) is None:
            return super()._callback_worker()
        return run_context.copy().run(super()._callback_worker)

    def invoke(self, args: list[str], **kwargs: Any) -> Any:
        try:
            if (live := SettingsContext.get()) is None:
                return super().invoke(args, **kwargs)
            with LiveSettingsContext(profile=live.profile, settings=live.settings):
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
