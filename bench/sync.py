"""Webhook → dbt on the served stack: start latency (P1) and burst coalescing (P4).

The real path, every part a separate process on loopback, as a user runs it:

    signed POST ──> receiver (outbox) ──> Prefect API /events ──> trigger (prefect.yaml)
        ──> flow run ──> `serve` runner (polls every --poll s) ──> subprocess ──> transform-on-sync
        ──> warehouse watermarks ──> dbt build (PrefectDbtRunner) ──> first node starts

* **latency** (P1): ``--events`` times, land a new ``events`` batch in the warehouse (what a
  Fivetran sync does), post its signed ``sync_end`` and measure post → first dbt node start.
  Broken down with the flow run's own timestamps: post → run created (receiver, forwarding,
  trigger service), created → flow running (runner poll, subprocess start, engine), running →
  first node (imports, settings, debounce, plan, dbt parse).
* **burst** (P4): a generated dbt project with 20 sources (``stg_k`` per source, ``mart_k`` joins
  sources k and k+1). For K = 1, 5, 20: land K sources, post K webhooks at once, wait until
  every run is over, count dbt invocations (goal ≤ 2) and compare the models built with the union
  of the K sources' downstream closures (goal: equal).

``--runner worker`` (or ``both``, side by side) measures latency on prefect.yaml's work-pool path
instead: ``prefect deploy`` to the process pool, ``prefect worker start`` in place of ``serve``.

The Prefect server is a ``prefect_test_harness`` subprocess (startup not timed). Nothing leaves
the machine. Work files go to ``bench/.work/sync-*`` (removed unless ``--keep``).

The fault suite, tests/system/faults.py, imports this module's stack helpers (home, land, Proc,
waits); it gates CI, so a change here must keep ``make faults-quick`` passing.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import httpx
import yaml

# The checkout first: flows/ (imported by bootstrap and fresh) is not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from postload.local.stack import use_local_server_settings

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-sync-secret-3b1f"
DEPLOYMENT = "transform-on-sync"
FULL_RUN = "full-run-when-fresh"
READY_TIMEOUT = 120.0

use_local_server_settings()  # the test server runs as `postload stack` runs its own
os.environ.setdefault("DO_NOT_TRACK", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the postload home: pipeline config, dbt project, warehouse --------------------------------


def demo_home(root: Path) -> Path:
    """The demo project with every source fed by a (simulated) Fivetran connector."""
    root.mkdir(parents=True)
    config = yaml.safe_load((ROOT / "postload.yaml").read_text())
    for source in config["sources"]:
        source["loader"] = {"type": "fivetran", "connector_id": f"conn_{source['name']}"}
    (root / "postload.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copytree(
        ROOT / "dbt_project",
        root / "dbt_project",
        ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"),
    )
    return root


def generated_home(root: Path, sources: int) -> Path:
    """``sources`` sources s0..s{n-1}; ``stg_k`` reads s_k, ``mart_k`` joins stg_k and stg_k+1."""
    project = root / "dbt_project"
    models = project / "models"
    models.mkdir(parents=True)
    shutil.copy(ROOT / "dbt_project" / "profiles.yml", project / "profiles.yml")
    (project / "dbt_project.yml").write_text(
        "name: gen\nversion: '1.0.0'\nprofile: postload\nmodel-paths: [models]\n"
        "flags: {send_anonymous_usage_stats: false}\n"
        "models: {gen: {+materialized: view}}\n"
    )
    (models / "sources.yml").write_text(
        yaml.safe_dump(
            {
                "version": 2,
                "sources": [
                    {
                        "name": f"s{k}",
                        "schema": "raw",
                        "loaded_at_field": "_loaded_at",
                        "freshness": {"warn_after": {"count": 1, "period": "day"}},
                        "tables": [{"name": f"t{k}"}],
                    }
                    for k in range(sources)
                ],
            }
        )
    )
    for k in range(sources):
        (models / f"stg_{k}.sql").write_text(
            f"select cast(record->>'id' as bigint) as id, _loaded_at from {{{{ source('s{k}', 't{k}') }}}}\n"
        )
        nxt = (k + 1) % sources
        (models / f"mart_{k}.sql").write_text(
            "{{ config(materialized='table') }}\n"
            f"select a.id, a._loaded_at from {{{{ ref('stg_{k}') }}}} a "
            f"join {{{{ ref('stg_{nxt}') }}}} b using (id)\n"
        )
    config = {
        "version": 1,
        "raw_schema": "raw",
        "ops_schema": "ops",
        "sources": [
            {
                "name": f"s{k}",
                "raw_table": f"t{k}",
                "stage": f"s{k}",
                "loader": {"type": "fivetran", "connector_id": f"conn_s{k}"},
            }
            for k in range(sources)
        ],
    }
    (root / "postload.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def closure(chosen: list[int], sources: int) -> set[str]:
    """Models downstream of the chosen sources in the generated project."""
    out: set[str] = set()
    for k in chosen:
        out |= {f"stg_{k}", f"mart_{k}", f"mart_{(k - 1) % sources}"}
    return out


def land(home: Path, source: str, batch: int, *, generated: bool) -> None:
    """What a Fivetran sync does: new rows in the raw table (through the DuckDB loader)."""
    from postload.config import Settings
    from postload.local.demo_data import write_demo_batch
    from postload.warehouse._duckdb import DuckDBWarehouse

    settings = Settings(project_dir=home)
    stage = settings.stage_root_path
    if generated:
        folder = stage / source
        folder.mkdir(parents=True, exist_ok=True)
        lines = (json.dumps({"id": batch * 1000 + i}) for i in range(20))
        (folder / f"{source}_{batch:04d}.jsonl").write_text("\n".join(lines) + "\n")
    else:
        write_demo_batch(stage, source, batch)
    pipeline = settings.load_pipeline()
    warehouse = DuckDBWarehouse(settings.duckdb_file, stage, pipeline)
    with _writer(settings):  # a served run may be writing: DuckDB has one writer per file
        warehouse.ensure_schema()
        warehouse.load(pipeline.source(source), None)


@contextmanager
def _writer(settings: Any) -> Iterator[None]:
    from postload.writer import warehouse_writer

    with warehouse_writer(settings):
        yield


def query(home: Path, sql: str, params: list[Any] | None = None) -> list[tuple]:
    con = duckdb.connect(str(home / ".postload" / "warehouse.duckdb"), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


# --- processes ------------------------------------------------------------------------------


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], work: Path) -> None:
        self.log = work / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=out)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.log.name} exited:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


POSTLOAD = str(Path(sys.executable).with_name("postload"))


@dataclass
class Stack:
    api_url: str
    home: Path
    receiver_url: str
    deployment_id: uuid.UUID
    procs: list[Proc]

    def post(self, connector_id: str, status: str = "SUCCESSFUL") -> float:
        body = json.dumps(
            {
                "event": "sync_end",
                "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "connector_type": "postgres",
                "connector_id": connector_id,
                "connector_name": connector_id,
                "sync_id": str(uuid.uuid4()),
                "destination_group_id": "bench",
                "data": {"status": status},
            }
        ).encode()
        signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        posted = time.time()
        response = httpx.post(
            f"{self.receiver_url}/webhooks/fivetran",
            content=body,
            headers={"Content-Type": "application/json", "X-Fivetran-Signature-256": signature},
        )
        response.raise_for_status()
        return posted

    def runs(self) -> list[Any]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[self.deployment_id]))
            )

    def settle(self, known: set[uuid.UUID], want_new: int, timeout: float = 300.0) -> list[Any]:
        """Wait until at least ``want_new`` runs beyond ``known`` exist and all runs are final."""
        deadline = time.monotonic() + timeout
        while True:
            for proc in self.procs:
                proc.alive()
            runs = self.runs()
            new = [r for r in runs if r.id not in known]
            if len(new) >= want_new and all(r.state and r.state.is_final() for r in runs):
                return new
            if time.monotonic() > deadline:
                states = [(str(r.id)[:8], r.state_name) for r in runs]
                raise RuntimeError(f"runs did not settle in {timeout}s: {states}")
            time.sleep(0.2)


@contextmanager
def served_stack(
    work: Path,
    home: Path,
    api_url: str,
    poll: float,
    *,
    warm: bool = True,
    deployment: str = DEPLOYMENT,
) -> Iterator[Stack]:
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "POSTLOAD_PROJECT_DIR": str(home),
        "PREFECT_RUNNER_POLL_FREQUENCY": str(poll),
        "POSTLOAD_FIVETRAN_WEBHOOK_SECRET": SECRET,
    }
    procs = [
        Proc("receiver", [POSTLOAD, "receiver", "--port", str(port)], env, work),
        Proc(
            "serve",
            [
                POSTLOAD,
                "serve",
                "--only",
                deployment,
                "--no-schedules",
                "--warm" if warm else "--no-warm",
            ],
            env,
            work,
        ),
    ]
    try:
        deployment_id = wait_for_deployment(procs, deployment)
        receiver_url = f"http://127.0.0.1:{port}"
        wait_healthy(receiver_url, procs)
        yield Stack(api_url, home, receiver_url, deployment_id, procs)
    finally:
        for proc in procs:
            proc.stop()


def wait_for_deployment(procs: list[Proc], deployment: str) -> uuid.UUID:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + READY_TIMEOUT
    with get_client(sync_client=True) as client:
        while True:
            for proc in procs:
                proc.alive()
            try:
                return client.read_deployment_by_name(f"{deployment}/{deployment}").id
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)


def wait_healthy(url: str, procs: list[Proc]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        for proc in procs:
            proc.alive()
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("receiver not healthy")
        time.sleep(0.1)


def bootstrap(home: Path, sources: list[str], *, generated: bool) -> None:
    """First load + build of everything, in this process, so later runs see only new data."""
    from flows.transform_on_sync import transform_on_sync

    for source in sources:
        land(home, source, 1, generated=generated)
    transform_on_sync(reason="sweep")


# --- the two measurements --------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def timing_row(posted: float, run: Any, node: datetime) -> dict[str, float]:
    """Where the time from the webhook post to the first dbt node went, from the run's stamps."""
    return {
        "created": run.created.timestamp() - posted,
        "running": run.start_time.timestamp() - run.created.timestamp(),
        "first_node": node.timestamp() - run.start_time.timestamp(),
        "total": node.timestamp() - posted,
    }


