"""Serve the deployments declared in ``prefect.yaml`` from this checkout, in one process.

The embedded default has no work pool infrastructure to run: a Prefect runner (``serve``) polls
the API for the deployments' scheduled runs and starts each in a subprocess. The deployments are
built from ``prefect.yaml`` itself — triggers, concurrency limit, schedules, parameters — so what
runs locally is what ``prefect deploy --all`` creates for a work pool.

Schedules made from the pipeline config. Which sources load-and-transform loads hourly depends
on ``postload.yaml`` (one schedule per COPY source, with that source as the schedule's
``parameters``; none when no source is loaded by COPY), which a static ``prefect.yaml`` cannot
read. So ``prefect.yaml`` keeps the *template* in ``definitions.copy_source_schedules`` (per
deployment name: a list of schedule entries, e.g. ``cron: "0 * * * *"``), which Prefect ignores,
and the deployment declares ``schedules: null``. Expanded from the config:

* by ``postload serve`` / ``postload stack`` when they start (``served_flows``, from
  ``Settings().load_pipeline()``);
* for ``prefect deploy`` (a work pool, CI), by ``postload schedules apply`` afterwards
  (``apply_copy_source_schedules``): it replaces the deployment's schedules through the API, and
  does nothing when they are already the ones the config makes. ``schedules: null`` is what lets
  a later ``prefect deploy`` leave them alone (Prefect keeps a deployment's schedules when its
  entry has none; a list, even with one inactive entry, would replace them on every deploy).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from prefect.schedules import Schedule

    from postload.config import PipelineConfig

__all__ = [
    "ApiNotReadyError",
    "AppliedSchedules",
    "DeploymentSpec",
    "apply_copy_source_schedules",
    "copy_source_schedules",
    "deployment_schedules",
    "deployment_specs",
    "describe_copy_source_schedules",
    "describe_schedule",
    "load_deployment_flow",
    "schedule_from_entry",
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
    # Templates from definitions.copy_source_schedules: one schedule per COPY source each.
    copy_source_schedules: list[dict[str, Any]] = field(default_factory=list)


def deployment_specs(prefect_yaml: Path) -> list[DeploymentSpec]:
    document = yaml.safe_load(prefect_yaml.read_text()) or {}
    templates = (document.get("definitions") or {}).get("copy_source_schedules") or {}
    entries = document.get("deployments") or []
    unknown = sorted(set(templates) - {entry["name"] for entry in entries})
    if unknown:
        raise ValueError(
            f"{prefect_yaml}: definitions.copy_source_schedules names no deployment of the file: "
            f"{', '.join(unknown)}"
        )
    specs = []
    for entry in entries:
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
                copy_source_schedules=list(templates.get(entry["name"]) or []),
            )
        )
    return specs


def copy_source_schedules(
    templates: Iterable[dict[str, Any]], pipeline: PipelineConfig
) -> list[dict[str, Any]]:
    """Each template once per COPY source (loader type copy) of the pipeline config, with
    ``parameters: {source: <name>}``, in prefect.yaml's form; none without a COPY source.

    Sources loaded by Fivetran get no schedule: nothing of theirs is staged for postload to load,
    and their syncs wake transform-on-sync.
    """
    names = [s.name for s in pipeline.sources if s.loader.type == "copy"]
    return [
        {**template, "parameters": {**(template.get("parameters") or {}), "source": name}}
        for name in names
        for template in templates
    ]


def deployment_schedules(spec: DeploymentSpec, pipeline: PipelineConfig | None) -> list[Schedule]:
    """A deployment's schedules: those prefect.yaml declares, and those its templates make from
    the pipeline config (``pipeline`` may be None only for a deployment without templates)."""
    entries = list(spec.schedules)
    if spec.copy_source_schedules:
        if pipeline is None:
            raise ValueError(f"{spec.name}: its schedules are made from the pipeline config")
        entries += copy_source_schedules(spec.copy_source_schedules, pipeline)
    return [schedule_from_entry(entry) for entry in entries]


def schedule_from_entry(entry: dict[str, Any]) -> Schedule:
    """A prefect.yaml schedule entry (``cron`` or ``interval`` in seconds; ``active``,
    ``timezone``, ``parameters``, ``slug``) as a Prefect schedule."""
    from prefect.schedules import Cron, Interval

    common: dict[str, Any] = {
        "timezone": entry.get("timezone"),
        "active": entry.get("active", True),
        "parameters": dict(entry.get("parameters") or {}),
        "slug": entry.get("slug"),
    }
    if "cron" in entry:
        return Cron(entry["cron"], day_or=entry.get("day_or", True), **common)
    if "interval" in entry:
        return Interval(timedelta(seconds=float(entry["interval"])), **common)
    raise ValueError(f"unsupported schedule {entry!r}: expected a `cron` or an `interval` entry")


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
    pipeline: PipelineConfig | None = None,
) -> list[tuple[Any, dict[str, Any]]]:
    """Each deployment of ``prefect.yaml`` as (flow, ``Runner.add_flow`` keyword arguments).

    Schedules made from the pipeline config (``definitions.copy_source_schedules``) come from
    ``pipeline``, else from ``Settings().load_pipeline()`` (read only when one is needed): what is
    served follows today's ``postload.yaml``.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.events import DeploymentEventTrigger

    wanted = set(only) if only is not None else None
    root = prefect_yaml.resolve().parent
    specs = [s for s in deployment_specs(prefect_yaml) if wanted is None or s.name in wanted]
    if pipeline is None and with_schedules and any(s.copy_source_schedules for s in specs):
        from postload.config import Settings

        pipeline = Settings().load_pipeline()
    served: list[tuple[Any, dict[str, Any]]] = []
    for spec in specs:
        flow = load_deployment_flow(root, spec)
        schedules = deployment_schedules(spec, pipeline) if with_schedules else []
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


