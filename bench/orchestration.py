"""Orchestration benchmark: the flow's transform step against bare ``dbt build``, side by side.

For the demo dbt project and for a generated project of ``--models`` models (default 200), times
``dbt build --select source:events+`` three ways in the same run, rotating the order:

* **bare** — ``dbtRunner().invoke([...])`` with the project/profiles dir and
  ``POSTLOAD_DUCKDB_PATH`` set (log levels as prefect-dbt sets them inside a flow run:
  ``--log-level none --log-level-file info``), then the DuckDB file closed as the end of a
  ``dbt build`` process closes it (``close_warehouse_as_dbt_exits``).
* **runner** — ``CoreDbtRunner.build(...)`` outside any flow: prefect-dbt's wrapper and postload's
  missing-parents check, but no Prefect tasks.
* **postload** — ``CoreDbtRunner.build(Selection(select="source:events+"), cause="bench")`` inside
  a Prefect flow, so prefect-dbt creates a task per dbt node: the real overhead. The runner gets
  ``existing_relations`` as ``open_dbt_runner`` gives it, so the steady-state missing-parents
  check (catalog query + manifest.json) is included. The flow call as a whole (flow run creation,
  state changes) is reported separately.

A local Prefect server comes from ``prefect_test_harness`` (its startup is not timed); it shares
the machine's cores with the measured process. Every run starts once that server is idle (untimed:
it records task runs from the previous run's events after the fact). Demo data is loaded first
(``write_demo_batch`` + ``DuckDBWarehouse.load`` for the three sources) and a full ``dbt build``
warms each project up so every relation exists (plus, for the first project, one untimed run of
each method to warm the process). Reported: medians, ratio postload/bare (goal <= 1.3), where the
postload time goes (a few calls are wrapped with timers in this process only; postload code is not
modified), the CPU each run took in this process and in the Prefect server, how the overhead grows
from the demo project to the generated one, and a variant measured against bare in a second
round: by default the same runs with the node task runs recorded from threads of this process
(``POSTLOAD_DBT_NODE_TASKS=thread``, prefect-dbt's way) instead of from a forked child (postload's
default on Linux); ``--candidate-kind isolated-server`` instead puts the Prefect server on a core
of its own (this process pinned to the other), which separates what the server's work costs the
build on a shared machine from what postload's process itself spends.

    .venv/bin/python bench/orchestration.py [--quick] [--models 200] [--repeats 3]
        [--gen-repeats 3] [--skip-generated] [--no-candidate] [--candidate]
        [--candidate-kind thread-node-tasks|isolated-server|niced-server|log-level|switch-interval]
        [--candidate-level info] [--candidate-switch-ms 1] [--keep]
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK_ROOT = ROOT / "bench" / ".work"
DEMO_PROJECT = ROOT / "dbt_project"
SELECT = "source:events+"
GOAL = 1.3
DUCKDB_PATH_ENV = "POSTLOAD_DUCKDB_PATH"
METHODS = ("bare", "runner", "postload")


@dataclass
class Measured:
    project: str
    nodes: int = 0
    task_runs: int | None = None
    seconds: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    flow_call: list[float] = field(default_factory=list)
    # CPU seconds per run: this process during the call, and the Prefect server during the call
    # plus until it went idle again (it records task runs from events, after the fact)
    process_cpu: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    server_cpu: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    # prefect-dbt node task threads still alive when a postload flow call returned (should be 0)
    leftover_threads: list[int] = field(default_factory=list)
    # runner and postload runs: seconds per timed call, one entry per run
    steps: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # the second-round variant, measured against bare in the same conditions
    candidate: dict[str, list[float]] = field(default_factory=dict)

    def median(self, method: str) -> float:
        return statistics.median(self.seconds[method])

    @property
    def ratio(self) -> float:
        return self.median("postload") / self.median("bare")

    @property
    def overhead(self) -> float:
        return self.median("postload") - self.median("bare")

    def step(self, method: str, key: str) -> float:
        values = self.steps.get(method, {}).get(key, [])
        return statistics.median(values) if values else 0.0

    def cpu(self, kind: str, method: str) -> float | None:
        values = (self.process_cpu if kind == "process" else self.server_cpu)[method]
        return statistics.median(values) if values else None


def own_cpu_seconds() -> float:
    """CPU of this process and of the children it has waited for: the node task process each
    dbt invocation forks is waited for before the invocation returns."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@dataclass
class Run:
    seconds: float
    nodes: int
    steps: dict[str, float]
    call: float
    process_cpu: float
    server_cpu: float | None
    leftover_threads: int