def describe_row(row: dict[str, float]) -> str:
    return (
        f"{row['total']:.2f} s (→created {row['created']:.2f}, →running {row['running']:.2f}, "
        f"→node {row['first_node']:.2f})"
    )


def print_timings(rows: list[dict[str, float]], labels: dict[str, str], indent: str = "  ") -> None:
    print(f"{indent}{'part':<44} {'p50 s':>7} {'p95 s':>7}")
    for key, label in labels.items():
        values = [r[key] for r in rows]
        print(f"{indent}{label:<44} {statistics.median(values):>7.2f} {pct(values, 0.95):>7.2f}")


def first_node_started(home: Path, flow_run_id: uuid.UUID) -> datetime | None:
    rows = query(
        home,
        "select min(started_at) from ops.dbt_run_results where flow_run_id = ?",
        [str(flow_run_id)],
    )
    moment = rows[0][0] if rows else None
    return moment.replace(tzinfo=UTC) if moment else None


def latency(
    args: argparse.Namespace, work: Path, api_url: str
) -> dict[str, list[dict[str, float]]]:
    home = demo_home(work / "demo")
    os.environ["POSTLOAD_PROJECT_DIR"] = str(home)
    os.environ["POSTLOAD_SYNC_DEBOUNCE_SECONDS"] = str(args.debounce)
    bootstrap(home, ["customers", "orders", "events"], generated=False)
    results: dict[str, list[dict[str, float]]] = {}
    batch = 100
    for start in args.start:
        print(
            f"\n{start} start: serve {'forks each run from a warm process' if start == 'warm' else 'spawns a fresh interpreter per run'}"
        )
        rows = results.setdefault(start, [])
        with served_stack(work, home, api_url, args.poll, warm=start == "warm") as stack:
            known = {r.id for r in stack.runs()}
            for i in range(args.events):
                batch += 1
                land(home, "events", batch, generated=False)
                posted = stack.post("conn_events")
                (run,) = stack.settle(known, 1)
                known.add(run.id)
                node = first_node_started(home, run.id)
                if run.state_name != "Completed" or node is None:
                    raise RuntimeError(f"run {run.id} ended {run.state_name}, first node {node}")
                rows.append(timing_row(posted, run, node))
                print(
                    f"  event {i + 1:>2}: post→first dbt node {describe_row(rows[-1])}", flush=True
                )
    print(
        f"\nP1 webhook → first dbt node, {args.events} events per start method, "
        f"debounce {args.debounce} s, runner poll {args.poll} s"
    )
    for start, rows in results.items():
        print(f"  {start} start")
        print_timings(
            rows,
            {
                "created": "post → flow run created (receiver+trigger)",
                "running": "created → flow running (poll+subprocess)",
                "first_node": "running → first dbt node (flow body+dbt)",
                "total": "TOTAL post → first dbt node",
            },
            indent="    ",
        )
        p50 = statistics.median(r["total"] for r in rows)
        p95 = pct([r["total"] for r in rows], 0.95)
        verdict = "met" if p50 <= 5 and p95 <= 10 else "MISSED"
        print(f"    goal p50 ≤ 5 s, p95 ≤ 10 s: {verdict}")
    if {"warm", "cold"} <= results.keys():
        warm = statistics.median(r["total"] for r in results["warm"])
        cold = statistics.median(r["total"] for r in results["cold"])
        print(f"  warm/cold p50 ratio, same run: {warm / cold:.2f}")
    return results


