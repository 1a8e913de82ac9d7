"""full-run-when-fresh: one full dbt build per fresh generation of the tracked sources (opt-in).

Woken by load events and a sweep schedule; it never trusts the waking event. Inside the warehouse
writer slot it measures every tracked source's freshness, and, when postload.yaml has `full_run:`,
builds everything only when every tracked source has loaded since the last full build and all are
fresh (and `min_interval`/`cron` allow it) — so however often it is woken, each new generation of
fresh data gets exactly one full build, and a single sync never does: transform-on-sync builds it.
Otherwise it says which sources it waits for. A source stale past its deadline raises one
``postload.source.stale`` event per stale episode, with or without full builds.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from postload.alerts import announce_stale_sources
from postload.checkout import warn_if_checkout_differs
from postload.config import Settings
from postload.dbt import DbtBuildError, DbtBuildResult, DbtProject, DbtRunner, open_dbt_runner
from postload.freshness import FULL_BUILD, FullRunDecision, decide, tracked_sources
from postload.hooks import flow_options, timed_out_as_timeout
from postload.report import freshness_markdown, publish_status
from postload.retries import build_retry_options
from postload.runs import record_build, supersede_waiting_runs
from postload.sources import source_tables
from postload.warehouse import open_warehouse, utcnow
from postload.writer import warehouse_writer


@task(name="full-build", cache_policy=NO_CACHE)
def full_build(runner: DbtRunner, cause: str, job_id: int | None) -> DbtBuildResult:
    return runner.build(FULL_BUILD, cause=cause, job_id=job_id)


@flow(name="full-run-when-fresh", **flow_options())
@timed_out_as_timeout
def full_run_when_fresh(reason: str = "sweep") -> dict[str, Any]:
    """Build the whole dbt project once every tracked source has loaded again and is fresh.

    Without ``full_run:`` in postload.yaml it builds nothing, and still watches the sources whose
    dbt freshness sets limits, announcing any past its deadline.
    """
    logger = get_run_logger()
    settings = Settings()
    warn_if_checkout_differs(settings.project_dir)
    pipeline = settings.load_pipeline()
    project = DbtProject.from_settings(settings)
    manifest = project.manifest()
    tables = source_tables(pipeline, manifest, settings.pipeline_config_path)
    tracked = tracked_sources(pipeline, manifest, tables, settings.pipeline_config_path)
    warehouse = open_warehouse(settings, pipeline)
    runner = open_dbt_runner(settings, existing_relations=warehouse.relations)
    if superseded := supersede_waiting_runs():
        logger.info("covers the events of %d waiting run(s): %s", len(superseded), superseded)

    with warehouse_writer(settings):
        warehouse.ensure_schema()
        # each table's newest row, and the newest one a full build covered: one statement
        marks = warehouse.watermarks(
            [t for source in tracked for t in source.tables], selection=FULL_BUILD.describe()
        )
        limits = pipeline.full_run
        decision: FullRunDecision = decide(
            tracked,
            marks,
            utcnow(),
            limits=limits,
            last_full_build_at=warehouse.last_build_at(FULL_BUILD.describe())
            if limits is not None and (limits.min_interval or limits.cron)
            else None,
        )
        if limits is None:
            decision = decision.off(
                "full builds are off: postload.yaml has no `full_run:` (transform-on-sync builds "
                "what each load changed)"
            )
        create_markdown_artifact(key="source-freshness", markdown=freshness_markdown(decision))
        announced = announce_stale_sources(decision.past_deadline)
        if not decision.run:
            logger.info("no full build: %s", decision.reason)
            return {"built": False, "reason": decision.reason, "announced_stale": announced}

        logger.info("full build: %s", decision.reason)
        assert limits is not None  # decided to run, so configured
        started_at = utcnow()
        build = full_build.with_options(**build_retry_options(settings))(
            runner, cause=f"postload: full run ({reason})", job_id=limits.dbt_cloud_job_id
        )
        record_build(
            warehouse,
            sources=[t.config for t in tracked],
            runner=runner.kind,
            build=build,
            started_at=started_at,
            completed_at=utcnow(),
            covers=decision.covers,
            tables={
                t.name: {table.table: marks[table.key].latest_loaded_at for table in t.tables}
                for t in tracked
            },
        )
        publish_status(warehouse, tables)
    if build.status == "error":
        raise DbtBuildError(build)
    return {
        "built": True,
        "reason": decision.reason,
        "status": build.status,
        "announced_stale": announced,
    }


if __name__ == "__main__":
    full_run_when_fresh()
