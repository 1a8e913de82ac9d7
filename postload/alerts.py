"""Failure notifications: one Slack message per thing gone wrong, a page for what must wake someone.

Everything that needs a human is a Prefect state change or event; automations defined here
(applied by ``postload automations apply``, idempotently) and two flow hooks (postload.hooks)
turn them into messages. Which path sends what:

===============================  ==========================  ===========================  ========
what happened                    Slack (one message)         PagerDuty                    by
===============================  ==========================  ===========================  ========
flow run Failed (after retries)  the flows' ``on_failure``   trigger, dedup key           hook +
or TimedOut                      hook: state message and     ``postload/flow-run/<id>``   auto.
                                 every failed dbt node with  (``postload-run-page``)
                                 its error (prefect-slack)
flow run Crashed (its process    ``postload-run-crashed``    trigger, same dedup key      auto.
died; or marked so by            (no hook runs: the process  (``postload-run-page``)
``postload-run-lost``)           that would run it is gone)
next run of that deployment      none                        resolve, for each of its     hook
Completed                                                    runs that failed since its
                                                             previous success
Fivetran sync failed             ``postload-sync-failed``    none                         auto.
tracked source past deadline     ``postload-source-stale``   none                         auto.
unknown Fivetran connector       ``postload-unknown-         none                         auto.
                                 connector``
===============================  ==========================  ===========================  ========

``postload-run-lost`` sends nothing itself: a flow run of ours that stops sending heartbeats
(its machine, container or worker died with it, so no runner reports the crash) is marked
Crashed after ``LOST_AFTER_BEATS`` missed beats, which the two Crashed paths announce.

Why a hook for Failed and an automation for Crashed: the hook runs where the flow ran, with the
exception in hand, so it can list every failed dbt node with its error (``DbtBuildError``), and it
also works on a server where no automation was applied; a Crashed run has no process left to run
a hook, so only the server can announce it. Each state has exactly one Slack sender. The hook
sends through prefect-slack's ``SlackWebhook`` (it runs in the flow's process, where prefect-slack
is installed); the automations send through Prefect's core ``CustomWebhookNotificationBlock``
posting Slack's webhook JSON, because their actions run *on the Prefect server*, which would
need prefect-slack installed to load a prefect-slack block (and Apprise, behind the core
``SlackWebhook``, only ever posts to hooks.slack.com, so no proxy or test double could receive
it). TimedOut is a state *name* of type FAILED: its event is ``prefect.flow-run.TimedOut``, not
``…Failed``, so the page automation expects it by name.

PagerDuty (Events API v2): the page is a ``CustomWebhookNotificationBlock`` posting
``{"routing_key", "event_action": "trigger", "dedup_key": "postload/flow-run/<id>", "payload":
{summary, source, severity, custom_details}}`` to ``PAGERDUTY_EVENTS_URL`` (default
events.pagerduty.com/v2/enqueue), the routing key in the block's ``secrets``; the automation's
``body`` is the flow run id and its ``subject`` the summary (the block substitutes only those
two). Apprise's PagerDuty (core ``PagerDutyWebHook``) can set neither a dedup key nor resolve.
Stale sources, failed syncs and unknown connectors never page: each waits for a person in
working hours, and the sweep or the next sync picks their data up.

The resolve is sent by the flows' ``on_completion`` hook, not an automation: resolving needs the
ids of the deployment's runs that failed since its previous success, which an automation's
template cannot query and a hook can (one API call); an automation on Completed could only
resolve a key derived from the completed run itself, i.e. one dedup key per deployment, which
would fold every failure of a deployment into one alert. A resolve for an alert already resolved
(or never opened) is dropped by PagerDuty, so sending one per failed run since the last success
is safe to repeat. A success of a run outside any deployment (a direct call) resolves nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
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
CRASHED_AUTOMATION = "postload-run-crashed"
PAGE_AUTOMATION = "postload-run-page"
# Names earlier versions applied: deleted on apply, so a re-apply never leaves two senders.
RETIRED_AUTOMATIONS = ["postload-flow-failed"]
# Every end of a run that pages. TimedOut is a name of type FAILED, with an event of its own.
PAGE_EVENTS = ["prefect.flow-run.Failed", "prefect.flow-run.TimedOut", "prefect.flow-run.Crashed"]
PAGERDUTY_DEDUP_PREFIX = "postload/flow-run/"
# The page's summary (PagerDuty's limit is 1,024 characters).
PAGE_SUBJECT = (
    "postload: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}"
    "{% if deployment %} (deployment {{ deployment.name }}){% endif %}: "
    "{{ (flow_run.state.message or '') | replace('\\n', ' ') | truncate(700) }}"
)
# The block puts it in the dedup key and custom_details (see postload.blocks).
PAGE_BODY = "{{ flow_run.id }}"
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
            name=CRASHED_AUTOMATION,
            description=(
                "A postload flow run crashed: its process died (or postload-run-lost marked it). "
                "Failed and TimedOut runs are announced by the flows' failure hook."
            ),
            expect=["prefect.flow-run.Crashed"],
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

    return block_id("custom-webhook", SLACK_BLOCK), block_id("custom-webhook", PAGERDUTY_BLOCK)


def apply_automations(
    notification_block_id: uuid.UUID,
    pagerduty_block_id: uuid.UUID | None = None,
    *,
    heartbeat_seconds: int = DEFAULT_HEARTBEAT_SECONDS,
    lost_after_seconds: float | None = None,
) -> list[AppliedAutomation]:
    """Create or update (by name) every automation; re-applying never duplicates.

    ``pagerduty_block_id``: the Events API v2 block (postload.blocks); without it no automation
    pages, and an earlier page automation is deleted. ``heartbeat_seconds`` is how often
    postload's flow runs beat (``Settings.run_heartbeat_seconds``); a run silent for
    ``lost_after_seconds`` (default: ``LOST_AFTER_BEATS`` beats) is marked Crashed.
    """
    from prefect.automations import SendNotification

    for name in RETIRED_AUTOMATIONS + ([] if pagerduty_block_id else [PAGE_AUTOMATION]):
        _delete(name)
    applied = []
    for spec in automation_specs():
        actions = [
            SendNotification(
                block_document_id=notification_block_id, subject=spec.subject, body=spec.body
            )
        ]
        applied.append(_upsert(spec.name, spec.description, _reactive(spec), actions))
    if pagerduty_block_id is not None:
        applied.append(
            _upsert(
                PAGE_AUTOMATION,
                "A postload flow run failed (after its retries), timed out or crashed: page, "
                "with the run's id as dedup key. The next successful run of its deployment "
                "resolves it (the flows' completion hook).",
                _reactive(
                    AutomationSpec(
                        name=PAGE_AUTOMATION,
                        description="",
                        expect=PAGE_EVENTS,
                        match={"prefect.resource.id": "prefect.flow-run.*"},
                        match_related={
                            "prefect.resource.role": "flow",
                            "prefect.resource.name": FLOW_NAMES,
                        },
                        subject=PAGE_SUBJECT,
                        body=PAGE_BODY,
                    )
                ),
                [
                    SendNotification(
                        block_document_id=pagerduty_block_id, subject=PAGE_SUBJECT, body=PAGE_BODY
                    )
                ],
            )
        )
    lost_after = lost_after_seconds or LOST_AFTER_BEATS * heartbeat_seconds
    applied.append(
        _upsert(
            LOST_RUN_AUTOMATION,
            f"A postload flow run sent no heartbeat for {lost_after:g} s: the machine, container "
            f"or process running it is gone. Marks it Crashed, which {CRASHED_AUTOMATION} "
            f"announces (and {PAGE_AUTOMATION} pages).",
            lost_run_trigger(lost_after),
            [lost_run_action(lost_after)],
        )
    )
    return applied


def _reactive(spec: AutomationSpec) -> Any:
    from prefect.automations import EventTrigger, Posture

    return EventTrigger(
        expect=set(spec.expect),
        match=spec.match,
        match_related=spec.match_related or {},
        # one message per flow run / per connector, never batched or suppressed
        for_each={"prefect.resource.id"},
        posture=Posture.Reactive,
        threshold=1,
        within=0,
    )


def _delete(name: str) -> None:
    from prefect.automations import Automation

    try:
        existing = cast(Automation, Automation.read(name=name))
    except ValueError:
        return
    existing.delete()


# --- PagerDuty: what the flows' completion hook sends ------------------------------------------


@dataclass(frozen=True)
class PagerDutyTarget:
    url: str
    routing_key: str = field(repr=False)


def load_pagerduty_target() -> PagerDutyTarget | None:
    """The Events API URL and routing key of the registered PagerDuty block, if there is one."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from postload.blocks import PAGERDUTY_BLOCK

    try:
        block = cast(
            CustomWebhookNotificationBlock,
            CustomWebhookNotificationBlock.load(PAGERDUTY_BLOCK, _sync=True),  # type: ignore[call-arg]
        )
    except ValueError:  # no such block document: PagerDuty is not configured
        return None
    routing_key = block.secrets.get_secret_value().get("routing_key")
    return PagerDutyTarget(block.url, routing_key) if routing_key else None


