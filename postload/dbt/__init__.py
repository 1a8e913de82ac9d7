"""dbt: build the selected work and report per-node results, on dbt Core or dbt Cloud.

* ``DbtProject`` — the project read without building: manifest, the nodes a selection picks, the
  models a build needs that do not exist yet.
* ``open_dbt_runner`` — the runner the settings select:
  dbt Core through prefect-dbt's ``PrefectDbtRunner`` (each node a Prefect task with asset
  lineage; the embedded default, with dbt-duckdb), or a dbt Cloud job triggered through
  prefect-dbt's ``DbtCloudCredentials`` (a source's own job, else the default job), with
  ``steps_override`` carrying the selection, waited on (retried from failure, cancelled when the
  Prefect run goes away), and its steps' ``run_results.json`` read back for per-node results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from postload.config import DbtRunnerKind, Selection, Settings, WarehouseKind
from postload.dbt.project import DbtInvocationError, DbtProject
from postload.dbt.results import DbtBuildError, DbtBuildResult, NodeResult

__all__ = [
    "DbtBuildError",
    "DbtBuildResult",
    "DbtInvocationError",
    "DbtProject",
    "DbtRunner",
    "NodeResult",
    "open_dbt_runner",
]


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
    from postload.dbt.project import warehouse_profile_vars

    runner = CoreDbtRunner(
        project_dir=settings.dbt_project_path,
        duckdb_path=settings.duckdb_file,
        existing_relations=existing_relations,
        node_retries=settings.dbt_node_retries,
        node_retry_delay_seconds=settings.retry_backoff_seconds,
        node_task_mode=settings.dbt_node_tasks,
        warehouse_is_duckdb=settings.warehouse is WarehouseKind.DUCKDB,
        profile_vars=warehouse_profile_vars(settings),
    )
    # Every flow opens its runner first: a profile that would build elsewhere than the warehouse
    # (or a Snowflake block that cannot be loaded) fails the run before it loads anything.
    runner.check_profile()
    return runner
