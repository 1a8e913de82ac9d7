"""dbt node task runs recorded by a forked child process, so Prefect's per-node work leaves dbt's.

Every dbt node is a Prefect task run. prefect-dbt makes them in the dbt process: a callback
thread turns dbt's node events into tasks (it loads manifest.json, builds a ``Task`` per node,
reading and tokenizing the task function's source each time), and a thread per node runs each
task (the task engine, three state events, asset events, a result record, a log line). All of
it takes turns with dbt's own threads on one GIL: ~6 ms per node, ~3 s on a ~6 s 200-model
build. A forked child has a GIL of its own: the dbt process only forwards it the dbt events
prefect-dbt acts on (each node's start and end, and the log events at or above the level it
forwards), pickled, and the child runs prefect-dbt's own callback on them (``NodeEvents`` in
``_prefect_dbt``), exactly as thread mode does in the dbt process. Measured side by side in
docs/performance.md.

Why fork and not Prefect's ``ProcessPoolTaskRunner``: its workers are spawned, so each imports
Prefect (~1.8 s of CPU here) before its first task, and each node task blocks its worker while
dbt runs the node. A fork starts in a few milliseconds with everything imported, and the child
inherits the flow run's context and prefect-dbt's runner as they are. Prefect resets its
event-loop thread and its services (events and log workers) in a forked child itself
(``os.register_at_fork`` in ``prefect/_internal/concurrency``), which is what makes this safe:
the child sends its events and logs over connections of its own.

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
from collections.abc import Callable
from typing import BinaryIO, Protocol

from dbt_common.events.base_types import EventLevel, EventMsg
from prefect.context import SyncClientContext

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")
_ALL_ENDED = b"e"
# The dbt event that says dbt has parsed the project and selected the nodes, and is about to run
# them (see NodeTaskProcess.__call__).
RUN_BEGINS = "ConcurrencyLine"
_NODE_EVENTS = frozenset({"NodeStart", "NodeFinished"})
# prefect-dbt's order of dbt event levels: it logs the events at or above its log level.
_LEVEL_ORDER = (
    EventLevel.DEBUG,
    EventLevel.TEST,
    EventLevel.INFO,
    EventLevel.WARN,
    EventLevel.ERROR,
)


class NodeEventHandler(Protocol):
    """prefect-dbt's handling of dbt events in one process: the node task runs and the log lines."""

    def __call__(self, event: EventMsg) -> None: ...

    def finish(self, timeout_s: float) -> list[str]:
        """Wait until every event is handled and every node task run has ended; what is left."""
        ...


def _receive(stream: BinaryIO) -> EventMsg | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None  # the dbt process closed its end (or is gone): no more events
    event: EventMsg = pickle.loads(stream.read(_LENGTH.unpack(head)[0]))
    return event


