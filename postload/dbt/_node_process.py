"""dbt node task runs reported by a forked child process, so Prefect's per-task work leaves dbt's.

Every dbt node is a Prefect task run. Run in threads of the dbt process (prefect-dbt's way, and
``_NodeTasks``), each costs ~6 ms of Python under the GIL: the task engine, three state events,
asset events, a result record and a log line. On a 200-model build that is ~3 s added to a ~6 s
dbt build, because the node tasks and dbt's own threads take turns on one GIL. A forked child has
a GIL of its own: the dbt process only sends it two small messages per node (started, finished)
and the child runs exactly the same task engine calls, in a copy of the flow run's context, on
another core. Measured side by side (bench/README.md, session 8): 200-model build 1.48 -> 1.20
times bare dbt.

Why fork and not Prefect's ``ProcessPoolTaskRunner``: its workers are spawned, so each imports
Prefect (~1.8 s of CPU here) before its first task, and each node task blocks its worker while
dbt runs the node. A fork starts in a few milliseconds with everything imported, and the child
inherits the flow run's context as it is. Prefect resets its event-loop thread and its services
(events and log workers) in a forked child itself (``os.register_at_fork`` in
``prefect/_internal/concurrency``), which is what makes this safe: the child sends its events and
logs over connections of its own.

The dbt invocation returns once the child says every node's task run has ended; the child then
sends its last events and log lines on its own and a thread reaps it. The dbt build never depends
on the child: if it dies, node task runs stop being recorded (a warning says so) and dbt goes on;
if its task runs have not ended in time after dbt is done, it is killed.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from typing import Any, BinaryIO
from uuid import UUID

from prefect.context import SyncClientContext
from prefect.tasks import Task
from prefect_dbt.core._tracker import NodeTaskTracker

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")
_ALL_ENDED = b"e"


def _receive(stream: BinaryIO) -> tuple[Any, ...] | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None  # the dbt process closed its end (or is gone): no more nodes
    return pickle.loads(stream.read(_LENGTH.unpack(head)[0]))


class NodeTaskProcess(NodeTaskTracker):
    """prefect-dbt's node task tracker whose task runs happen in a forked child process.

    Created in the thread that invokes dbt (it holds the flow run's context, which the child
    inherits). prefect-dbt's callback thread calls ``run_task_in_thread`` at each node's start and
    ``set_node_status`` at its end; both only forward a message. ``finish`` ends the child once dbt
    is done.
    """

    def __init__(self) -> None:
        super().__init__()
        self.run_context = contextvars.copy_context()
        self._lock = threading.Lock()
        self._lost: str | None = None
        ours, theirs = socket.socketpair()
        for stream in (sys.stdout, sys.stderr):  # or the child writes the buffered text again
            stream.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            ours.close()
            _serve_node_tasks(theirs)
        theirs.close()
        self.pid = pid
        self._socket = ours
        self._out = ours.makefile("wb")

    def _forward(self, message: tuple[Any, ...]) -> None:
        try:
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a task prefect-dbt built with something unpicklable
            logger.warning(
                "dbt node %s is not recorded as a Prefect task run: its task cannot be handed "
                "to the recording process (%s)",
                message[1],
                exc,
            )
            return
        with self._lock:
            if self._lost:
                return
            try:
                self._out.write(_LENGTH.pack(len(data)) + data)
                self._out.flush()
            except OSError as exc:
                self._lost = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "the process recording dbt node task runs (pid %d) is gone (%s): the build "
                    "goes on, later nodes are not recorded as Prefect task runs",
                    self.pid,
                    self._lost,
                )

    def run_task_in_thread(
        self,
        node_id: str,
        task: Task[Any, Any],
        task_run_id: UUID,
        parameters: dict[str, Any],
        context: dict[str, Any],
    ) -> None:
        self._forward(
            (
                "start",
                node_id,
                task,
                task_run_id,
                self.get_node_dependencies(node_id),
                parameters.get("asset_id"),
            )
        )

    def set_node_status(self, node_id: str, event_data: dict[str, Any], event_message: str) -> None:
        super().set_node_status(node_id, event_data, event_message)
        self._forward(("finish", node_id, event_data, event_message))

    def finish(self, timeout_s: float) -> list[str]:
        """End the child once every node's end is handed over; what is still running after timeout_s.

        Called once dbt returned and prefect-dbt drained its callback queue. Closing the
        connection tells the child no more nodes come; it ends the ones dbt started but never
        finished itself (``_NodeTasks.finish``).
        """
        with self._lock:
            # The child is gone already if these fail: waitpid below says how it ended.
            with contextlib.suppress(OSError):
                self._out.close()
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_WR)
        # The child answers once every node's task run has ended, then sends its last events and
        # log lines on its own: the flow goes on meanwhile (a thread reaps the child).
        self._socket.settimeout(timeout_s)
        try:
            ended = self._socket.recv(1) == _ALL_ENDED
        except TimeoutError:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            return [f"node task process {self.pid} (killed)"]
        finally:
            self._socket.close()
        if ended:
            reaper = threading.Thread(
                target=_reap,
                args=(self.pid,),
                name=f"reap node task process {self.pid}",
                daemon=True,
            )
            with _reapers_lock:
                if not _reapers:
                    atexit.register(_wait_for_last_events)
                _reapers[:] = [r for r in _reapers if r.is_alive()] + [reaper]
            reaper.start()
        else:  # it died before answering: it is gone (or going), say how
            _reap(self.pid)
        return []


# A flow run's process may exit right after its flow (and a container with it, killing every
# process in it): it must not take a child's last task-run events with it.
_reapers: list[threading.Thread] = []
_reapers_lock = threading.Lock()
LAST_EVENTS_TIMEOUT_S = 90.0


def _wait_for_last_events() -> None:
    deadline = time.monotonic() + LAST_EVENTS_TIMEOUT_S
    with _reapers_lock:
        reapers = list(_reapers)
    for reaper in reapers:
        reaper.join(max(0.0, deadline - time.monotonic()))


def _reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if code := os.waitstatus_to_exitcode(status):
        logger.warning(
            "the process recording dbt node task runs (pid %d) ended with exit code %d; "
            "its error is on stderr",
            pid,
            code,
        )


def _serve_node_tasks(connection: socket.socket) -> None:
    """The child: run each node's task as the dbt process reports it, then send what is left."""
    code = 0
    try:
        # Ctrl-C reaches the whole process group: the dbt process ends the child by closing the
        # connection. A plain SIGTERM (a cancelled flow run) ends it at once.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # The inherited context holds the flow run's API clients, whose pooled connections are
        # the parent's sockets too: the child's task runs get a client of their own.
        with SyncClientContext():
            _run_node_tasks(connection.makefile("rb"))
        connection.sendall(_ALL_ENDED)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            EventsWorker.drain_all(timeout=60)
            APILogWorker.drain_all(timeout=60)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # not exit(): the parent's atexit hooks and finalizers are not ours


def _run_node_tasks(messages: BinaryIO) -> None:
    """Each node's task as the dbt process reports it: the same tracker thread mode uses."""
    from postload.dbt._core import NODE_TASKS_TIMEOUT_S, _NodeTasks

    tracker = _NodeTasks(contextvars.copy_context())
    while (message := _receive(messages)) is not None:
        kind, node_id, *rest = message
        if kind == "start":
            task, task_run_id, upstream_ids, asset_id = rest
            tracker.start_task(node_id, task)
            tracker.set_node_dependencies(node_id, upstream_ids)
            tracker.set_task_run_id(node_id, task_run_id)
            tracker.run_task_in_thread(
                node_id,
                task,
                task_run_id=task_run_id,
                parameters={"task_state": tracker, "node_id": node_id, "asset_id": asset_id},
                context={},
            )
        elif kind == "finish":
            event_data, event_message = rest
            tracker.set_node_status(node_id, event_data, event_message)
    # The dbt process is done (or gone): nodes that never got their end must not wait forever.
    tracker.finish(NODE_TASKS_TIMEOUT_S)
