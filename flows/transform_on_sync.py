"""transform-on-sync: build what changed, once, when Fivetran (or a COPY load) says data landed.

Woken by deployment triggers on ``fivetran.sync.succeeded`` and ``postload.source.loaded`` events
and by a sweep schedule. It never trusts the waking event for what to build: it reads each
source's watermark in the warehouse, builds every pending source in one dbt invocation (on dbt
Cloud: one run per job, each source's ``dbt_cloud_job_id`` else the default job), and checks
again before finishing, so syncs that landed meanwhile get exactly one follow-up build.
A sync whose event arrives after that last check wakes a run that waits for this one to end
(one run at a time, ``ENQUEUE``); the first waiting run to start cancels the others it covers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from postload.checkout import warn_if_checkout_differs
from postload.config import DbtRunnerKind, PipelineConfig, Settings, SourceConfig
from postload.dbt import DbtBuildError, DbtBuildResult, DbtProject, DbtRunner, open_dbt_runner
from postload.hooks import flow_options, timed_out_as_timeout
from postload.plan import BuildGroup, TransformPlan, plan_transform
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
    default_job: int | None,
    cloud: bool,
) -> TransformPlan | None:
    every_table = [t for source_tables in tables.values() for t in source_tables]

    def job_of(source: SourceConfig) -> int | None:
        return source.dbt_cloud_job_id or default_job

    return plan_transform(
        pipeline,
        tables,
        warehouse.watermarks(every_table),
        project.model_names,
        only=only,
        job_of=job_of if cloud else None,
    )


@task(name="transform", cache_policy=NO_CACHE)
def transform(runner: DbtRunner, group: BuildGroup, cause: str) -> DbtBuildResult:
    return runner.build(group.selection, cause=cause, job_id=group.job_id)


def check_cloud_jobs(todo: TransformPlan, cloud: bool) -> None:
    """Refuse, before any run, a plan with sources no dbt Cloud job builds."""
    jobless = [s.name for g in todo.groups if cloud and g.job_id is None for s in g.sources]
    if jobless:
        raise ValueError(
            f"no dbt Cloud job builds source(s) {', '.join(jobless)}: expected "
            "'dbt_cloud_job_id' on each in the pipeline config, or a default job in "
            "POSTLOAD_DBT_CLOUD_JOB_ID (each job runs 'dbt build <selection>' through "
            "steps_override, in its own environment)"
        )


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
    warn_if_checkout_differs(settings.project_dir)
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

    cloud = settings.dbt_runner is DbtRunnerKind.CLOUD
    builds: list[dict[str, Any]] = []
    failures: list[Exception] = []
    with warehouse_writer(settings):
        warehouse.ensure_schema()
        for _ in range(settings.sync_max_rounds):
            todo = plan(
                warehouse, pipeline, tables, project, sources, settings.dbt_cloud_job_id, cloud
            )
            if todo is None:
                if not builds:
                    logger.info(
                        "nothing to transform: every table's newest rows are covered by a "
                        "successful build (a sync that changed nothing, a redelivered event, or "
                        "rows an earlier build already covered)"
                    )
                break
            check_cloud_jobs(todo, cloud)
            # One group at a time: groups may share models downstream of both (a mart joining
            # two sources), which two concurrent runs would build at once.
            for group in todo.groups:
                outcome = _build_group(warehouse, runner, settings, group, reason)
                builds.append(outcome.summary)
                if outcome.failure is not None:
                    failures.append(outcome.failure)
            if failures:
                # the failed groups' sources stay pending; another round would only repeat them
                break
        if builds:
            publish_status(warehouse, tables)
    create_markdown_artifact(
        key="transform-on-sync",
        markdown=transform_on_sync_markdown(reason, builds),
    )
    if failures:
        for failure in failures[1:]:
            logger.error("another dbt build failed too: %s", failure)
        raise failures[0]
    return {"builds": builds}


@dataclass(frozen=True)
class _GroupOutcome:
    summary: dict[str, Any]
    failure: Exception | None


def _build_group(
    warehouse: Warehouse, runner: DbtRunner, settings: Settings, group: BuildGroup, reason: str
) -> _GroupOutcome:
    """Build one group and record it for its sources alone: a group's failure leaves its sources
    pending and does not stop the other groups (the flow run fails after them)."""
    summary: dict[str, Any] = {"sources": group.source_names, "selection": None}
    if group.job_id is not None:
        summary["dbt_cloud_job_id"] = group.job_id
    started_at = utcnow()
    try:
        build = transform.with_options(**build_retry_options(settings))(
            runner, group, cause=f"postload: {reason} ({', '.join(group.source_names)})"
        )
    except Exception as exc:  # infrastructure (dbt Cloud unreachable, a run timed out...)
        get_run_logger().error("dbt build for %s failed: %s", ", ".join(group.source_names), exc)
        summary.update(selection=group.selection.describe(), status=f"failed: {exc}")
        return _GroupOutcome(summary, exc)
    record_build(
        warehouse,
        sources=group.sources,
        runner=runner.kind,
        build=build,
        started_at=started_at,
        completed_at=utcnow(),
        covers=group.covers,
        tables=group.tables,
    )
    summary.update(selection=build.selection, status=build.status)
    if build.run_url:
        summary["run_url"] = build.run_url
    return _GroupOutcome(summary, DbtBuildError(build) if build.status == "error" else None)


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
