"""transform-on-sync: build what changed, once, when Fivetran (or a COPY load) says data landed.

Woken by deployment triggers on ``fivetran.sync.succeeded`` and ``postload.source.loaded`` events
and by a sweep schedule. It never trusts the waking event for what to build: it reads each
source's watermark in the warehouse, builds every pending source in one dbt invocation, and
checks again before finishing, so syncs that landed meanwhile get exactly one follow-up build.
A sync whose event arrives after that last check wakes a run that waits for this one to end
(one run at a time, ``ENQUEUE``); the first waiting run to start cancels the others it covers.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from postload.config import PipelineConfig, Settings
from postload.dbt import DbtBuildError, DbtBuildResult, DbtProject, DbtRunner, open_dbt_runner
from postload.hooks import flow_options, timed_out_as_timeout
from postload.plan import TransformPlan, plan_transform
from postload.report import publish_status, transform_on_sync_markdown
from postload.retries import build_retry_options
from postload.runs import record_build, supersede_waiting_runs
from postload.sources import SourceTable, tables_for
from postload.warehouse import Warehouse, open_warehouse, utcnow
from postload.writer import warehouse_writer


@task(name="plan", cache_policy=NO_CACHE)
def plan(
    warehouse: Warehouse,
    pipeline: PipelineConfig,
    tables: dict[str, list[SourceTable]],
    project: DbtProject,
    only: list[str] | None,
) -> TransformPlan | None:
    every_table = [t for source_tables in tables.values() for t in source_tables]
    return plan_transform(
        pipeline, tables, warehouse.watermarks(every_table), project.model_names, only=only
    )


@task(name="transform", cache_policy=NO_CACHE)
def transform(runner: DbtRunner, plan: TransformPlan, cause: str) -> DbtBuildResult:
    return runner.build(plan.selection, cause=cause)


@flow(name="transform-on-sync", **flow_options())
@timed_out_as_timeout
def transform_on_sync(
    connector_id: str | None = None,
    sync_id: str | None = None,
    reason: str = "sweep",
    sources: list[str] | None = None,
) -> dict[str, Any]:
    """Build the dbt models downstream of every table with new rows (none if nothing changed).

    ``sources``: only these sources' pending tables (``postload transform SOURCE...``).
    """
    logger = get_run_logger()
    settings = Settings()
    pipeline = settings.load_pipeline()
    if connector_id is not None and not pipeline.sources_for_connector(connector_id):
        return _unknown_connector(connector_id, sync_id, pipeline)
    for name in sources or []:
        pipeline.source(name)  # an unknown name fails here, listing the known ones

    warehouse = open_warehouse(settings, pipeline)
    runner = open_dbt_runner(settings, existing_relations=warehouse.relations)
    project = DbtProject.from_settings(settings)
    tables = tables_for(settings, pipeline)
    if reason != "sweep" and settings.sync_debounce_seconds:
        # A short debounce: syncs finishing together land in this run instead of a follow-up.
        time.sleep(settings.sync_debounce_seconds)
    if superseded := supersede_waiting_runs():
        logger.info("covers the events of %d waiting run(s): %s", len(superseded), superseded)

    builds: list[dict[str, Any]] = []
    with warehouse_writer(settings):
        warehouse.ensure_schema()
        for _ in range(settings.sync_max_rounds):
            todo = plan(warehouse, pipeline, tables, project, sources)
            if todo is None:
                if not builds:
                    logger.info(
                        "nothing to transform: every table's newest rows are covered by a "
                        "successful build (a sync that changed nothing, a redelivered event, or "
                        "rows an earlier build already covered)"
                    )
                break
            started_at = utcnow()
            build = transform.with_options(**build_retry_options(settings))(
                runner, todo, cause=f"postload: {reason} ({', '.join(todo.source_names)})"
            )
            record_build(
                warehouse,
                sources=todo.sources,
                runner=runner.kind,
                build=build,
                started_at=started_at,
                completed_at=utcnow(),
                covers=todo.covers,
                tables=todo.tables,
            )
            builds.append(
                {"sources": todo.source_names, "selection": build.selection, "status": build.status}
            )
            if build.status == "error":
                raise DbtBuildError(build)
        if builds:
            publish_status(warehouse, tables)
    create_markdown_artifact(
        key="transform-on-sync",
        markdown=transform_on_sync_markdown(reason, builds),
    )
    return {"builds": builds}


def _unknown_connector(
    connector_id: str, sync_id: str | None, pipeline: PipelineConfig
) -> dict[str, Any]:
    known = sorted(
        {s.loader.connector_id for s in pipeline.sources if s.loader.type == "fivetran"}  # type: ignore[union-attr]
    )
    get_run_logger().warning(
        "Fivetran connector %r is not in the pipeline config (known: %s): nothing to run",
        connector_id,
        ", ".join(known) or "none",
    )
    emit_event(
        "postload.connector.unknown",
        resource={"prefect.resource.id": f"fivetran.connector.{connector_id}"},
        payload={"connector_id": connector_id, "sync_id": sync_id, "known": known},
    )
    create_markdown_artifact(
        key="unknown-connector",
        markdown=f"Fivetran connector `{connector_id}` (sync `{sync_id}`) is not mapped to any "
        "source in postload.yaml, so nothing ran. Add a source with "
        f"`loader: {{type: fivetran, connector_id: {connector_id}}}`.",
    )
    return {"builds": [], "unknown_connector": connector_id}


if __name__ == "__main__":
    transform_on_sync()