def make_stale(home: Path, source: str, *, days: int = 3) -> None:
    """Age a source's rows past its dbt freshness limit (as if it had not loaded for days)."""
    from postload.config import Settings

    settings = Settings(project_dir=home)
    with _writer(settings):
        con = duckdb.connect(str(settings.duckdb_file))
        try:
            con.execute(
                f"update raw.{source} set _loaded_at = _loaded_at - interval {int(days)} day"
            )
        finally:
            con.close()


def fresh(args: argparse.Namespace, work: Path, api_url: str) -> None:
    """Last tracked source becomes fresh → its sync event → full build's first node."""
    from flows.full_run_when_fresh import full_run_when_fresh

    home = demo_home(work / "demo")
    os.environ["POSTLOAD_PROJECT_DIR"] = str(home)
    bootstrap(home, ["customers", "orders", "events"], generated=False)
    full_run_when_fresh(reason="sweep")  # the first generation, so each sample is a new one
    rows: list[dict[str, float]] = []
    batch = 500
    with served_stack(work, home, api_url, args.poll, deployment=FULL_RUN) as stack:
        known = {r.id for r in stack.runs()}
        for i in range(args.events):
            batch += 1
            make_stale(home, "events")  # customers and orders are fresh, events is not
            land(home, "events", batch, generated=False)  # now every source is fresh
            posted = stack.post("conn_events")
            new = stack.settle(known, 1)
            known |= {r.id for r in new}
            built = [(r, first_node_started(home, r.id)) for r in new]
            built = [(r, node) for r, node in built if node is not None]
            if len(built) != 1 or built[0][0].state_name != "Completed":
                states = [(r.state_name, str(r.id)[:8]) for r in new]
                raise RuntimeError(f"expected one completed full build, got {states}")
            run, node = built[0]
            rows.append(timing_row(posted, run, node))
            print(
                f"  sample {i + 1:>2}: sync event→full build's first node {describe_row(rows[-1])}"
            )
    print(f"\nFull run: last source fresh → full build starts, {len(rows)} samples")
    print_timings(
        rows,
        {
            "created": "post → flow run created (receiver+trigger)",
            "running": "created → flow running (poll+fork)",
            "first_node": "running → first dbt node (freshness+dbt)",
            "total": "TOTAL post → first dbt node",
        },
    )
    p50 = statistics.median(r["total"] for r in rows)
    print(f"  goal ≤ 5 s when woken by its event: {'met' if p50 <= 5 else 'MISSED'} (p50)")


