"""Start served flow runs from a process that has already imported Prefect, dbt and postload.

A Prefect runner (``serve``) starts each flow run in a *spawned* subprocess
(``prefect.flow_engine.run_flow_in_subprocess`` uses ``multiprocessing.get_context("spawn")``),
so every run pays for importing Prefect, prefect-dbt, dbt-core and the adapter again: 7-8 s on an
idle 2-core machine and 20-30 s under load, most of the webhook → first-dbt-node latency.

Python's ``forkserver`` start method removes that cost without giving up process isolation: one
single-threaded server process imports the heavy modules once, and each flow run is a fresh
``fork()`` of it — a new process with its own memory, crash and kill semantics, started in
milliseconds. ``run_flow_in_subprocess`` looks ``multiprocessing`` up in its module when called,
so we hand it a forkserver context there and leave the rest of the runner (cancellation,
heartbeats, the control channel, crash detection, the pickled call) untouched.

Fork safety: the server process only imports modules (no threads, sockets or event loops exist at
that point, apart from jemalloc's fork-aware background thread when pyarrow is installed;
``tests/test_warm_start.py`` checks it), and every child builds its own Prefect
settings and clients from the environment the runner hands it, as a spawned child would.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["PRELOAD_MODULES", "install", "preload", "start_preloading", "stop"]

# What a transform flow run would otherwise import before its first dbt node (measured by
# diffing sys.modules in a forked child: ~1,600 modules, 970 of them the Snowflake connector that
# Prefect's block registry pulls in through prefect-snowflake's entry point).
PRELOAD_MODULES: tuple[str, ...] = (
    "prefect",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.utilities.visualization",  # imported by Flow.__call__
    "fastapi.encoders",  # Prefect serialises flow parameters with it
    "docker",  # a lazy import somewhere in Prefect's run set-up (62 modules)
    "prefect.artifacts",
    "anyio._backends._asyncio",
    "prefect_dbt",
    "prefect_dbt.core",
    "dbt.cli.main",
    "dbt.adapters.duckdb",
    "dbt.adapters.duckdb.environments.local",
    "dbt_common.clients.agate_helper",
    "dbt.task.build",
    "dbt.task.runnable",
    "dbt.task.test",
    "dbt.task.seed",
    "dbt.task.snapshot",
    "dbt.parser.sql",
    "dbt.graph.thread_pool",
    "duckdb",
    "postload.config",
    "postload.dbt",
    "postload.dbt._core",
    "postload.load",
    "postload.plan",
    "postload.report",
    "postload.retries",
    "postload.runs",
    "postload.writer",
    "postload.freshness",
    "postload.warehouse",
    "postload.warehouse._duckdb",
)

# dbt validates these with JSON schemas that mashumaro builds on first use (~0.5 s in total);
# the schemas are cached per class, so building them once here saves it in every run.
_DBT_SCHEMA_CLASSES: tuple[tuple[str, str], ...] = (
    ("dbt.contracts.project", "ProjectFlags"),
    ("dbt.contracts.project", "Project"),
    ("dbt.contracts.project", "ProfileConfig"),
    ("dbt.contracts.project", "PackageConfig"),
    ("dbt.contracts.project", "Configuration"),
    ("dbt.contracts.selection", "SelectorFile"),
    ("dbt.adapters.duckdb.credentials", "DuckDBCredentials"),
    ("dbt.task.test", "TestResultData"),
)


def preload() -> None:
    """Import and build, once, what every flow run would otherwise redo (run in the forkserver).

    Pure imports and computation: no threads, sockets or files are left open, so forking after
    it is safe. A module that fails to import is skipped: the run then imports it itself.
    """
    import contextlib
    import importlib

    for name in PRELOAD_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # Prefect imports every installed collection's blocks the first time a run touches the block
    # registry (prefect-snowflake brings the whole Snowflake connector): do it here instead.
    from prefect.plugins import load_prefect_collections

    load_prefect_collections()
    for module, name in _DBT_SCHEMA_CLASSES:
        with contextlib.suppress(ImportError, AttributeError):
            getattr(importlib.import_module(module), name).json_schema()


class _ForkServerMultiprocessing:
    """Stands in for the ``multiprocessing`` module inside ``prefect.flow_engine``."""

    def __init__(self, context: multiprocessing.context.BaseContext) -> None:
        self._context = context

    def get_context(self, method: str | None = None) -> multiprocessing.context.BaseContext:
        return self._context

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


def _noop() -> None:
    return None


_installed: multiprocessing.context.BaseContext | None = None


def start_preloading() -> bool:
    """Start the forkserver now; it does its imports while this process goes on with its own.

    The forkserver is a fresh interpreter (fork + exec), so this is safe at any point. Its
    imports take ~23 s on an idle 2-core machine and ``postload serve``'s own (flows, runner)
    ~11 s: started first, the two overlap. ``install()`` waits for the imports to finish. A
    child forked later still gets this process's ``sys.path`` and ``__main__`` as of its start
    (multiprocessing sends them with every process it starts), so entrypoint folders that serve
    adds to ``sys.path`` afterwards reach the flow runs. Returns False where ``forkserver`` is
    unavailable (Windows).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    from multiprocessing import forkserver

    # The forkserver imports these before it forks anything.
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["postload.local._warm_start_preload"]
    )
    # A Ctrl-C or SIGTERM landing between the server's spawn and multiprocessing recording its
    # pid would leave stop() nothing to stop: the stop is taken once the pid is known.
    with _stop_signals_deferred():
        forkserver.ensure_running()
    return True


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block, then deliver them again to the handlers it found.

    Handlers, not a blocked signal mask: a process spawned inside the block inherits the mask,
    and the forkserver would then ignore the SIGTERM that stop() sends it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if any(handler is None for handler in previous.values()):
        yield  # a handler installed outside Python could not be put back
        return
    for sig in previous:
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for signum in received:
        signal.raise_signal(signum)


def stop() -> None:
    """Stop the forkserver this process started, if any.

    It would exit by itself when this process's end closes its pipe, but only once it reads the
    pipe again: while it imports (~20 s) it would outlive a stopped ``postload serve``.
    """
    import os
    import signal
    from multiprocessing import forkserver

    # multiprocessing has no public way to stop its forkserver; _stop() exists from 3.12 on.
    server = forkserver._forkserver
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
    for name in ("_forkserver_pid", "_forkserver_address", "_forkserver_alive_fd"):
        if hasattr(server, name):
            setattr(server, name, None)


def install(*, warm_now: bool = True) -> bool:
    """Make the runner in this process fork flow runs from a warm forkserver.

    Returns False (and changes nothing) where ``forkserver`` is unavailable (Windows); flow runs
    then start the usual way, only slower. With ``warm_now`` the server is started and its imports
    done before returning, so the first flow run is fast too.
    """
    global _installed
    if _installed is not None:
        return True
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False

    import prefect.flow_engine as flow_engine
    import prefect.runner._starter_direct as starter_direct

    context = multiprocessing.get_context("forkserver")
    # A no-op when start_preloading() already set this and started the server.
    context.set_forkserver_preload(["postload.local._warm_start_preload"])
    if not hasattr(flow_engine, "multiprocessing") or not hasattr(
        starter_direct, "run_flow_in_subprocess"
    ):  # pragma: no cover - Prefect changed shape; runs start the usual (slow) way
        return False
    # run_flow_in_subprocess looks `multiprocessing` up in its module at call time.
    flow_engine.multiprocessing = _ForkServerMultiprocessing(context)  # type: ignore[assignment]
    _installed = context
    if warm_now:
        process = context.Process(target=_noop)
        process.start()
        process.join()
    return True