class NodeTaskProcess:
    """The dbt event callback of a dbt invocation whose node events are handled in a child.

    Created in the thread that invokes dbt (it holds the flow run's context, which the child
    runs in). ``handle_in_process(in_order)`` builds prefect-dbt's handler: in the child, where it
    handles each event before reading the next, or in this process when there is no child, where
    prefect-dbt's callback thread handles them. ``finish`` ends the child once dbt is done.
    """

    def __init__(
        self, handle_in_process: Callable[[bool], NodeEventHandler], log_level: EventLevel
    ) -> None:
        self.run_context = contextvars.copy_context()
        self._handle_in_process = handle_in_process
        self._levels = frozenset(_LEVEL_ORDER[_LEVEL_ORDER.index(log_level) :])
        self._lock = threading.Lock()
        self._lost: str | None = None
        self.pid: int | None = None
        self._socket: socket.socket | None = None
        self._out: BinaryIO | None = None
        # Handles the events when there is no child: fork refused, or dbt never began a run.
        self._in_process: NodeEventHandler | None = None
        # Events before the fork (a warning while dbt parses): sent to the child once it exists.
        self._early: list[EventMsg] = []

    def __call__(self, event: EventMsg) -> None:
        """dbt's callback, in whichever dbt thread fires the event.

        The child is forked when dbt begins running nodes, not before: every page the dbt process
        writes while a child shares it is copied first (copy-on-write), and parsing the project
        writes most of them. Forked before the parse, the demo's 11-node build took ~11,000 page
        faults more than in thread mode, ~8,000 of them while parsing (docs/performance.md). dbt fires ``ConcurrencyLine`` in the thread that invoked it, after parsing and
        selecting and before it starts any node (``execute_with_hooks`` in
        dbt/task/runnable.py), and only when there are nodes to run: no thread of dbt's runs a
        node yet, and the fork is in the invoking thread, as before.
        """
        name = event.info.name
        if name == RUN_BEGINS:
            self.start()
        if name in _NODE_EVENTS or event.info.level in self._levels:
            self._forward(event)

    def start(self) -> None:
        """Fork the child (once); if the fork is refused, handle the events in this process."""
        with self._lock:
            if self.pid is not None or self._in_process is not None:
                return
            for stream in (sys.stdout, sys.stderr):  # or the child writes the buffered text again
                stream.flush()
            pair: tuple[socket.socket, ...] = ()
            try:
                pair = socket.socketpair()
                ours, theirs = pair
                pid = os.fork()
            except OSError as exc:  # a process or memory limit: threads still work
                for end in pair:
                    end.close()
                logger.warning(
                    "cannot fork the process that records dbt node task runs (%s): "
                    "recording them in threads of this process instead",
                    exc,
                )
                self._in_process = self._handle_in_process(False)
                for event in self._early:
                    self._in_process(event)
                self._early.clear()
                return
            if pid == 0:  # the child: never returns
                try:
                    ours.close()
                    self.run_context.run(_serve_node_tasks, theirs, self._handle_in_process)
                finally:
                    # _serve_node_tasks ends the child itself; whatever fails before it must not
                    # return into the dbt process's stack, a second copy of the flow run.
                    os._exit(1)
            theirs.close()
            self.pid = pid
            self._socket = ours
            self._out = ours.makefile("wb")
            for event in self._early:
                self._send(event)
            self._early.clear()

    def _forward(self, event: EventMsg) -> None:
        with self._lock:
            if (in_process := self._in_process) is None:
                if self.pid is None:
                    self._early.append(event)
                else:
                    self._send(event)
                return
        in_process(event)

    def _send(self, event: EventMsg) -> None:
        if self._lost or self._out is None:
            return
        try:
            data = pickle.dumps(event, protocol=pickle.HIGHEST_PROTOCOL)
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

    def finish(self, timeout_s: float) -> list[str]:
        """End the child once every event is handed over; what is still running after timeout_s.

        Called once dbt returned. Closing the connection tells the child no more events come;
        it handles the ones it has, ends the nodes dbt started but never finished, and answers.
        """
        if self.pid is None and self._in_process is None and self._early:
            # dbt never began a run (nothing selected, or it failed first): what it said while
            # parsing is still logged, here.
            self._in_process = self._handle_in_process(True)
            for event in self._early:
                self._in_process(event)
            self._early.clear()
        if self._in_process is not None:
            return self._in_process.finish(timeout_s)
        if self.pid is None or self._socket is None or self._out is None:
            return []  # dbt ran no node and said nothing to forward: there is no child
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
        except OSError:  # reset: it died with events it never read; waitpid says how it ended
            ended = False
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
# How long the child waits for its node task runs to end once dbt is done: they only have their
# end state left to report by then; the bound is for a Prefect API that hangs.
CHILD_TASKS_TIMEOUT_S = 110.0


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


def _serve_node_tasks(
    connection: socket.socket, handle_in_process: Callable[[bool], NodeEventHandler]
) -> None:
    """The child: handle each dbt event as the dbt process forwards it, then send what is left."""
    code = 0
    try:
        # Ctrl-C reaches the whole process group: the dbt process ends the child by closing the
        # connection. A plain SIGTERM (a cancelled flow run) ends it at once.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # The inherited context holds the flow run's API clients, whose pooled connections are
        # the parent's sockets too: the child's task runs get a client of their own.
        with SyncClientContext():
            handler = handle_in_process(True)  # in the order dbt fired them
            events = connection.makefile("rb")
            while (event := _receive(events)) is not None:
                handler(event)
            # The dbt process is done (or gone): nodes that never got their end are ended.
            handler.finish(CHILD_TASKS_TIMEOUT_S)
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
