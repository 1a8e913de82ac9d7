"""Failure notifications: Prefect automations that send one Slack message per thing gone wrong.

Everything that needs a human becomes a Prefect event, and automations defined here turn those
events into messages (applied by ``postload automations apply``, idempotently):

=========================  =================================================  ==================
automation                 fires on                                           one message per
=========================  =================================================  ==================
postload-flow-failed       ``prefect.flow-run.Failed``/``Crashed`` of our     flow run (task
                           flows (the message has the failed models)          retries never fail
                                                                              the flow run)
postload-sync-failed       ``fivetran.sync.failed`` (from the receiver or a   sync (deterministic
                           Prefect Cloud webhook)                             event id)
postload-source-stale      ``postload.source.stale`` (full-run-when-fresh,    stale episode
                           a tracked source past its deadline)
postload-unknown-connector ``postload.connector.unknown``                     sync
=========================  =================================================  ==================

``postload-run-lost`` sends nothing itself: a flow run of ours that stops sending heartbeats
(its machine, container or worker died with it, so no runner reports the crash) is marked
Crashed after ``LOST_AFTER_BEATS`` missed beats, and ``postload-flow-failed`` announces that.

The notification block is Prefect's core ``CustomWebhookNotificationBlock`` posting Slack's
incoming-webhook JSON (``{"text": ...}``): the automation's action runs *on the Prefect server*,
and a ``prefect_slack`` block would need prefect-slack installed there; the core
``SlackWebhook`` block (Apprise) would work too, but Apprise only ever posts to
``hooks.slack.com``, so nothing in between (a proxy, a test double) can receive it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from postload.freshness import SourceFreshness

FLOW_NAMES = ["load-and-transform", "transform-on-sync", "full-run-when-fresh"]
STALE_EVENT = "postload.source.stale"
# Which stale episode of each source was already announced (source -> newest load at the time):
# a Prefect variable, so sweeps every 15 minutes do not announce the same episode again.
STALE_VARIABLE = "postload-stale-announced"
STALE_NAMESPACE = uuid.UUID("6c1f4a52-9a41-4c52-a7a5-3d7b8f0e9c11")

LOST_RUN_AUTOMATION = "postload-run-lost"
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
RUN_END_STATES = ["Completed", "Failed", "Cancelled", "Crashed"]
# Settings.run_heartbeat_seconds' default, and Prefect's minimum heartbeat interval.
DEFAULT_HEARTBEAT_SECONDS = 30
# Missed beats before a run counts as lost: one late beat on a busy machine is not a crash.
LOST_AFTER_BEATS = 3


@dataclass(frozen=True)
class AutomationSpec:
    name: str
    description: str
    expect: list[str]
    match: dict[str, Any]
    match_related: dict[str, Any] | None
    subject: str
    body: str


def automation_specs() -> list[AutomationSpec]:
    return [
        AutomationSpec(
            name="postload-flow-failed",
            description="A postload flow run failed or crashed (after its task retries).",
            expect=["prefect.flow-run.Failed", "prefect.flow-run.Crashed"],
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAMES},
            subject="postload: {{ flow.name }} {{ flow_run.state.name | lower }}",
            body=(
                "Flow run `{{ flow_run.name }}` of `{{ flow.name }}`"
                "{% if deployment %} (deployment `{{ deployment.name }}`){% endif %} "
                "ended {{ flow_run.state.name }}.\n"
                "{{ flow_run.state.message }}\n"
                "Run: {{ flow_run | ui_url }}"
            ),
        ),
        AutomationSpec(
            name="postload-sync-failed",
            description="A Fivetran sync ended in failure: nothing was transformed for it.",
            expect=["fivetran.sync.failed"],
            match={"prefect.resource.id": "fivetran.connector.*"},
            match_related=None,
            subject="postload: Fivetran sync failed for {{ event.resource.get('prefect.resource.name', event.resource.id) }}",
            body=(
                "Fivetran connector `{{ event.resource.get('fivetran.connector_id', '?') }}` "
                "sync `{{ event.resource.get('fivetran.sync_id', '?') }}` ended with status "
                "{{ (event.payload.get('data') or {}).get('status', 'unknown') }}"
                "{% set reason = (event.payload.get('data') or {}).get('reason') %}"
                "{% if reason %}: {{ reason }}{% endif %}. Nothing was transformed for it; "
                "the next successful sync or the sweep picks its data up."
            ),
        ),
        AutomationSpec(
            name="postload-source-stale",
            description="A tracked source has not loaded for longer than its deadline.",
            expect=[STALE_EVENT],
            match={"prefect.resource.id": "postload.source.*"},
            match_related=None,
            subject="postload: source {{ event.payload.source }} is stale",
            body=(
                "Source `{{ event.payload.source }}` last loaded {{ event.payload.last_loaded_at "
                "or 'never' }} ({{ event.payload.age }} ago; deadline {{ event.payload.deadline }}). "
                "The full dbt build waits for it."
            ),
        ),
        AutomationSpec(
            name="postload-unknown-connector",
            description="A Fivetran connector synced that the pipeline config does not map.",
            expect=["postload.connector.unknown"],
            match={"prefect.resource.id": "fivetran.connector.*"},
            match_related=None,
            subject="postload: unknown Fivetran connector {{ event.payload.connector_id }}",
            body=(
                "Connector `{{ event.payload.connector_id }}` is not mapped to any source in "
                "postload.yaml, so its sync ran nothing. Known: "
                "{{ event.payload.known | join(', ') }}."
            ),
        ),
    ]


@dataclass(frozen=True)
class AppliedAutomation:
    name: str
    id: uuid.UUID
    action: str  # "created" or "updated"


def notification_block_ids() -> tuple[uuid.UUID | None, uuid.UUID | None]:
    """The ids of the Slack block and the optional PagerDuty block on the current Prefect API."""
    from prefect.blocks.core import Block

    from postload.blocks import PAGERDUTY_BLOCK, SLACK_BLOCK

    def block_id(slug: str, name: str) -> uuid.UUID | None:
        try:
            # From sync code async_dispatch runs the sync load: a block, not a coroutine.
            return cast(Block, Block.load(f"{slug}/{name}"))._block_document_id
        except ValueError:  # no such block document
            return None

    return block_id("custom-webhook", SLACK_BLOCK), block_id("pager-duty-webhook", PAGERDUTY_BLOCK)


def apply_automations(
    notification_block_id: uuid.UUID,
    pagerduty_block_id: uuid.UUID | None = None,
    *,
    heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS,
    lost_after_seconds: float | None = None,
) -> list[AppliedAutomation]:
    """Create or update (by name) every automation; re-applying never duplicates.

    ``heartbeat_seconds`` is how often postload's flow runs beat (``Settings.run_heartbeat_seconds``);
    a run silent for ``lost_after_seconds`` (default: ``LOST_AFTER_BEATS`` beats) is marked Crashed.
    """
    from prefect.automations import EventTrigger, Posture, SendNotification

    applied = []
    for spec in automation_specs():
        actions = [
            SendNotification(
                block_document_id=notification_block_id, subject=spec.subject, body=spec.body
            )
        ]
        if pagerduty_block_id is not None:
            actions.append(
                SendNotification(
                    block_document_id=pagerduty_block_id, subject=spec.subject, body=spec.body
                )
            )
        trigger = EventTrigger(
            expect=set(spec.expect),
            match=spec.match,
            match_related=spec.match_related or {},
            # one message per flow run / per connector, never batched or suppressed
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        )
        applied.append(_upsert(spec.name, spec.description, trigger, actions))
    lost_after = lost_after_seconds or LOST_AFTER_BEATS * heartbeat_seconds
    applied.append(
        _upsert(
            LOST_RUN_AUTOMATION,
            f"A postload flow run sent no heartbeat for {lost_after:g} s: the machine, container "
            "or process running it is gone. Marks it Crashed, which postload-flow-failed announces.",
            lost_run_trigger(lost_after),
            [lost_run_action(lost_after)],
        )
    )
    return applied


def lost_run_trigger(lost_after_seconds: float) -> Any:
    """Proactive: after a heartbeat of one of our flow runs, expect another (or its end) in time.

    A runner marks a run Crashed when the run's process dies under it; when the runner or worker
    dies with it (the machine, the container, an OOM kill of the whole group), nothing would, and
    the run would stay Running for ever. Prefect's documented answer is this automation on the
    runs' ``prefect.flow-run.heartbeat`` events.
    """
    from prefect.automations import EventTrigger, Posture

    return EventTrigger(
        after={HEARTBEAT_EVENT},
        expect={HEARTBEAT_EVENT, *(f"prefect.flow-run.{s}" for s in RUN_END_STATES)},
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAMES},
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=lost_after_seconds,
    )


def lost_run_action(lost_after_seconds: float) -> Any:
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState

    return ChangeFlowRunState(
        state=StateType.CRASHED,
        message=(
            f"No heartbeat for {lost_after_seconds:g} s: the process running this flow run is "
            "gone. Nothing it did after its last recorded step counts; the next run builds its "
            "data again."
        ),
    )


def _upsert(name: str, description: str, trigger: Any, actions: list[Any]) -> AppliedAutomation:
    from prefect.automations import Automation

    # From sync code async_dispatch runs the sync read and create: automations, not coroutines.
    existing: Automation | None
    try:
        existing = cast(Automation, Automation.read(name=name))
    except ValueError:
        existing = None
    if existing is None:
        created = cast(
            Automation,
            Automation(
                name=name, description=description, trigger=trigger, actions=actions
            ).create(),
        )
        assert created.id is not None  # create() sets the id the API gave it
        return AppliedAutomation(name, created.id, "created")
    existing.description = description
    existing.trigger = trigger
    existing.actions = actions
    existing.enabled = True
    existing.update()
    assert existing.id is not None  # read() builds it from the API's automation, id included
    return AppliedAutomation(name, existing.id, "updated")


def automation_names() -> list[str]:
    """Every automation ``apply_automations`` manages."""
    return [spec.name for spec in automation_specs()] + [LOST_RUN_AUTOMATION]


def announce_stale_sources(stale: list[SourceFreshness]) -> list[str]:
    """Emit one ``postload.source.stale`` event per source and stale episode; returns the names.

    An episode is identified by the source's newest load: it ends when the source loads again.
    """
    from prefect.events import emit_event
    from prefect.variables import Variable

    announced: dict[str, str] = dict(Variable.get(STALE_VARIABLE, default={}) or {})
    sent = []
    for source in stale:
        episode = source.latest_loaded_at.isoformat() if source.latest_loaded_at else "never"
        if announced.get(source.name) == episode:
            continue
        emit_event(
            STALE_EVENT,
            resource={
                "prefect.resource.id": f"postload.source.{source.name}",
                "prefect.resource.name": source.name,
            },
            payload={
                "source": source.name,
                "last_loaded_at": source.latest_loaded_at.isoformat()
                if source.latest_loaded_at
                else None,
                "age": str(source.age) if source.age is not None else "never loaded",
                "deadline": str(source.alert_after),
            },
            # the same episode is the same event, even if two runs race to announce it
            id=uuid.uuid5(STALE_NAMESPACE, f"{source.name}:{episode}"),
        )
        announced[source.name] = episode
        sent.append(source.name)
    if sent:
        Variable.set(STALE_VARIABLE, announced, overwrite=True)
    return sent