def burst(args: argparse.Namespace, work: Path, api_url: str) -> None:
    sources = max(args.burst)
    home = generated_home(work / "gen", sources)
    os.environ["POSTLOAD_PROJECT_DIR"] = str(home)
    os.environ["POSTLOAD_SYNC_DEBOUNCE_SECONDS"] = str(args.debounce)
    names = [f"s{k}" for k in range(sources)]
    bootstrap(home, names, generated=True)
    results = []
    with served_stack(work, home, api_url, args.poll) as stack:
        known = {r.id for r in stack.runs()}
        for round_no, k in enumerate(args.burst, start=2):
            chosen = list(range(k))
            for index in chosen:
                land(home, f"s{index}", round_no, generated=True)
            started = time.monotonic()
            for index in chosen:
                stack.post(f"conn_s{index}")
            new = stack.settle(known, 1)
            # a run may still be created after the others ended (the trigger lags): settle again
            time.sleep(args.quiet)
            new += [r for r in stack.settle(known | {r.id for r in new}, 0)]
            known |= {r.id for r in new}
            elapsed = time.monotonic() - started
            ids = [str(r.id) for r in new]
            marks = ",".join("?" * len(ids))
            invocations = query(
                home,
                f"select count(distinct invocation_id) from ops.dbt_run_results "
                f"where flow_run_id in ({marks})",
                ids,
            )[0][0]
            built = {
                name
                for (name,) in query(
                    home,
                    f"select distinct name from ops.dbt_run_results where flow_run_id in ({marks}) "
                    "and resource_type = 'model'",
                    ids,
                )
            }
            expected = closure(chosen, sources)
            states: dict[str, int] = {}
            for r in new:
                states[r.state_name] = states.get(r.state_name, 0) + 1
            results.append((k, len(new), states, invocations, built, expected, elapsed))
            print(
                f"  K={k}: {len(new)} runs {states}, {invocations} dbt invocations, "
                f"{len(built)} models built / {len(expected)} in the union, {elapsed:.1f} s",
                flush=True,
            )
    print(f"\nP4 burst coalescing (debounce {args.debounce} s)")
    print(
        f"  {'K':>3} {'runs':>5} {'dbt invocations':>16} {'built':>6} {'union':>6} "
        f"{'missing':>8} {'extra':>6} {'goal':>7}"
    )
    for k, runs, _states, invocations, built, expected, _ in results:
        ok = invocations <= 2 and built == expected
        print(
            f"  {k:>3} {runs:>5} {invocations:>16} {len(built):>6} {len(expected):>6} "
            f"{len(expected - built):>8} {len(built - expected):>6} {'met' if ok else 'MISSED':>7}"
        )


