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

__all__ = [
    "ApiNotReadyError",
    "DeploymentSpec",
    "deployment_specs",
    "load_deployment_flow",
    "serve_deployments",
    "served_flows",
    "wait_for_api",
]

# How long `postload serve` waits for the Prefect API before it registers its deployments: a
# runner started next to its server (`postload stack`, a compose file) is up before the API is; a
# fresh local server's first start (database migrations) takes ~45 s on 2 cores.
API_READY_TIMEOUT_SECONDS = 300.0


class ApiNotReadyError(RuntimeError):
    """The Prefect API did not answer its health check in time."""


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


def load_deployment_flow(root: Path, spec: DeploymentSpec) -> Any:
    """The flow at a deployment's entrypoint, relative to ``root`` (the checkout).

    An entrypoint that fails to import raises here: Prefect's placeholder flow, which would only
    fail once a run starts, is never used.
    """
    from prefect.flows import load_flow_from_entrypoint

    path, _, func = spec.entrypoint.partition(":")
    return load_flow_from_entrypoint(f"{root / path}:{func}", use_placeholder_flow=False)


def served_flows(
    prefect_yaml: Path,
    *,
    only: Iterable[str] | None = None,
    with_schedules: bool = True,
) -> list[tuple[Any, dict[str, Any]]]:
    """Each deployment of ``prefect.yaml`` as (flow, ``Runner.add_flow`` keyword arguments)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron, Interval

    wanted = set(only) if only is not None else None
    root = prefect_yaml.resolve().parent
    served: list[tuple[Any, dict[str, Any]]] = []
    for spec in deployment_specs(prefect_yaml):
        if wanted is not None and spec.name not in wanted:
            continue
        flow = load_deployment_flow(root, spec)
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


def wait_for_api(timeout_s: float = API_READY_TIMEOUT_SECONDS, poll_s: float = 0.5) -> None:
    """Return once the configured Prefect API answers its health check; raise after timeout_s."""
    import time

    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            error = client.api_healthcheck()
        if error is None:
            return
        if isinstance(error, httpx.HTTPStatusError) and error.response.status_code < 500:
            # Not a server still starting: a wrong URL or key does not get better by waiting.
            raise ApiNotReadyError(
                f"the Prefect API at {PREFECT_API_URL.value()} answered its health check with "
                f"HTTP {error.response.status_code}: is PREFECT_API_URL (and PREFECT_API_KEY) "
                "right?"
            )
        if time.monotonic() > deadline:
            raise ApiNotReadyError(
                f"the Prefect API at {PREFECT_API_URL.value()} did not answer its health check "
                f"within {timeout_s:.0f} s ({type(error).__name__}): is the server running and "
                "PREFECT_API_URL right?"
            )
        time.sleep(poll_s)


def serve_deployments(
    prefect_yaml: Path,
    *,
    only: Iterable[str] | None = None,
    with_schedules: bool = True,
    warm: bool = True,
    heartbeat_seconds: int | None = None,
    api_timeout_s: float = API_READY_TIMEOUT_SECONDS,
) -> None:
    """Create/update the deployments and run their flow runs until interrupted.

    The flows are handed to the runner as objects (``Runner.add_flow``), so it starts each run
    from the flow in memory instead of ``python -m prefect.engine`` re-loading the entrypoint.
    With ``warm`` (the default) each run is forked from a process that has already imported
    Prefect, dbt and postload (``postload.local._warm_start``) instead of a fresh interpreter. The API
    may still be starting: the deployments are registered once it answers (``wait_for_api``).
    """
    from postload.local import _warm_start

    if warm:
        # First: the forkserver's imports then overlap this process's own (flows, runner).
        _warm_start.start_preloading()

    import asyncio

    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    served = served_flows(prefect_yaml, only=only, with_schedules=with_schedules)
    # Warm up before the deployments exist, so no run is created that a cold start would serve.
    if warm and _warm_start.install():
        print("flow runs start from a warm process (Prefect, dbt and postload preloaded)")
    wait_for_api(api_timeout_s)
    runner = Runner(name="postload", heartbeat_seconds=heartbeat_seconds)
    for flow, kwargs in served:
        runner.add_flow(flow, **kwargs)
    names = ", ".join(kwargs["name"] for _, kwargs in served)
    print(f"serving {len(served)} deployment(s) from {prefect_yaml}: {names} (Ctrl-C stops)")
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        print("stopped")