def describe_copy_source_schedules(schedules: Iterable[Schedule]) -> str:
    sources = [str(s.parameters["source"]) for s in schedules if "source" in s.parameters]
    if not sources:
        return "no COPY source in the pipeline config, so no load schedule"
    return f"scheduled for each COPY source: {', '.join(sources)}"


def describe_schedule(schedule: Schedule) -> str:
    """One line for people: ``cron 0 * * * * source=orders`` (``inactive`` when it is)."""
    if schedule.cron is not None:
        what = f"cron {schedule.cron}"
    elif schedule.interval is not None:
        what = f"every {schedule.interval.total_seconds():g} s"
    else:
        what = f"rrule {schedule.rrule}"
    if schedule.timezone:
        what += f" ({schedule.timezone})"
    params = " ".join(f"{k}={v}" for k, v in schedule.parameters.items())
    return " ".join(part for part in (what, params, "" if schedule.active else "inactive") if part)


@dataclass(frozen=True)
class AppliedSchedules:
    """What ``apply_copy_source_schedules`` did to one deployment."""

    deployment: str
    deployment_id: Any
    schedules: list[Schedule]
    changed: bool


def apply_copy_source_schedules(
    prefect_yaml: Path, pipeline: PipelineConfig
) -> list[AppliedSchedules]:
    """Give every deployment of ``prefect_yaml`` with ``definitions.copy_source_schedules`` the
    schedules the pipeline config makes (and those its entry declares), on the current Prefect API.

    ``postload schedules apply``: for deployments made by ``prefect deploy``, which cannot read
    ``postload.yaml``. Idempotent: a deployment whose schedules already are these (kind, cron or
    interval, timezone, active, parameters) is not touched, so its scheduled runs stay; otherwise
    its schedules are all replaced, which drops the runs the old ones scheduled (a removed
    source's hourly load with them). A deployment is found as ``<name>/<name>``: each flow is
    named like its deployment. Raises ValueError when one is not on the server.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    applied = []
    with get_client(sync_client=True) as client:
        for spec in deployment_specs(prefect_yaml):
            if not spec.copy_source_schedules:
                continue
            schedules = deployment_schedules(spec, pipeline)
            wanted = [DeploymentScheduleCreate.from_schedule(s) for s in schedules]
            try:
                deployment = client.read_deployment_by_name(f"{spec.name}/{spec.name}")
            except ObjectNotFound:
                raise ValueError(
                    f"no deployment {spec.name}/{spec.name} on {PREFECT_API_URL.value()}: "
                    f"create it first (prefect deploy --all --prefect-file {prefect_yaml})"
                ) from None
            current = client.read_deployment_schedules(deployment.id)
            changed = sorted(map(_schedule_key, current)) != sorted(map(_schedule_key, wanted))
            if changed:
                for old in current:
                    client.delete_deployment_schedule(deployment.id, old.id)
                if wanted:
                    client.create_deployment_schedules(deployment.id, wanted)
            applied.append(AppliedSchedules(spec.name, deployment.id, schedules, changed))
    return applied


def _schedule_key(deployment_schedule: Any) -> str:
    """What makes two deployment schedules the same, as created or as read back."""
    import json

    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

    schedule = deployment_schedule.schedule
    what: list[Any]
    if isinstance(schedule, CronSchedule):
        what = ["cron", schedule.cron, schedule.timezone or "UTC", schedule.day_or]
    elif isinstance(schedule, IntervalSchedule):
        what = ["interval", schedule.interval.total_seconds(), schedule.timezone or "UTC"]
    else:
        what = [type(schedule).__name__, schedule.model_dump(mode="json")]
    return json.dumps(
        [what, deployment_schedule.active is not False, deployment_schedule.parameters or {}],
        sort_keys=True,
        default=str,
    )


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

    try:
        if warm:
            # First: the forkserver's imports then overlap this process's own (flows, runner).
            _warm_start.start_preloading()

        import asyncio

        from prefect.exceptions import TerminationSignal
        from prefect.runner import Runner

        served = served_flows(prefect_yaml, only=only, with_schedules=with_schedules)
        if with_schedules:
            from_config = {
                s.name for s in deployment_specs(prefect_yaml) if s.copy_source_schedules
            }
            for _, kwargs in served:
                if kwargs["name"] in from_config:
                    print(
                        f"{kwargs['name']}: {describe_copy_source_schedules(kwargs['schedules'])}"
                    )
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
    finally:
        # The warm-start process must not outlive serve (it may still be importing).
        _warm_start.stop()