# --- the work-pool path (--runner worker) ------------------------------------------------------

POOL = "postload-local"  # prefect.yaml's process pool
PREFECT = str(Path(sys.executable).with_name("prefect"))


def worker_home(root: Path) -> Path:
    """The demo home, plus what a worker's flow runs import from POSTLOAD_PROJECT_DIR (the pull
    step changes into it): flows/ and prefect.yaml."""
    home = demo_home(root)
    shutil.copytree(ROOT / "flows", home / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", home / "prefect.yaml")
    return home


def _prefect_cli(argv: list[str], cwd: Path, api_url: str, **extra: str) -> None:
    """A Prefect CLI command as a person runs it against this server: none of this process's
    PREFECT_* or POSTLOAD_* settings (POSTLOAD_PROJECT_DIR would be stored in the pull step)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "POSTLOAD_"))}
    env.update(PREFECT_API_URL=api_url, PREFECT_CLI_PROMPT="false", **extra)
    result = subprocess.run(
        [PREFECT, *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if result.returncode:
        raise RuntimeError(f"prefect {' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}")


@contextmanager
def worker_stack(
    work: Path, home: Path, api_url: str, poll: float, deployment: str = DEPLOYMENT
) -> Iterator[Stack]:
    """prefect.yaml's work-pool path: the process pool, `prefect deploy` of the deployment (its
    sweep schedule paused, as `serve --no-schedules`), a receiver and `prefect worker start`."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    version = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(POOL)
        except ObjectNotFound:
            _prefect_cli(["work-pool", "create", POOL, "--type", "process"], home, api_url)
    _prefect_cli(
        ["--no-prompt", "deploy", "--name", deployment], home, api_url, POSTLOAD_VERSION=version
    )
    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(f"{deployment}/{deployment}").id
        for schedule in client.read_deployment_schedules(deployment_id):
            client.update_deployment_schedule(deployment_id, schedule.id, active=False)

    port = free_port()
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "POSTLOAD_PROJECT_DIR": str(home),
        "PREFECT_WORKER_QUERY_SECONDS": str(poll),  # as the runner's poll
        "POSTLOAD_FIVETRAN_WEBHOOK_SECRET": SECRET,
    }
    procs = [
        Proc("receiver", [POSTLOAD, "receiver", "--port", str(port)], env, work),
        Proc("worker", [PREFECT, "worker", "start", "--pool", POOL], env, work),
    ]
    try:
        receiver_url = f"http://127.0.0.1:{port}"
        wait_healthy(receiver_url, procs)
        deadline = time.monotonic() + READY_TIMEOUT
        with get_client(sync_client=True) as client:
            while not any(
                w.status.value == "ONLINE" for w in client.read_workers_for_work_pool(POOL)
            ):
                for proc in procs:
                    proc.alive()
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker did not come online")
                time.sleep(0.2)
        yield Stack(api_url, home, receiver_url, deployment_id, procs)
    finally:
        for proc in procs:
            proc.stop()