class CallTimer:
    """Sums the time spent in a few functions of postload, prefect-dbt and dbt, in this process.

    The functions are wrapped (not changed); time is only recorded inside ``collect()``.
    ``PrefectDbtRunner._call_task`` runs in prefect-dbt's callback thread, concurrently with dbt.
    ``PrefectDbtRunner.invoke`` is prefect-dbt's own; postload's subclass waits for the node task
    threads (``NodeTasks.finish``) after it.
    """

    def __init__(self) -> None:
        self.current: dict[str, float] | None = None

    def install(self) -> None:
        from dbt.cli.main import dbtRunner
        from prefect_dbt.core.runner import PrefectDbtRunner

        from postload.dbt._node_process import NodeTaskProcess
        from postload.dbt._prefect_dbt import NodeTasks
        from postload.dbt.project import DbtProject

        self._wrap(DbtProject, "missing_parents", "missing_parents")
        self._wrap(PrefectDbtRunner, "invoke", "prefect_invoke")
        self._wrap(NodeTasks, "finish", "node_tasks_finish")
        self._wrap(NodeTaskProcess, "finish", "node_tasks_finish")
        self._wrap(PrefectDbtRunner, "_call_task", "call_task")
        self._wrap(dbtRunner, "invoke", "dbt_invoke")

    def _wrap(self, owner: Any, name: str, key: str) -> None:
        original = getattr(owner, name)
        timer = self

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if (current := timer.current) is not None:
                    ended = time.perf_counter()
                    current[key] = current.get(key, 0.0) + ended - started
                    current[f"{key}_end"] = ended

        setattr(owner, name, timed)

    @contextmanager
    def collect(self) -> Iterator[dict[str, float]]:
        self.current = {}
        try:
            yield self.current
        finally:
            if (current := self.current) and "prefect_invoke_end" in current:
                # What prefect-dbt does after dbt returned: mostly draining its callback queue.
                current["after_dbt"] = current["prefect_invoke_end"] - current["dbt_invoke_end"]
            self.current = None


@contextmanager
def runner_log_level(level: str) -> Iterator[None]:
    """Variant, in this process only: give prefect-dbt another log level for dbt's events.

    prefect-dbt forwards every dbt event at or above its log level to the run's logs; postload
    ships WARN (``DBT_EVENTS_TO_PREFECT_LOGS``), prefect-dbt's default is Prefect's own (INFO).
    This second round shows what forwarding at another level costs.
    """
    from dbt_common.events.base_types import EventLevel

    from postload.dbt._core import CoreDbtRunner

    original = CoreDbtRunner._runner

    def _runner(self: Any) -> Any:
        runner = original(self)
        runner.settings.log_level = EventLevel(level)
        return runner

    CoreDbtRunner._runner = _runner
    try:
        yield
    finally:
        CoreDbtRunner._runner = original


@contextmanager
def thread_node_tasks() -> Iterator[bool]:
    """Variant, in this process only: node task runs recorded from threads of the dbt process.

    postload's default on Linux (``POSTLOAD_DBT_NODE_TASKS=process``) records them from a child
    forked at each dbt invocation; ``thread`` is prefect-dbt's own way, kept for other platforms.
    """
    from postload.config import NodeTaskMode
    from postload.dbt._core import CoreDbtRunner

    original = CoreDbtRunner._runner

    def _runner(self: Any) -> Any:
        runner = original(self)
        runner.node_task_mode = NodeTaskMode.THREAD
        return runner

    CoreDbtRunner._runner = _runner
    try:
        yield True
    finally:
        CoreDbtRunner._runner = original


@contextmanager
def switch_interval(milliseconds: float) -> Iterator[None]:
    """Variant, in this process only: another GIL switch interval (``sys.setswitchinterval``).

    A thread that wants the GIL waits up to the interval (CPython's default: 5 ms) before it asks
    the holder to let go. dbt's threads give the GIL up for every DuckDB call and need it back
    when the call returns; with Prefect's task, event and log threads busy in Python meanwhile,
    each of those returns can wait a full interval.
    """
    original = sys.getswitchinterval()
    sys.setswitchinterval(milliseconds / 1000)
    try:
        yield
    finally:
        sys.setswitchinterval(original)


# --------------------------------------------------------------------------- generated project