def pagerduty_dedup_key(flow_run_id: str | uuid.UUID) -> str:
    return f"{PAGERDUTY_DEDUP_PREFIX}{flow_run_id}"


def pagerduty_resolve(target: PagerDutyTarget, flow_run_id: str, logger: Any) -> bool:
    """Resolve the alert of one flow run (Events API v2); False, logged, when it was refused."""
    import httpx

    try:
        response = httpx.post(
            target.url,
            json={
                "routing_key": target.routing_key,
                "event_action": "resolve",
                "dedup_key": pagerduty_dedup_key(flow_run_id),
            },
            timeout=10,
        )
    except httpx.HTTPError as exc:
        logger.warning("PagerDuty resolve for run %s not sent: %s", flow_run_id, type(exc).__name__)
        return False
    if response.status_code != 202:
        # PagerDuty's error body says what was wrong with the event; it holds no key.
        logger.warning(
            "PagerDuty refused the resolve for run %s: HTTP %d %s",
            flow_run_id,
            response.status_code,
            response.text[:200],
        )
        return False
    return True


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


def automation_names(*, pagerduty: bool = True) -> list[str]:
    """Every automation ``apply_automations`` manages (the page one only with ``pagerduty``)."""
    page = [PAGE_AUTOMATION] if pagerduty else []
    return [spec.name for spec in automation_specs()] + page + [LOST_RUN_AUTOMATION]


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