def worker_latency(args: argparse.Namespace, work: Path, api_url: str) -> list[dict[str, float]]:
    """P1 on the work-pool path: the same samples as ``latency``, a worker instead of serve."""
    home = worker_home(work / "demo")
    os.environ["POSTLOAD_PROJECT_DIR"] = str(home)
    os.environ["POSTLOAD_SYNC_DEBOUNCE_SECONDS"] = str(args.debounce)
    bootstrap(home, ["customers", "orders", "events"], generated=False)
    print(
        "\nworker: `prefect worker start --pool postload-local` runs each flow run in a new process"
    )
    rows: list[dict[str, float]] = []
    batch = 100
    with worker_stack(work, home, api_url, args.poll) as stack:
        known = {r.id for r in stack.runs()}
        for i in range(args.events):
            batch += 1
            land(home, "events", batch, generated=False)
            posted = stack.post("conn_events")
            (run,) = stack.settle(known, 1)
            known.add(run.id)
            node = first_node_started(home, run.id)
            if run.state_name != "Completed" or node is None:
                raise RuntimeError(f"run {run.id} ended {run.state_name}, first node {node}")
            rows.append(timing_row(posted, run, node))
            print(f"  event {i + 1:>2}: post→first dbt node {describe_row(rows[-1])}", flush=True)
    return rows


