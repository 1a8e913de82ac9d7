"""What every postload flow run does alike: cover the runs waiting behind it, record its builds."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prefect.client.orchestration import get_client

from postload.config import SourceConfig
from postload.dbt import DbtBuildResult
from postload.warehouse import TransformRecord, Warehouse

if TYPE_CHECKING:
    from prefect.client.schemas.responses import OrchestrationResult


def supersede_waiting_runs(known_connectors: Collection[str] | None = None) -> list[str]:
    """Cancel the runs of this run's deployment that are due but waiting, as covered by this one.

    postload's flows run one at a time per deployment, and a run started while another runs
    waits for the slot (``collision_strategy: ENQUEUE``) instead of being cancelled, so an event
    that arrives at any moment of a run, even after its last check of the warehouse, gets a run
    after it. Every run that is already waiting when this one starts was created for an event
    that came before this run's plan, and the flows decide what to build from the warehouse, not
    from the event: this run builds their data, so they are cancelled instead of starting one
    after another to find nothing to do. Runs scheduled for later (the sweep) are left alone.

    A waiting run woken for a Fivetran connector postload.yaml does not map is left alone too:
    its job is to announce that connector (``postload.connector.unknown``), which no other run
    does. ``known_connectors`` defaults to postload.yaml's, read only when a waiting run names
    a connector. Called before the first plan; returns the names of the runs it cancelled.
    """
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.context import FlowRunContext
    from prefect.states import Cancelled
    from prefect.types._datetime import now

    context = FlowRunContext.get()
    run = context.flow_run if context else None
    if run is None or run.deployment_id is None:
        return []
    cancelled = []
    with get_client(sync_client=True) as client:
        waiting = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[run.deployment_id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
                expected_start_time=FlowRunFilterExpectedStartTime(before_=now("UTC")),
            ),
        )
        for other in waiting:
            if other.id == run.id:
                continue
            connector_id = (other.parameters or {}).get("connector_id")
            if connector_id is not None:
                if known_connectors is None:
                    known_connectors = _known_connectors()
                if connector_id not in known_connectors:
                    continue
            result: OrchestrationResult[Any] = client.set_flow_run_state(
                other.id,
                Cancelled(
                    message=f"Superseded by flow run {run.name!r} ({run.id}), which started "
                    "after this run's event and builds from the warehouse what it would have."
                ),
            )
            if result.state is not None and result.state.is_cancelled():
                cancelled.append(other.name)
    return cancelled


def _known_connectors() -> set[str]:
    from postload.config import Settings

    return set(Settings().load_pipeline().connector_ids)


def current_flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else "local"


def record_build(
    warehouse: Warehouse,
    *,
    sources: Iterable[SourceConfig],
    runner: str,
    build: DbtBuildResult,
    started_at: datetime,
    completed_at: datetime,
    covers: Mapping[str, datetime | None],
    tables: Mapping[str, Mapping[str, datetime | None]] | None = None,
) -> None:
    """Record one dbt build for each source it was run for (``ops.transform_runs``).

    ``covers`` maps a source's name to the newest load the build covered, ``tables`` each
    source's tables to the newest row of each (``ops.transform_tables``): the next plan builds a
    table again only for rows loaded after it.
    """
    flow_run_id = current_flow_run_id()
    for source in sources:
        warehouse.record_transform(
            transform_record(
                flow_run_id=flow_run_id,
                source=source,
                runner=runner,
                build=build,
                started_at=started_at,
                completed_at=completed_at,
                covers_loaded_at=covers.get(source.name),
                tables=dict((tables or {}).get(source.name, {})),
            )
        )


def transform_record(
    *,
    flow_run_id: str,
    source: SourceConfig,
    runner: str,
    build: DbtBuildResult,
    started_at: datetime,
    completed_at: datetime,
    covers_loaded_at: datetime | None,
    tables: dict[str, datetime | None] | None = None,
) -> TransformRecord:
    return TransformRecord(
        flow_run_id=flow_run_id,
        source=source.name,
        selection=build.selection,
        runner=runner,
        status=build.status,
        started_at=started_at,
        completed_at=completed_at,
        covers_loaded_at=covers_loaded_at,
        nodes=build.nodes,
        invocation_id=build.invocation_id,
        message=build.message,
        tables=tables or {},
        dbt_cloud_run_id=build.run_id,
        dbt_cloud_run_url=build.run_url,
    )