_STG = """select
    json_extract_string(record, '$.event_id') as event_id,
    cast(json_extract_string(record, '$.customer_id') as bigint) as customer_id,
    json_extract_string(record, '$.event_type') as event_type,
    cast(json_extract_string(record, '$.occurred_at') as timestamp) as occurred_at,
    _loaded_at as loaded_at,
    {i} as variant
from {{{{ source('events', 'events') }}}}
"""
_INT = """select event_id, customer_id, event_type, occurred_at, loaded_at, variant
from {{{{ ref('{a}') }}}}
union all
select event_id, customer_id, event_type, occurred_at, loaded_at, variant
from {{{{ ref('{b}') }}}}
"""
_MART = """select
    i.event_type,
    count(*) as event_count,
    count(distinct i.customer_id) as customer_count,
    max(i.loaded_at) as last_loaded_at
from {{{{ ref('{a}') }}}} as i
where i.event_id in (select event_id from {{{{ ref('{b}') }}}})
group by 1
"""
_PROJECT_YML = """name: postload_bench
version: "1.0.0"
profile: postload
model-paths: ["models"]
target-path: target
flags:
  send_anonymous_usage_stats: false
models:
  postload_bench:
    staging:
      +materialized: view
    intermediate:
      +materialized: view
    marts:
      +materialized: table
"""