RUNNER_LABELS = {
    "created": "post → flow run created (receiver+trigger)",
    "running": "created → flow running (poll+process+pull)",
    "first_node": "running → first dbt node (flow body+dbt)",
    "total": "TOTAL post → first dbt node",
}


def print_runners(served: list[dict[str, float]], worker: list[dict[str, float]]) -> None:
    """P1 on both runners, side by side (serve: warm start, postload's default)."""
    print(f"\nP1 by runner, same run: serve (warm, {len(served)} events) vs worker ({len(worker)})")
    print(f"  {'part':<44} {'serve p50':>9} {'p95':>6} {'worker p50':>10} {'p95':>6}")
    for key, label in RUNNER_LABELS.items():
        a, b = [r[key] for r in served], [r[key] for r in worker]
        print(
            f"  {label:<44} {statistics.median(a):>9.2f} {pct(a, 0.95):>6.2f} "
            f"{statistics.median(b):>10.2f} {pct(b, 0.95):>6.2f}"
        )
    p50 = statistics.median(r["total"] for r in worker)
    p95 = pct([r["total"] for r in worker], 0.95)
    print(f"  worker: goal p50 ≤ 5 s, p95 ≤ 10 s: {'met' if p50 <= 5 and p95 <= 10 else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mode",
        choices=["latency", "burst", "fresh", "both", "all"],
        default="both",
        help="latency (P1), burst (P4), fresh (last source fresh → full build start), "
        "both = P1+P4 (default), all",
    )
    parser.add_argument("--events", type=int, default=20, help="latency samples (default 20)")
    parser.add_argument("--burst", type=int, nargs="+", default=[1, 5, 20], help="K values")
    parser.add_argument("--poll", type=float, default=1.0, help="runner poll seconds (default 1)")
    parser.add_argument(
        "--debounce",
        type=float,
        default=None,
        help="POSTLOAD_SYNC_DEBOUNCE_SECONDS (default: the setting's default)",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=3.0,
        help="seconds without new runs before a burst counts as over",
    )
    parser.add_argument(
        "--start",
        nargs="+",
        choices=["warm", "cold"],
        default=["warm", "cold"],
        help="how serve starts flow runs: warm (forked from a preloaded process, the default) "
        "and/or cold (a fresh interpreter, Prefect's own way); latency measures each",
    )
    parser.add_argument(
        "--runner",
        choices=["serve", "worker", "both"],
        default="serve",
        help="what runs the flow runs in latency (P1): serve (default), worker (prefect.yaml's "
        "process work pool and `prefect worker start`), or both, printed side by side",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.debounce is None:
        from postload.config import Settings

        args.debounce = Settings.model_fields["sync_debounce_seconds"].default

    from prefect.testing.utilities import prefect_test_harness

    (ROOT / "bench" / ".work").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sync-", dir=ROOT / "bench" / ".work"))
    try:
        with prefect_test_harness(server_startup_timeout=180):
            from prefect.settings import PREFECT_API_URL

            api_url = PREFECT_API_URL.value()
            if args.mode in ("latency", "both", "all"):
                served = {}
                if args.runner in ("serve", "both"):
                    served = latency(args, work / "latency", api_url)
                if args.runner in ("worker", "both"):
                    worker = worker_latency(args, work / "latency-worker", api_url)
                    if "warm" in served:
                        print_runners(served["warm"], worker)
                    else:
                        print(f"\nP1 webhook → first dbt node on the worker, {len(worker)} events")
                        print_timings(worker, RUNNER_LABELS)
            if args.mode in ("burst", "both", "all"):
                burst(args, work / "burst", api_url)
            if args.mode in ("fresh", "all"):
                fresh(args, work / "fresh", api_url)
    finally:
        if args.keep:
            print(f"work files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
