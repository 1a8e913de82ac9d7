"""load-and-transform: load a source's staged files, verify, build what depends on them.

1. Load one source's new staged files into its raw table (COPY INTO … ON_ERROR='CONTINUE').
2. Verify the load: fail when files were present but nothing loaded; surface rejected lines.
3. Transform: build exactly the dbt work configured for that source, and wait.
4. Record per-node results and report the pipeline status.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from postload.checkout import warn_if_checkout_differs
from postload.config import PipelineConfig, Settings, SourceConfig
from postload.dbt import DbtBuildError, DbtBuildResult, DbtRunner, open_dbt_runner
from postload.hooks import flow_options, timed_out_as_timeout
from postload.load import LoadVerdict, rejects_table, verify_load
from postload.report import artifact_key, load_and_transform_markdown, publish_status
from postload.retries import build_retry_options, retry_options
from postload.runs import current_flow_run_id, record_build
from postload.sources import tables_for
from postload.warehouse import FileLoadResult, Warehouse, open_warehouse, utcnow
from postload.writer import warehouse_writer


@task(name="load", cache_policy=NO_CACHE)
def load(warehouse: Warehouse, source: SourceConfig) -> list[FileLoadResult]:
    warehouse.ensure_schema()
    results = warehouse.load(source, current_flow_run_id())
    if not results:
        get_run_logger().info(
            "no new files in %s (it is empty, or every file in it loaded before)",
            warehouse.stage_location(source),
        )
    for r in results:
        get_run_logger().info(
            "%s: %s, %d/%d rows loaded", r.file, r.status.value, r.rows_loaded, r.rows_parsed
        )
    return results


@task(name="verify-load", cache_policy=NO_CACHE)
def verify(source: SourceConfig, results: list[FileLoadResult]) -> LoadVerdict:
    verdict = verify_load(source, results)
    logger = get_run_logger()
    if verdict.files_with_rejects:
        logger.warning(verdict.summary())
        create_table_artifact(
            key=artifact_key("load-rejects", source.name),
            table=rejects_table(verdict),
            description=f"Lines rejected while loading source {source.name} (loaded the rest)",
        )
    else:
        logger.info(verdict.summary())
    if verdict.rows_loaded:
        # COPY loads and Fivetran syncs share one wake-up path: transform-on-sync triggers on this.
        emit_event(
            "postload.source.loaded",
            resource={"prefect.resource.id": f"postload.source.{source.name}"},
            payload={"source": source.name, "rows_loaded": verdict.rows_loaded},
        )
    return verdict


@task(name="transform", cache_policy=NO_CACHE)
def transform(runner: DbtRunner, source: SourceConfig, cause: str) -> DbtBuildResult:
    build = runner.build(source.effective_selection, cause=cause, job_id=source.dbt_cloud_job_id)
    if build.nothing_selected:
        get_run_logger().warning(
            "dbt selection %s for source %r matched no nodes: nothing was built. "
            "Check the source's 'selection' in the pipeline config.",
            build.selection,
            source.name,
        )
    return build


@task(name="report-status", cache_policy=NO_CACHE)
def report(
    warehouse: Warehouse, settings: Settings, pipeline: PipelineConfig
) -> list[dict[str, Any]]:
    return publish_status(warehouse, tables_for(settings, pipeline))


@flow(name="load-and-transform", **flow_options())
@timed_out_as_timeout
def load_and_transform(source: str) -> dict[str, Any]:
    """Load one source's new files, verify, build its downstream dbt models, record the result."""
    settings = Settings()
    warn_if_checkout_differs(settings.project_dir)
    pipeline = settings.load_pipeline()
    src = pipeline.source(source)
    warehouse = open_warehouse(settings, pipeline)
    runner = open_dbt_runner(settings, existing_relations=warehouse.relations)
    with warehouse_writer(settings):
        results = load.with_options(**retry_options(settings))(warehouse, src)
        verdict = verify(src, results)
        build = None
        if verdict.should_transform:
            started_at = utcnow()
            build = transform.with_options(**build_retry_options(settings))(
                runner, src, cause=f"postload: load of {src.name} complete"
            )
            covered = warehouse.latest_load_at(src)
            record_build(
                warehouse,
                sources=[src],
                runner=runner.kind,
                build=build,
                started_at=started_at,
                completed_at=utcnow(),
                covers={src.name: covered},
                tables={src.name: {src.copy_target()[0]: covered}},
            )
        status = report(warehouse, settings, pipeline)

    create_markdown_artifact(
        key=artifact_key("load-and-transform", src.name),
        markdown=load_and_transform_markdown(verdict, build),
        description=f"load-and-transform summary for {src.name}",
    )
    if build is not None and build.status == "error":
        raise DbtBuildError(build)
    return {
        "source": src.name,
        "outcome": verdict.outcome.value,
        "rows_loaded": verdict.rows_loaded,
        "rows_rejected": verdict.rows_rejected,
        "dbt_status": build.status if build else "skipped",
        "dbt_nodes": [n.unique_id for n in build.nodes] if build else [],
        "status": status,
    }


if __name__ == "__main__":
    import sys

    load_and_transform(sys.argv[1])
