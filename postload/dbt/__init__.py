"""dbt: build the selected work and report per-node results, on dbt Core or dbt Cloud.

* ``CoreDbtRunner`` — dbt-core through prefect-dbt's ``PrefectDbtRunner`` (each node a Prefect
  task with asset lineage). The embedded default, with dbt-duckdb.
* ``CloudDbtRunner`` — a dbt Cloud job triggered through prefect-dbt's ``DbtCloudCredentials``,
  with ``steps_override`` carrying the selection (or a per-source job), waited on, and its
  ``run_results.json`` read back for per-node results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from postload.config import DbtRunnerKind, Selection, Settings, WarehouseKind
from postload.warehouse import NodeResult

__all__ = ["DbtBuildError", "DbtBuildResult", "DbtRunner", "NodeResult", "open_dbt_runner"]

FAILED_STATUSES = frozenset({"error", "fail", "runtime error"})


@dataclass(frozen=True)
class DbtBuildResult:
    selection: str
    nodes: list[NodeResult] = field(default_factory=list)
    invocation_id: str | None = None
    # dbt Cloud run id / URL, or None for Core
    run_id: int | None = None
    run_url: str | None = None
    message: str | None = None
    # Core: the unique ids each `dbt retry` attempt re-ran (empty when nothing was retried)
    retried: list[list[str]] = field(default_factory=list)

    @property
    def failed_nodes(self) -> list[NodeResult]:
        return [n for n in self.nodes if n.status in FAILED_STATUSES]

    @property
    def nothing_selected(self) -> bool:
        return not self.nodes

    @property
    def status(self) -> str:
        if self.failed_nodes:
            return "error"
        if self.nothing_selected:
            return "nothing_selected"
        return "success"


class DbtBuildError(RuntimeError):
    """dbt ran but models or tests failed; the message names them. Not a transient failure."""

    def __init__(self, result: DbtBuildResult) -> None:
        self.result = result
        names = ", ".join(
            f"{n.name} ({n.status}: {_first_line(n.message)})" for n in result.failed_nodes
        )
        super().__init__(f"dbt build {result.selection} failed: {names or result.message}")


def _first_line(message: str | None) -> str:
    return (
        (message or "").strip().splitlines()[0][:300]
        if message and message.strip()
        else "no message"
    )


class DbtRunner(Protocol):
    kind: str

    def build(
        self, selection: Selection, *, cause: str, job_id: int | None = None
    ) -> DbtBuildResult:
        """Build exactly the selected nodes and wait; raise only for infrastructure failures."""


def open_dbt_runner(
    settings: Settings, existing_relations: Callable[[], set[tuple[str, str]]] | None = None
) -> DbtRunner:
    """The dbt runner the settings select; ``existing_relations`` lets Core build missing parents."""
    if settings.dbt_runner is DbtRunnerKind.CLOUD:
        from postload.dbt._cloud import CloudDbtRunner

        return CloudDbtRunner.from_settings(settings)
    from postload.dbt._core import CoreDbtRunner

    return CoreDbtRunner(
        project_dir=settings.dbt_project_path,
        duckdb_path=settings.duckdb_file,
        existing_relations=existing_relations,
        node_retries=settings.dbt_node_retries,
        node_retry_delay_seconds=settings.retry_backoff_seconds,
        node_task_mode=settings.dbt_node_tasks,
        warehouse_is_duckdb=settings.warehouse is WarehouseKind.DUCKDB,
    )
