"""The Fivetran protocol, without I/O: signature, payload validation, mapping to Prefect events,
and the Prefect Cloud webhook template that must map the same bodies to the same events."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import yaml
from jinja2 import StrictUndefined, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from prefect.events.schemas.events import Event
from prefect.server.utilities.user_templates import (
    TemplateRenderError,
    render_user_template_sync,
    validate_user_template,
)
from pydantic import ValidationError

from postload.fivetran.webhook import (
    FivetranWebhook,
    cloud_webhook_template,
    signature_problem,
    to_prefect_event,
    verify_signature,
)
from tests.conftest import suite_secret

SECRET = suite_secret("fivetran: webhook secret", "whsec-unit-3b1d")


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def sync_end(**overrides: Any) -> dict[str, Any]:
    """The live-captured sync_end shape (fivetran-dbt-peers.md §A3)."""
    body: dict[str, Any] = {
        "event": "sync_end",
        "created": "2026-05-22T00:06:08.638Z",
        "connector_type": "google_cloud_postgresql",
        "connector_id": "assimilate_seem",
        "connector_name": "ftar_pg",
        "sync_id": "b4703f73-6315-4e22-8d7a-3bfb18b2fed2",
        "destination_group_id": "inappropriate_implode",
        "data": {"status": "SUCCESSFUL"},
    }
    body.update(overrides)
    return body


# --- signature -------------------------------------------------------------------------------

BODY = json.dumps(sync_end()).encode()


def test_valid_lower_hex_signature() -> None:
    assert verify_signature(BODY, sign(BODY), SECRET)


def test_valid_upper_hex_signature() -> None:
    # Fivetran has been seen sending upper-case hex.
    assert verify_signature(BODY, sign(BODY).upper(), SECRET)


def test_surrounding_whitespace_is_ignored() -> None:
    assert verify_signature(BODY, f" {sign(BODY)} ", SECRET)


def test_wrong_secret_is_rejected() -> None:
    assert not verify_signature(BODY, sign(BODY, "another-secret"), SECRET)


def test_truncated_body_is_rejected() -> None:
    assert not verify_signature(BODY[:-1], sign(BODY), SECRET)


def test_reserialized_body_is_rejected() -> None:
    # The signature covers the raw bytes: the same JSON with other spacing is another body.
    respaced = json.dumps(json.loads(BODY), indent=1).encode()
    assert not verify_signature(respaced, sign(BODY), SECRET)


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_header_is_rejected(header: str | None) -> None:
    assert not verify_signature(BODY, header, SECRET)
    assert "missing" in (signature_problem(BODY, header, SECRET) or "")


@pytest.mark.parametrize(
    "header",
    [
        "not-a-digest",
        "sha256=" + "0" * 64,  # no prefix in Fivetran's scheme
        "z" * 64,
        "0" * 63,
        "0" * 65,
        "é" * 64,  # non-ASCII: compare_digest would raise TypeError if reached
        sign(BODY)[:-1] + "\u0660",  # an Arabic-Indic digit zero is not a hex digit
    ],
)
def test_garbage_header_is_rejected(header: str) -> None:
    assert not verify_signature(BODY, header, SECRET)
    assert "64 hex characters" in (signature_problem(BODY, header, SECRET) or "")


def test_empty_secret_never_verifies() -> None:
    assert not verify_signature(BODY, sign(BODY, ""), "")


def test_problems_never_contain_the_secret_or_the_expected_digest() -> None:
    expected = sign(BODY)
    for header in (None, "garbage", "0" * 64, sign(BODY, "other")):
        problem = signature_problem(BODY, header, SECRET)
        assert problem is not None
        assert SECRET not in problem
        assert expected not in problem.lower()


# --- model -----------------------------------------------------------------------------------


def test_live_capture_parses_and_keeps_extra_keys() -> None:
    body = sync_end(connection_id="assimilate_seem", exception_id=None)
    hook = FivetranWebhook.model_validate(body)
    assert hook.connector_id == "assimilate_seem"
    assert hook.status == "SUCCESSFUL"
    assert hook.created == datetime(2026, 5, 22, 0, 6, 8, 638000, tzinfo=UTC)
    assert hook.model_extra == {"connection_id": "assimilate_seem", "exception_id": None}
    assert hook.raw == body


def test_test_event_without_sync_id_or_name_parses() -> None:
    hook = FivetranWebhook.model_validate(
        {
            "event": "test_event",
            "created": "2026-05-22T00:06:08Z",
            "connector_type": "_connector_type",
            "connector_id": "_connector_1",
            "group_id": "_destination_1",
        }
    )
    assert hook.sync_id is None and hook.connector_name is None


@pytest.mark.parametrize(
    "connector_id",
    [
        "x'; drop table raw.events; --",
        "$(rm -rf /)",
        "`id`",
        "a b",
        "../../etc/passwd",
        "abc\n",
        "",
        "x" * 201,
        "-rf",  # would read as an option if it ever became an argv element
        "connéctor",
        "コネクタ",
        "abc\u200b",  # zero-width space
    ],
)
def test_unsafe_connector_id_is_rejected(connector_id: str) -> None:
    with pytest.raises(ValidationError) as info:
        FivetranWebhook.model_validate(sync_end(connector_id=connector_id))
    assert [e["loc"] for e in info.value.errors()] == [("connector_id",)]


@pytest.mark.parametrize("sync_id", ["s1; rm -rf /", "--full-refresh", "-x", "a/b", "é", ""])
def test_unsafe_sync_id_is_rejected(sync_id: str) -> None:
    with pytest.raises(ValidationError) as info:
        FivetranWebhook.model_validate(sync_end(sync_id=sync_id))
    assert [e["loc"] for e in info.value.errors()] == [("sync_id",)]


@pytest.mark.parametrize(
    "event", ["SYNC_END", "sync-end", "sync end", "fivetran.sync", "", "x" * 65]
)
def test_bad_event_type_is_rejected(event: str) -> None:
    with pytest.raises(ValidationError) as info:
        FivetranWebhook.model_validate(sync_end(event=event))
    assert [e["loc"] for e in info.value.errors()] == [("event",)]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("connector_id", 12345),
        ("connector_id", None),
        ("connector_id", ["a"]),
        ("event", 1),
        ("sync_id", 7),
        ("data", "SUCCESSFUL"),
        ("data", [1, 2]),
        ("created", "yesterday"),
        ("connector_name", {"a": 1}),
        ("connector_name", "n" * 501),
    ],
)
def test_wrong_types_are_rejected(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        FivetranWebhook.model_validate(sync_end(**{field: value}))
    assert info.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize("missing", ["event", "connector_id"])
def test_required_fields(missing: str) -> None:
    body = sync_end()
    del body[missing]
    with pytest.raises(ValidationError) as info:
        FivetranWebhook.model_validate(body)
    assert info.value.errors()[0]["loc"] == (missing,)


def test_unicode_in_descriptive_fields_is_kept() -> None:
    hook = FivetranWebhook.model_validate(sync_end(connector_name="Ventes — Île-de-France 🚚"))
    event = to_prefect_event(hook)
    assert event is not None
    assert event["resource"]["prefect.resource.name"] == "Ventes — Île-de-France 🚚"


# --- mapping to Prefect events ---------------------------------------------------------------


def event_for(body: dict[str, Any]) -> dict[str, Any] | None:
    return to_prefect_event(FivetranWebhook.model_validate(body))


def test_successful_sync_end_is_succeeded() -> None:
    body = sync_end()
    event = event_for(body)
    assert event is not None
    assert event["event"] == "fivetran.sync.succeeded"
    assert event["resource"] == {
        "prefect.resource.id": "fivetran.connector.assimilate_seem",
        "prefect.resource.name": "ftar_pg",
        "fivetran.connector_id": "assimilate_seem",
        "fivetran.connector_name": "ftar_pg",
        "fivetran.sync_id": "b4703f73-6315-4e22-8d7a-3bfb18b2fed2",
    }
    assert all(isinstance(v, str) for v in event["resource"].values())
    assert event["occurred"] == "2026-05-22T00:06:08.638000+00:00"
    assert event["payload"] == body
    UUID(event["id"])
    json.dumps(event)  # JSON-ready as is


@pytest.mark.parametrize(
    "data",
    [
        {"status": "FAILURE_WITH_TASK", "reason": "x"},
        {"status": "FAILED"},
        {"status": "successful"},
        {"status": None},
        {},
        None,
    ],
)
def test_any_other_sync_end_is_failed(data: dict[str, Any] | None) -> None:
    event = event_for(sync_end(data=data))
    assert event is not None and event["event"] == "fivetran.sync.failed"


def test_test_event_maps_to_nothing() -> None:
    assert event_for({"event": "test_event", "connector_id": "_connector_1"}) is None


@pytest.mark.parametrize("kind", ["sync_start", "pause_connector", "resync_table", "brand_new"])
def test_other_events_keep_their_type(kind: str) -> None:
    event = event_for(sync_end(event=kind, data=None))
    assert event is not None and event["event"] == f"fivetran.{kind}"


def test_labels_without_values_are_left_out() -> None:
    body = sync_end(event="edit_connector")
    del body["sync_id"], body["connector_name"]
    event = event_for(body)
    assert event is not None
    assert event["resource"] == {
        "prefect.resource.id": "fivetran.connector.assimilate_seem",
        "fivetran.connector_id": "assimilate_seem",
    }


def test_occurred_defaults_to_now_without_created() -> None:
    body = sync_end()
    del body["created"]
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    event = to_prefect_event(FivetranWebhook.model_validate(body), now=now)
    assert event is not None and event["occurred"] == "2026-11-25T12:00:00+00:00"


def test_redelivery_has_the_same_id() -> None:
    first, again = event_for(sync_end()), event_for(sync_end())
    assert first is not None and again is not None
    assert first["id"] == again["id"]


def test_id_is_documented_uuid5() -> None:
    from uuid import NAMESPACE_URL, uuid5

    event = event_for(sync_end())
    key = "fivetran:assimilate_seem:b4703f73-6315-4e22-8d7a-3bfb18b2fed2:fivetran.sync.succeeded"
    assert event is not None and event["id"] == str(uuid5(NAMESPACE_URL, key))


def test_another_sync_has_another_id() -> None:
    a, b = event_for(sync_end()), event_for(sync_end(sync_id="another-sync"))
    assert a is not None and b is not None and a["id"] != b["id"]


def test_another_connector_has_another_id() -> None:
    a, b = event_for(sync_end()), event_for(sync_end(connector_id="other_connector"))
    assert a is not None and b is not None and a["id"] != b["id"]


def test_start_and_end_of_one_sync_are_two_events() -> None:
    start, end = event_for(sync_end(event="sync_start", data=None)), event_for(sync_end())
    assert start is not None and end is not None and start["id"] != end["id"]


def test_failed_then_successful_retry_of_one_sync_are_two_events() -> None:
    # A Teleport retry emits sync_end FAILED, then SUCCESSFUL, for the same sync_id: the success
    # must not be swallowed as a duplicate of the failure.
    failed = event_for(sync_end(data={"status": "FAILED"}))
    succeeded = event_for(sync_end())
    assert failed is not None and succeeded is not None
    assert failed["id"] != succeeded["id"]


def test_events_without_sync_id_are_told_apart_by_created() -> None:
    def pause(created: str) -> dict[str, Any] | None:
        body = sync_end(event="pause_connector", created=created, data=None)
        del body["sync_id"]
        return event_for(body)

    monday = pause("2026-05-18T10:00:00Z")
    again = pause("2026-05-18T10:00:00Z")
    tuesday = pause("2026-05-19T10:00:00Z")
    assert monday is not None and again is not None and tuesday is not None
    assert monday["id"] == again["id"]
    assert monday["id"] != tuesday["id"]


# --- the Prefect Cloud webhook template ------------------------------------------------------
#
# Cloud renders the template itself; the nearest engine available here is the one Prefect's own
# server renders user templates with (sandboxed Jinja, ChainableUndefined). A strict sandbox runs
# too: it fails on any unguarded use of a missing key, whatever undefined policy Cloud uses.

REPO = Path(__file__).resolve().parents[2]

# Real bodies: the live-captured sync_end above, its failure variant (data.reason as documented
# by Fivetrex), sync_start in the same envelope without data, and Fivetran's documented
# connectivity test (no sync_id, no connector_name).
CLOUD_SAMPLES: dict[str, dict[str, Any]] = {
    "sync_end_successful": sync_end(),
    "sync_end_failed": sync_end(
        data={"status": "FAILURE_WITH_TASK", "reason": "Table 'orders': permission denied"}
    ),
    "sync_start": {k: v for k, v in sync_end(event="sync_start").items() if k != "data"},
    "test_event": {
        "event": "test_event",
        "created": "2026-05-22T00:06:08.638Z",
        "connector_type": "_connector_type",
        "connector_id": "_connector_1",
        "group_id": "_destination_1",
    },
}


def render_prefect(template: str, body: Any) -> str:
    return render_user_template_sync(
        template, {"method": "POST", "headers": {"content-type": "application/json"}, "body": body}
    )


def render_strict(template: str, body: Any) -> str:
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
    return env.from_string(template).render(method="POST", headers={}, body=body)


RENDERERS = {"prefect": render_prefect, "strict": render_strict}


@pytest.fixture(params=sorted(RENDERERS))
def render_cloud(request: pytest.FixtureRequest) -> Callable[[dict[str, Any]], dict[str, Any]]:
    render = RENDERERS[request.param]
    template = cloud_webhook_template()
    validate_user_template(template)  # what Cloud checks when the webhook is created

    def rendered_event(body: dict[str, Any]) -> dict[str, Any]:
        event = json.loads(render(template, body))
        # What Cloud adds before storing it must make a valid Prefect event.
        Event.model_validate({**event, "id": str(uuid4()), "occurred": datetime.now(UTC)})
        return event

    return rendered_event


def assert_same_event(cloud: dict[str, Any], receiver: dict[str, Any] | None) -> None:
    assert receiver is not None
    # id and occurred are Cloud's: a random id, the time of receipt.
    assert set(cloud) == {"event", "resource", "payload"}
    assert cloud["event"] == receiver["event"]
    assert cloud["resource"] == receiver["resource"]
    assert cloud["payload"] == receiver["payload"]


@pytest.mark.parametrize("sample", ["sync_end_successful", "sync_end_failed", "sync_start"])
def test_cloud_template_makes_the_receivers_event(
    render_cloud: Callable[[dict[str, Any]], dict[str, Any]], sample: str
) -> None:
    body = CLOUD_SAMPLES[sample]
    cloud = render_cloud(body)
    assert_same_event(cloud, event_for(body))
    expected_name = {
        "sync_end_successful": "fivetran.sync.succeeded",
        "sync_end_failed": "fivetran.sync.failed",
        "sync_start": "fivetran.sync_start",
    }[sample]
    assert cloud["event"] == expected_name


def trigger_event_names() -> set[str]:
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    return {
        name
        for deployment in deployments
        for trigger in deployment.get("triggers") or []
        for name in trigger.get("expect", [])
    }


def test_cloud_template_turns_the_test_event_into_a_harmless_event(
    render_cloud: Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    # The receiver acknowledges test_event without recording it; Cloud turns every request into
    # an event, so the template must render it (a render error answers 400, and Fivetran refuses
    # to create a webhook whose test fails) into one that no deployment trigger expects.
    body = CLOUD_SAMPLES["test_event"]
    assert event_for(body) is None
    cloud = render_cloud(body)
    assert cloud == {
        "event": "fivetran.test_event",
        "resource": {
            "prefect.resource.id": "fivetran.connector._connector_1",
            "fivetran.connector_id": "_connector_1",
        },
        "payload": body,
    }
    assert "fivetran.sync.succeeded" in trigger_event_names()
    assert cloud["event"] not in trigger_event_names()


@pytest.mark.parametrize(
    "body",
    [
        *(sync_end(data=data) for data in ({"status": "FAILED"}, {"status": "successful"})),
        *(sync_end(data=data) for data in ({"status": None}, {}, None)),
        sync_end(connector_name='Ventes "Île-de-France" </script> \\ 🚚'),
        sync_end(connection_id="assimilate_seem", exception_id=None, nested={"a": [1, 2.5]}),
        {k: v for k, v in sync_end(event="pause_connector").items() if k != "sync_id"},
        {k: v for k, v in sync_end().items() if k != "connector_name"},
    ],
    ids=[
        "failed",
        "lower-case-successful",
        "status-null",
        "data-empty",
        "data-null",
        "name-with-quotes-html-backslash",
        "extra-keys",
        "no-sync-id",
        "no-connector-name",
    ],
)
def test_cloud_template_agrees_with_the_receiver_on_edge_cases(
    render_cloud: Callable[[dict[str, Any]], dict[str, Any]], body: dict[str, Any]
) -> None:
    assert_same_event(render_cloud(body), event_for(body))


@pytest.mark.parametrize("render", sorted(RENDERERS))
def test_cloud_template_refuses_a_body_without_connector_id(render: str) -> None:
    # The receiver answers 400; a render error makes Cloud answer 400 too.
    body = sync_end()
    del body["connector_id"]
    with pytest.raises((TemplateRenderError, TypeError, UndefinedError)):
        RENDERERS[render](cloud_webhook_template(), body)