def generate_project(dest: Path, models: int) -> dict[str, int]:
    """A project over the ``events`` source: staging views -> intermediate views -> mart tables.

    Every model descends from ``source:events`` (so the selection is the whole project), names are
    prefixed ``gen_`` (no clash with the demo models in the same schema), and every fifth mart
    gets a ``not_null`` test.
    """
    n_stg = max(1, models // 4)
    n_int = max(1, models // 2)
    n_mart = max(1, models - n_stg - n_int)
    shutil.rmtree(dest, ignore_errors=True)
    for layer in ("staging", "intermediate", "marts"):
        (dest / "models" / layer).mkdir(parents=True)
    (dest / "dbt_project.yml").write_text(_PROJECT_YML, encoding="utf-8")
    shutil.copy(DEMO_PROJECT / "profiles.yml", dest / "profiles.yml")
    # Same sources yml as the demo project's events source.
    shutil.copy(
        DEMO_PROJECT / "models" / "staging" / "events" / "_events__sources.yml",
        dest / "models" / "staging" / "_events__sources.yml",
    )
    stg = [f"gen_stg_{i:03d}" for i in range(n_stg)]
    ints = [f"gen_int_{i:03d}" for i in range(n_int)]
    marts = [f"gen_mart_{i:03d}" for i in range(n_mart)]
    for i, name in enumerate(stg):
        sql = _STG.format(i=i)
        (dest / "models" / "staging" / f"{name}.sql").write_text(sql, encoding="utf-8")
    for i, name in enumerate(ints):
        sql = _INT.format(a=stg[i % n_stg], b=stg[(i * 7 + 3) % n_stg])
        (dest / "models" / "intermediate" / f"{name}.sql").write_text(sql, encoding="utf-8")
    tests = []
    for i, name in enumerate(marts):
        sql = _MART.format(a=ints[i % n_int], b=ints[(i * 13 + 5) % n_int])
        (dest / "models" / "marts" / f"{name}.sql").write_text(sql, encoding="utf-8")
        if i % 5 == 0:
            tests.append(
                f"  - name: {name}\n    columns:\n      - name: event_type\n"
                "        data_tests: [not_null]\n"
            )
    (dest / "models" / "marts" / "_marts.yml").write_text(
        "models:\n" + "".join(tests), encoding="utf-8"
    )
    return {"staging": n_stg, "intermediate": n_int, "marts": n_mart, "tests": len(tests)}


# --------------------------------------------------------------------------- the three methods


def bare_build(project: Path, target: Path, select: str | None = SELECT) -> tuple[float, int]:
    from dbt.cli.main import dbtRunner

    args = ["build", *(["--select", select] if select else [])]
    args += ["--project-dir", str(project), "--profiles-dir", str(project)]
    args += ["--target-path", str(target), "--log-level", "none", "--log-level-file", "info"]
    started = time.perf_counter()
    res = dbtRunner().invoke(args)
    close_warehouse_as_dbt_exits()
    elapsed = time.perf_counter() - started
    if not res.success:
        raise RuntimeError(f"bare dbt {' '.join(args)} failed: {res.exception or res.result}")
    return elapsed, len(res.result.results)


def close_warehouse_as_dbt_exits() -> None:
    """What the end of a ``dbt build`` process does to the warehouse: close the DuckDB file.

    dbt-duckdb keeps one DuckDB instance per process until exit (its atexit hook drops it). In
    one benchmark process that would let every bare build after the first skip opening and
    closing (checkpointing) the file, which a ``dbt build`` run pays for and postload's runner
    pays for too (it lets go of the file after each invocation, for other processes); and
    whichever method ran after a bare build would find the file open. Closed here, every method
    starts with the file closed.
    """
    from dbt.adapters.duckdb.connections import DuckDBConnectionManager

    with DuckDBConnectionManager._LOCK:
        env, DuckDBConnectionManager._ENV = DuckDBConnectionManager._ENV, None
    if env is not None:
        env.close()


def runner_build(
    project: Path, target: Path, duckdb_path: Path, stage_root: Path
) -> tuple[float, int]:
    """``CoreDbtRunner.build`` as the flow's transform step calls it (in or outside a flow)."""
    from postload.config import Selection, load_pipeline_config
    from postload.dbt._core import CoreDbtRunner
    from postload.warehouse._duckdb import DuckDBWarehouse

    warehouse = DuckDBWarehouse(
        duckdb_path, stage_root, load_pipeline_config(ROOT / "postload.yaml")
    )
    runner = CoreDbtRunner(
        project,
        duckdb_path,
        target_path=target,
        existing_relations=warehouse.relations,
        warehouse_is_duckdb=True,
    )
    started = time.perf_counter()
    build = runner.build(Selection(select=SELECT), cause="bench")
    elapsed = time.perf_counter() - started
    if build.status != "success":
        raise RuntimeError(f"postload build {build.selection}: {build.status} {build.message}")
    return elapsed, len(build.nodes)


def make_flow() -> Any:
    from prefect import flow
    from prefect.runtime import flow_run

    @flow(name="bench-transform")
    def bench_transform(project: str, target: str, duckdb_path: str, stage_root: str) -> dict:
        seconds, nodes = runner_build(
            Path(project), Path(target), Path(duckdb_path), Path(stage_root)
        )
        return {"seconds": seconds, "nodes": nodes, "flow_run_id": flow_run.id}

    return bench_transform


def count_task_runs(flow_run_id: str, expected: int, wait_s: float = 15.0) -> int:
    """Task runs the server recorded for one flow run (they arrive as events: allow a lag)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            count = offset = 0
            while batch := client.read_task_runs(
                flow_run_filter=flow_runs, limit=200, offset=offset
            ):
                count += len(batch)
                offset += len(batch)
            if count >= expected or time.monotonic() > deadline:
                return count
            time.sleep(0.5)


# --------------------------------------------------------------------------- the run


def leftover_node_threads(timeout_s: float = 60.0) -> int:
    """prefect-dbt node task threads still alive after a flow call; waits (untimed) for them.

    postload's runner joins them before a build returns, so this should find none. Left running
    they would compete with the next timed run and report to a server that is gone at the end.
    """
    from postload.dbt._core import NODE_TASK_THREAD_PREFIX

    deadline = time.monotonic() + timeout_s
    leftover = [
        t
        for t in threading.enumerate()
        if t.name.startswith(NODE_TASK_THREAD_PREFIX) or t.name.endswith("(run_task)")
    ]
    for thread in leftover:
        thread.join(max(0.0, deadline - time.monotonic()))
    return len(leftover)


def server_pids() -> list[int]:
    """The Prefect test server: uvicorn subprocesses of this process (Linux /proc only)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == os.getpid() and b"uvicorn" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU seconds of the given processes so far; None when /proc is unavailable."""
    if not pids:
        return None
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return total


def wait_until_idle(pids: list[int], timeout_s: float = 90.0) -> None:
    """Wait (untimed) until the server's CPU use stops: it records task runs from events after
    the flow call returned, and that backlog must not slow down whichever run comes next."""
    deadline = time.monotonic() + timeout_s
    last = cpu_seconds(pids)
    while last is not None and time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_seconds(pids)
        if now is None or now - last < 0.05:
            return
        last = now


def _thread_ids(pid: int | str) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


@contextmanager
def isolated_server(pids: list[int]) -> Iterator[bool]:
    """Pin the Prefect server to the last CPU and every thread of this process to the others.

    As if the server ran on another machine: its work on the run's events no longer competes
    with dbt. Threads started meanwhile inherit their creator's CPUs; all get the process's
    original set back afterwards. Yields False (nothing pinned) off Linux or with one CPU.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2 or not pids:
        yield False
        return
    ours, server = set(cpus[:-1]), {cpus[-1]}
    for pid in pids:
        for tid in _thread_ids(pid):
            with suppress(OSError):
                os.sched_setaffinity(tid, server)
    for tid in _thread_ids("self"):
        with suppress(OSError):
            os.sched_setaffinity(tid, ours)
    try:
        yield True
    finally:
        for tid in [*_thread_ids("self"), *(t for pid in pids for t in _thread_ids(pid))]:
            with suppress(OSError):
                os.sched_setaffinity(tid, set(cpus))


@contextmanager
def niced_server(pids: list[int], niceness: int = 10) -> Iterator[bool]:
    """Lower the Prefect server's CPU priority (every thread: Linux nice values are per thread).

    The server records task runs from the run's events after the fact; at a lower priority it
    takes what dbt leaves idle instead of competing with it. Yields False when the priority
    cannot be changed here.
    """
    if not pids or not hasattr(os, "setpriority"):
        yield False
        return
    tids = [tid for pid in pids for tid in _thread_ids(pid)]
    try:
        for tid in tids:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        for tid in (t for pid in pids for t in _thread_ids(pid)):
            with suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, 0)


class Bench:
    def __init__(
        self, work: Path, candidate: str | None, candidate_level: str, switch_ms: float = 1.0
    ) -> None:
        self.work = work
        self.candidate = candidate
        self.candidate_level = candidate_level
        self.switch_ms = switch_ms
        self.duckdb_path = work / "warehouse.duckdb"
        self.stage_root = work / "stage"
        self.timer = CallTimer()
        self.flow: Any = None
        self.last_flow_run = ""
        self.server: list[int] = []

    def start(self) -> None:
        self.timer.install()
        self.flow = make_flow()
        self.server = server_pids()

    def run_method(self, method: str, project: Path, label: str) -> Run:
        # One target dir per project, shared by the methods: each run finds the same partial-parse
        # state and manifest.json, whichever method ran before it.
        target = self.work / f"target-{label}"
        # Untimed: a full collection of earlier runs' garbage (~0.6 s with dbt and Prefect
        # loaded) would otherwise land in whichever run happens to cross the threshold.
        gc.collect()
        wait_until_idle(self.server)
        server_before = cpu_seconds(self.server)
        with self.timer.collect() as steps:
            cpu_started = own_cpu_seconds()
            call_started = time.perf_counter()
            if method == "bare":
                seconds, nodes = bare_build(project, target)
            elif method == "runner":
                # Outside a flow prefect-dbt prints dbt's INFO lines; keep this report readable.
                with open(os.devnull, "w") as sink, redirect_stdout(sink):
                    seconds, nodes = runner_build(
                        project, target, self.duckdb_path, self.stage_root
                    )
            else:
                out = self.flow(
                    str(project), str(target), str(self.duckdb_path), str(self.stage_root)
                )
                seconds, nodes = out["seconds"], out["nodes"]
                self.last_flow_run = str(out["flow_run_id"])
            call = time.perf_counter() - call_started
            # Untimed: the node task process sends its last events after the build returned;
            # its CPU counts once it has been reaped.
            for thread in threading.enumerate():
                if thread.name.startswith("reap node task process"):
                    thread.join()
            process_cpu = own_cpu_seconds() - cpu_started
        gc_started = time.perf_counter()
        gc.collect()
        steps["gc_after"] = time.perf_counter() - gc_started
        leftover = leftover_node_threads() if method == "postload" else 0
        wait_until_idle(self.server)
        server_after = cpu_seconds(self.server)
        server_cpu = (
            None if server_before is None or server_after is None else server_after - server_before
        )
        return Run(seconds, nodes, steps, call, process_cpu, server_cpu, leftover)

    def measure(self, label: str, project: Path, repeats: int, warm_methods: bool) -> Measured:
        """``repeats`` runs of each method; ``warm_methods``: one untimed run of each first
        (the first project warms up the process: imports, first flow run, first dbt runs)."""
        print(
            f"[{label}] warm-up: a full dbt build"
            + (", then one untimed run of each method" if warm_methods else ""),
            flush=True,
        )
        bare_build(project, self.work / f"target-{label}", select=None)
        if warm_methods:
            first = {m: self.run_method(m, project, label).seconds for m in METHODS}
            runs = ", ".join(f"{m} {seconds:.2f}s" for m, seconds in first.items())
            # A flow-run process pays this once: prefect-dbt's threads hydrate a flow-run context,
            # which imports every installed Prefect collection (prefect-snowflake, ...).
            print(f"[{label}] first run of each method in this process (untimed): {runs}")
        result = Measured(label)
        for rep in range(repeats):
            k = rep % len(METHODS)
            for method in METHODS[k:] + METHODS[:k]:
                run = self.run_method(method, project, label)
                result.seconds[method].append(run.seconds)
                result.process_cpu[method].append(run.process_cpu)
                if run.server_cpu is not None:
                    result.server_cpu[method].append(run.server_cpu)
                if method == "postload":
                    result.flow_call.append(run.call)
                    result.leftover_threads.append(run.leftover_threads)
                for key, value in run.steps.items():
                    result.steps.setdefault(method, {}).setdefault(key, []).append(value)
                if result.nodes not in (0, run.nodes):
                    raise RuntimeError(
                        f"{label}: {method} ran {run.nodes} nodes, not {result.nodes}"
                    )
                result.nodes = run.nodes
            runs = ", ".join(f"{m} {result.seconds[m][-1]:.2f}s" for m in METHODS)
            print(f"[{label}] repeat {rep + 1}/{repeats}: {runs}", flush=True)
        if self.candidate:
            self.measure_candidate(result, project, repeats)
        # Also lets the server record the last run's task runs before the harness stops it.
        result.task_runs = count_task_runs(self.last_flow_run, result.nodes)
        return result

    def measure_candidate(self, result: Measured, project: Path, repeats: int) -> None:
        label = result.project
        if self.candidate == "log-level":
            name = f"postload, log level {self.candidate_level}"
            variant = runner_log_level(self.candidate_level)
        elif self.candidate == "niced-server":
            name = "Prefect server at nice 10"
            variant = niced_server(self.server)
        elif self.candidate == "thread-node-tasks":
            name = "node tasks in threads (POSTLOAD_DBT_NODE_TASKS=thread)"
            variant = thread_node_tasks()
        elif self.candidate == "switch-interval":
            name = f"GIL switch interval {self.switch_ms:g} ms"
            variant = switch_interval(self.switch_ms)
        else:
            name = "Prefect server on a core of its own"
            variant = isolated_server(self.server)
        result.candidate = {"bare": [], name: []}
        with variant as applied:
            if applied is False:
                print(f"[{label}] second round skipped: cannot apply the variant here", flush=True)
                result.candidate = {}
                return
            for rep in range(repeats):
                methods = ["bare", "postload"] if rep % 2 == 0 else ["postload", "bare"]
                for method in methods:
                    seconds = self.run_method(method, project, label).seconds
                    result.candidate["bare" if method == "bare" else name].append(seconds)
        (_, bare_runs), (_, variant_runs) = result.candidate.items()
        print(
            f"[{label}] second round ({name}): bare {statistics.median(bare_runs):.2f}s, "
            f"postload {statistics.median(variant_runs):.2f}s",
            flush=True,
        )


def load_demo_data(duckdb_path: Path, stage_root: Path) -> int:
    from postload.config import load_pipeline_config
    from postload.local.demo_data import DEMO_SOURCES, write_demo_batch
    from postload.warehouse._duckdb import DuckDBWarehouse

    pipeline = load_pipeline_config(ROOT / "postload.yaml")
    warehouse = DuckDBWarehouse(duckdb_path, stage_root, pipeline)
    warehouse.ensure_schema()
    rows = 0
    for source in DEMO_SOURCES:
        write_demo_batch(stage_root, source, 0)
        rows += sum(r.rows_loaded for r in warehouse.load(pipeline.source(source), None))
    return rows


# --------------------------------------------------------------------------- the report


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells))


