"""dbt Core through prefect-dbt's ``PrefectDbtRunner``.

Inside a flow run every dbt node becomes a Prefect task with its asset lineage; outside one (the
benchmarks, ``postload plan``) the same runner just runs dbt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dbt.artifacts.schemas.results import RunStatus, TestStatus
from dbt.cli.main import dbtRunner
from dbt.contracts.results import RunExecutionResult
from prefect_dbt import PrefectDbtRunner, PrefectDbtSettings

from postload.config import Selection
from postload.dbt import DbtBuildResult, NodeResult

# The checked-in profiles.yml reads the warehouse path from this variable — the same one Settings
# reads — so users can run plain `dbt` against the same file by exporting it.
DUCKDB_PATH_ENV = "POSTLOAD_DUCKDB_PATH"


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
    ) -> None:
        self.project_dir = project_dir
        self.duckdb_path = duckdb_path
        self.target_path = target_path or project_dir / "target"
        self.existing_relations = existing_relations

    def _runner(self) -> PrefectDbtRunner:
        settings = PrefectDbtSettings(
            project_dir=self.project_dir,
            profiles_dir=self.project_dir,
            target_path=self.target_path,
        )
        return PrefectDbtRunner(settings=settings, raise_on_failure=False)

    def invoke(self, args: list[str]) -> Any:
        """Run a dbt command through PrefectDbtRunner (nodes become Prefect tasks in a flow run)."""
        try:
            with _profile_env(self.duckdb_path):
                return self._runner().invoke(args)
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
        nodes += [node_result(r) for r in execution.results]
        invocation_id = (execution.args or {}).get("invocation_id") if execution.args else None
        return DbtBuildResult(
            selection=selection.describe(),
            nodes=nodes,
            invocation_id=invocation_id or _invocation_id(),
            message=(
                f"built missing parents first: {', '.join(missing)}"
                if missing
                else None
                if nodes
                else "the selection matched no dbt nodes"
            ),
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
        return json.loads(path.read_text(encoding="utf-8"))

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
