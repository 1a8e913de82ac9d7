"""Serve the deployments declared in ``prefect.yaml`` from this checkout, in one process.

The embedded default has no work pool infrastructure to run: a Prefect runner (``serve``) polls
the API for the deployments' scheduled runs and starts each in a subprocess. The deployments are
built from ``prefect.yaml`` itself — triggers, concurrency limit, schedules, parameters — so what
runs locally is what ``prefect deploy --all`` creates for a work pool.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DeploymentSpec", "deployment_specs", "serve_deployments", "served_flows"]


@dataclass(frozen=True)
class DeploymentSpec:
    """One entry of ``prefect.yaml``'s ``deployments:`` list, as far as serving needs it."""

    name: str
    entrypoint: str
    description: str | None
    tags: list[str]
    parameters: dict[str, Any]
    triggers: list[dict[str, Any]]
    schedules: list[dict[str, Any]]
    concurrency_limit: int | dict[str, Any] | None


def deployment_specs(prefect_yaml: Path) -> list[DeploymentSpec]:
    document = yaml.safe_load(prefect_yaml.read_text()) or {}
    specs = []
    for entry in document.get("deployments") or []:
        specs.append(
            DeploymentSpec(
                name=entry["name"],
                entrypoint=entry["entrypoint"],
                description=entry.get("description"),
                tags=list(entry.get("tags") or []),
                parameters=dict(entry.get("parameters") or {}),
                triggers=list(entry.get("triggers") or []),
                schedules=list(entry.get("schedules") or []),
                concurrency_limit=entry.get("concurrency_limit"),
            )
        )
    return specs


def served_flows(
    prefect_yaml: Path,
    *,
    only: Iterable[str] | None = None,
    with_schedules: bool = True,
) -> list[tuple[Any, dict[str, Any]]]:
    """Each deployment of ``prefect.yaml`` as (flow, ``Runner.add_flow`` keyword arguments)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.events import DeploymentEventTrigger
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron, Interval

    wanted = set(only) if only is not None else None
    root = prefect_yaml.resolve().parent
    served = []
    for spec in deployment_specs(prefect_yaml):
        if wanted is not None and spec.name not in wanted:
            continue
        path, _, func = spec.entrypoint.partition(":")
        flow = load_flow_from_entrypoint(f"{root / path}:{func}")
        schedules = []
        for schedule in spec.schedules if with_schedules else []:
            active = schedule.get("active", True)
            if "cron" in schedule:
                schedules.append(Cron(schedule["cron"], active=active))
            elif "interval" in schedule:
                schedules.append(
                    Interval(timedelta(seconds=float(schedule["interval"])), active=active)
                )
        limit = spec.concurrency_limit
        served.append(
            (
                flow,
                {
                    "name": spec.name,
                    "description": spec.description,
                    "tags": spec.tags,
                    "parameters": spec.parameters,
                    "schedules": schedules,
                    "concurrency_limit": ConcurrencyLimitConfig(**limit)
                    if isinstance(limit, dict)
                    else limit,
                    # `type` picks the trigger class in prefect.yaml; the class has no such field.
                    "triggers": [
                        DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"})
                        for t in spec.triggers
                    ],
                },
            )
        )
    if wanted is not None and len(served) != len(wanted):
        known = sorted(s.name for s in deployment_specs(prefect_yaml))
        missing = sorted(wanted - {kwargs["name"] for _, kwargs in served})
        raise ValueError(f"no deployment named {missing} in {prefect_yaml} (known: {known})")
    return served


def serve_deployments(
    prefect_yaml: Path,
    *,
    only: Iterable[str] | None = None,
    with_schedules: bool = True,
    warm: bool = True,
    heartbeat_seconds: int | None = None,
) -> None:
    """Create/update the deployments and run their flow runs until interrupted.

    The flows are handed to the runner as objects (``Runner.add_flow``), so it starts each run
    from the flow in memory instead of ``python -m prefect.engine`` re-loading the entrypoint.
    With ``warm`` (the default) each run is forked from a process that has already imported
    Prefect, dbt and postload (``postload._warm_start``) instead of a fresh interpreter.
    """
    import asyncio

    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    from postload import _warm_start

    served = served_flows(prefect_yaml, only=only, with_schedules=with_schedules)
    # Warm up before the deployments exist, so no run is created that a cold start would serve.
    if warm and _warm_start.install():
        print("flow runs start from a warm process (Prefect, dbt and postload preloaded)")
    runner = Runner(name="postload", heartbeat_seconds=heartbeat_seconds)
    for flow, kwargs in served:
        runner.add_flow(flow, **kwargs)
    names = ", ".join(kwargs["name"] for _, kwargs in served)
    print(f"serving {len(served)} deployment(s) from {prefect_yaml}: {names} (Ctrl-C stops)")
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        print("stopped")