def breakdown(results: list[Measured]) -> None:
    print("\n== where the time goes (median seconds per run) ==")
    header = ["step"]
    for r in results:
        header += [f"{r.project} runner", f"{r.project} postload"]
    lines = {
        "flow run around the build (flow call - build)": lambda r, m: (
            statistics.median(r.flow_call) - r.median(m) if m == "postload" else 0.0
        ),
        "missing-parents check (catalog + manifest.json)": lambda r, m: r.step(
            m, "missing_parents"
        ),
        "prefect-dbt before dbt starts (profiles.yml etc.)": lambda r, m: (
            r.step(m, "prefect_invoke") - r.step(m, "dbt_invoke") - r.step(m, "after_dbt")
        ),
        "prefect-dbt after dbt returns (callback queue drain)": lambda r, m: r.step(m, "after_dbt"),
        "dbt itself (dbtRunner.invoke)": lambda r, m: r.step(m, "dbt_invoke"),
        "  same, bare (for comparison)": lambda r, m: r.median("bare"),
        "  task creation (_call_task, concurrent with dbt)": lambda r, m: r.step(m, "call_task"),
        "node task runs ending after that (postload joins them)": lambda r, m: r.step(
            m, "node_tasks_finish"
        ),
        "rest of CoreDbtRunner.build (node results)": lambda r, m: (
            r.median(m)
            - r.step(m, "missing_parents")
            - r.step(m, "prefect_invoke")
            - r.step(m, "node_tasks_finish")
        ),
    }
    rows = []
    for label, fn in lines.items():
        row = [label]
        for r in results:
            row += [f"{fn(r, m):.2f}" for m in ("runner", "postload")]
        rows.append(row)
    print_table(header, rows)

    print("\n== CPU per run (median seconds) ==")
    rows = []
    for r in results:
        for m in METHODS:
            process, server = r.cpu("process", m), r.cpu("server", m)
            rows.append(
                [
                    r.project,
                    m,
                    f"{r.median(m):.2f}",
                    "?" if process is None else f"{process:.2f}",
                    "?" if server is None else f"{server:.2f}",
                    f"{r.step(m, 'gc_after'):.2f}",
                ]
            )
    print_table(
        ["project", "method", "wall s", "this process s", "Prefect server s", "full gc after s"],
        rows,
    )
    print(
        "this process: all its threads during the call, and the node task process it forked\n"
        "and waited for (POSTLOAD_DBT_NODE_TASKS=process); Prefect server: the local test server\n"
        "(same 2 cores) from the call until it is idle again — it records task runs, assets and\n"
        "logs from the events and log batches the run sent; full gc after: gc.collect() right\n"
        "after the run (untimed, so no run pays for garbage an earlier one left)."
    )


def report(results: list[Measured]) -> None:
    print("\n== summary: dbt build --select source:events+ (median seconds) ==")
    rows = []
    for r in results:
        rows.append(
            [
                r.project,
                str(r.nodes),
                "?" if r.task_runs is None else str(r.task_runs),
                *(f"{r.median(m):.2f}" for m in METHODS),
                f"{statistics.median(r.flow_call):.2f}",
                f"{r.median('runner') / r.median('bare'):.2f}",
                f"{r.ratio:.2f}",
                f"{r.overhead:+.2f}",
                f"{1000 * r.overhead / max(r.nodes, 1):+.0f}",
                "ok" if r.ratio <= GOAL else "MISSED",
            ]
        )
    print_table(
        [
            "project",
            "nodes",
            "tasks",
            "bare s",
            "runner s",
            "postload s",
            "flow call s",
            "runner/bare",
            "postload/bare",
            "overhead s",
            "ms/node",
            f"goal <= {GOAL}",
        ],
        rows,
    )
    print(
        "nodes: dbt nodes built and tested; tasks: Prefect task runs the server recorded for one\n"
        "postload run; runner: CoreDbtRunner.build outside a flow; postload: the same inside a\n"
        "flow; flow call: the whole flow call; overhead = postload - bare."
    )
    for r in results:
        for m in METHODS:
            print(f"  {r.project} {m} runs: {' '.join(f'{s:.2f}' for s in r.seconds[m])}")
    for r in results:
        left = max(r.leftover_threads, default=0)
        print(
            f"  {r.project}: node task threads alive after a postload flow call: "
            f"{left} at most" + ("" if left == 0 else " (they outlive the build: a regression)")
        )
    breakdown(results)
    if any(r.candidate for r in results):
        print("\n== second round: bare vs postload in a variant (same run) ==")
        rows = []
        for r in results:
            if not r.candidate:
                continue
            (_bare, bare_runs), (name, fix_runs) = r.candidate.items()
            fixed, base = statistics.median(fix_runs), statistics.median(bare_runs)
            rows.append(
                [
                    r.project,
                    name,
                    f"{base:.2f}",
                    f"{fixed:.2f}",
                    f"{fixed / base:.2f}",
                    f"{r.ratio:.2f}",
                    "ok" if fixed / base <= GOAL else "MISSED",
                ]
            )
        print_table(
            [
                "project",
                "variant",
                "bare s",
                "variant s",
                "ratio",
                "first-round ratio",
                f"goal <= {GOAL}",
            ],
            rows,
        )
    if len(results) == 2:
        small, big = results
        print(
            f"\noverhead growth {small.project} -> {big.project} ({small.nodes} -> {big.nodes} "
            f"nodes): {small.overhead:+.2f}s -> {big.overhead:+.2f}s, "
            f"ratio {small.ratio:.2f} -> {big.ratio:.2f}"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the process: {rss:.0f} MiB; load average now: {os.getloadavg()[0]:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke: 1 repeat, 10 models, no second round"
    )
    parser.add_argument("--models", type=int, default=None, help="generated models (default 200)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs per method, demo project (default 3)"
    )
    parser.add_argument(
        "--gen-repeats",
        type=int,
        default=None,
        help="runs per method, generated project (default 3, 1 with --quick; a postload build of "
        "200 models took ~7.4 s on a 2-core machine, 2026-11-27)",
    )
    parser.add_argument("--skip-generated", action="store_true", help="demo project only")
    parser.add_argument(
        "--candidate-kind",
        default="thread-node-tasks",
        choices=[
            "thread-node-tasks",
            "isolated-server",
            "niced-server",
            "log-level",
            "switch-interval",
        ],
        help="second round: node task runs recorded from threads of the dbt process instead of "
        "a forked child (default), or the Prefect server pinned to a core of its own, or "
        "the server at a lower CPU priority (niced-server), or prefect-dbt given --candidate-level for "
        "dbt's events (log-level), or another GIL switch interval (switch-interval)",
    )
    parser.add_argument(
        "--candidate-level",
        default="info",
        choices=["debug", "info", "warn", "error"],
        help="log level for --candidate-kind log-level (default info, prefect-dbt's default; "
        "postload ships warn)",
    )
    parser.add_argument(
        "--candidate-switch-ms",
        type=float,
        default=1.0,
        help="GIL switch interval for --candidate-kind switch-interval, in ms (CPython's default 5)",
    )
    parser.add_argument("--no-candidate", action="store_true", help="skip the second round")
    parser.add_argument(
        "--candidate", action="store_true", help="run the second round even with --quick"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    models = args.models if args.models is not None else (10 if args.quick else 200)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if args.gen_repeats is None:
        args.gen_repeats = 1 if args.quick else 3
    if models < 3 or repeats < 1 or args.gen_repeats < 1:
        parser.error("--models must be >= 3, --repeats and --gen-repeats >= 1")

    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="orchestration-", dir=WORK_ROOT))
    # Before Prefect is imported: its state in the work dir, no analytics, a quiet console
    # (INFO logs still go to the API, as in a real run).
    os.environ.update(
        {
            "PREFECT_HOME": str(work / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
            "DO_NOT_TRACK": "1",
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
            DUCKDB_PATH_ENV: str(work / "warehouse.duckdb"),
        }
    )
    from postload.local.stack import use_local_server_settings

    use_local_server_settings()  # the test server runs as `postload stack` runs its own
    try:
        return run(args, work, models, repeats)
    finally:
        if args.keep:
            print(f"\nwork directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, models: int, repeats: int) -> int:
    import prefect
    from prefect.logging.configuration import setup_logging

    # As in a real flow, Prefect configures logging before dbt is imported: dbt imports
    # snowplow_tracker, whose import-time logging.basicConfig() would otherwise add a root handler
    # that prints every dbt line a second time.
    setup_logging()
    import dbt.version
    from prefect.testing.utilities import prefect_test_harness

    started = time.perf_counter()
    print(
        f"orchestration benchmark: prefect {prefect.__version__}, dbt-core "
        f"{dbt.version.__version__}, {repeats} repeat(s) per method (generated project: {args.gen_repeats}), "
        f"{os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    candidate = not args.no_candidate and (args.candidate or not args.quick)
    bench = Bench(
        work,
        args.candidate_kind if candidate else None,
        args.candidate_level,
        args.candidate_switch_ms,
    )
    rows = load_demo_data(bench.duckdb_path, bench.stage_root)
    print(f"demo data loaded: {rows} rows")
    demo = work / "demo_project"
    shutil.copytree(
        DEMO_PROJECT, demo, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages")
    )
    projects = [("demo", demo, repeats)]
    if not args.skip_generated:
        gen = work / f"generated_{models}"
        shape = generate_project(gen, models)
        print(f"generated project: {', '.join(f'{v} {k}' for k, v in shape.items())}")
        projects.append((f"gen{models}", gen, args.gen_repeats))

    server_started = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=120):
        print(f"Prefect test server up in {time.perf_counter() - server_started:.1f}s (not timed)")
        bench.start()
        results = [
            bench.measure(label, path, n, warm_methods=i == 0)
            for i, (label, path, n) in enumerate(projects)
        ]
        report(results)
        time.sleep(3)  # untimed: let the server flush its event batches before it is stopped
    print(f"total wall time: {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
