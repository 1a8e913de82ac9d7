"""The Fivetran webhook protocol: signature, payload model, and the mapping to a Prefect event.

Pure functions, no I/O, so the HTTP receiver (``postload.fivetran.receiver``) stays a thin shell around
them and every rule here is unit-testable.

* Signature: ``X-Fivetran-Signature-256`` is the hex HMAC-SHA256 of the *raw* request body keyed
  with the webhook secret; no prefix, no timestamp. Fivetran has been seen sending upper-case hex,
  so the comparison ignores case, and it runs in constant time.
* Payload: the identifiers that later select work (``connector_id``, ``event``, ``sync_id``, group
  ids) are validated against strict patterns here, so nothing from a payload reaches SQL, a dbt
  command line or a Prefect resource id unchecked. Descriptive fields (names, types) are only
  length-limited: rejecting an unexpected but harmless value would make Fivetran retry for 24 h
  and then disable the webhook.
* Event id: deterministic, so a redelivery is the *same* Prefect event (the trigger service and
  the receiver's outbox both deduplicate on it).
* Prefect Cloud: ``cloud_webhook_template()`` is the Jinja template for a Cloud webhook that maps
  the same bodies to the same events, except that Cloud chooses ``id`` and ``occurred``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from datetime import UTC, datetime
from importlib.resources import files
from typing import Annotated, Any
from uuid import NAMESPACE_URL, uuid5

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

__all__ = [
    "SIGNATURE_HEADER",
    "TEST_EVENT",
    "FivetranWebhook",
    "cloud_webhook_template",
    "prefect_event_name",
    "sign",
    "signature_problem",
    "sync_end_body",
    "to_prefect_event",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Fivetran-Signature-256"
TEST_EVENT = "test_event"
SUCCESSFUL = "SUCCESSFUL"

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")

# Letters, digits, "_" and "-", 1-200 chars, and not starting with "-": an id must never be
# mistaken for a command-line option if it ever becomes an argv element.
FivetranId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,199}$")]
EventType = Annotated[str, Field(pattern=r"^[a-z_]{1,64}$")]
# Free text shown to humans (names, types): bounded, never used as an identifier.
Label = Annotated[str, Field(max_length=500)]


# --- signature -------------------------------------------------------------------------------


def sign(body: bytes, secret: str) -> str:
    """The ``X-Fivetran-Signature-256`` value Fivetran sends for ``body``."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def sync_end_body(
    connector_id: str,
    *,
    status: str = SUCCESSFUL,
    sync_id: str,
    created: datetime,
    connector_name: str | None = None,
    connector_type: str = "postgres",
    group_id: str = "postload_demo",
) -> bytes:
    """A ``sync_end`` webhook body in Fivetran's documented shape (for demos and tests)."""
    return json.dumps(
        {
            "event": "sync_end",
            "created": _iso(created),
            "connector_type": connector_type,
            "connector_id": connector_id,
            "connector_name": connector_name or connector_id,
            "sync_id": sync_id,
            "destination_group_id": group_id,
            "data": {"status": status},
        }
    ).encode()


def signature_problem(body: bytes, header: str | None, secret: str) -> str | None:
    """Why ``header`` does not sign ``body`` with ``secret``, or None when it does.

    The reasons name what was wrong but never the secret or the expected digest, so they are safe
    to return to the caller.
    """
    if not secret:
        # An empty key would make every "signature" forgeable by anyone who guesses that.
        return "the receiver has no webhook secret configured"
    if header is None or not header.strip():
        return f"missing {SIGNATURE_HEADER} header"
    given = header.strip().lower()
    # Checked before compare_digest: it raises TypeError on non-ASCII str, and a wrong length or
    # alphabet cannot match anyway (this leaks only the documented format, not the digest).
    if not _HEX_SHA256.fullmatch(given):
        return f"{SIGNATURE_HEADER} is not a hex HMAC-SHA256 digest (expected 64 hex characters)"
    expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, given):
        return (
            f"{SIGNATURE_HEADER} does not match the body "
            "(expected the HMAC-SHA256 of the raw body keyed with the webhook secret)"
        )
    return None


def verify_signature(body: bytes, header: str | None, secret: str) -> bool:
    """True iff ``header`` is the hex HMAC-SHA256 of the raw ``body`` keyed with ``secret``."""
    return signature_problem(body, header, secret) is None


# --- payload ---------------------------------------------------------------------------------


class FivetranWebhook(BaseModel):
    """A Fivetran webhook body. Unknown keys are allowed and kept (Fivetran adds fields over
    time, e.g. ``connection_*`` aliases); the original dict is kept for the event payload."""

    model_config = ConfigDict(extra="allow", frozen=True)

    event: EventType
    created: datetime | None = None
    connector_id: FivetranId
    # The test_event payload has no connector_name; real events carry it.
    connector_name: Label | None = None
    connector_type: Label | None = None
    sync_id: FivetranId | None = None
    destination_group_id: FivetranId | None = None
    group_id: FivetranId | None = None
    data: dict[str, Any] | None = None

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("created")
    @classmethod
    def _exists_in_utc(cls, value: datetime | None) -> datetime | None:
        # "0001-01-01T00:00:00+01:00" parses, but is before year 1 in UTC: turning it into the
        # event's "occurred" would raise OverflowError (a 500, which Fivetran retries for a day).
        if value is not None:
            try:
                _iso(value)
            except OverflowError:
                raise ValueError("a timestamp within the years 1 to 9999 in UTC") from None
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw(cls, value: Any, handler: Any) -> FivetranWebhook:
        model = handler(value)
        if isinstance(value, dict):
            model._raw = dict(value)
        return model

    @property
    def raw(self) -> dict[str, Any]:
        """The body exactly as received (for the Prefect event's payload)."""
        return self._raw or self.model_dump(mode="json", exclude_unset=True)

    @property
    def status(self) -> str | None:
        value = (self.data or {}).get("status")
        return value if isinstance(value, str) else None


# --- mapping to a Prefect event --------------------------------------------------------------


def prefect_event_name(hook: FivetranWebhook) -> str | None:
    """The Prefect event name for ``hook``; None for Fivetran's connectivity ``test_event``.

    Anything but an explicit ``SUCCESSFUL`` ``sync_end`` is a failure: Fivetran documents no
    complete status enum, and a missed dbt run is recoverable while a run on unloaded data is not.
    """
    if hook.event == TEST_EVENT:
        return None
    if hook.event == "sync_end":
        return "fivetran.sync.succeeded" if hook.status == SUCCESSFUL else "fivetran.sync.failed"
    return f"fivetran.{hook.event}"


def _dedupe_key(hook: FivetranWebhook, name: str) -> str:
    """What makes two deliveries the same event.

    The Prefect event *name* (not Fivetran's ``event``) is part of the key so that a ``sync_end``
    FAILED followed by a SUCCESSFUL retry of the same sync (seen with Teleport syncs) are two
    events, not a duplicate that would swallow the success. Events without a ``sync_id`` (e.g.
    ``pause_connector``) fall back to Fivetran's ``created`` timestamp, which a redelivery keeps,
    so two pauses on different days stay two events; with neither, the body itself is the key.
    """
    if hook.sync_id is not None:
        discriminator = hook.sync_id
    elif hook.created is not None:
        discriminator = f"created={_iso(hook.created)}"
    else:
        canonical = json.dumps(hook.raw, sort_keys=True, separators=(",", ":"), default=str)
        discriminator = f"body={hashlib.sha256(canonical.encode()).hexdigest()}"
    return f"fivetran:{hook.connector_id}:{discriminator}:{name}"


def _iso(moment: datetime) -> str:
    # Fivetran sends UTC with a "Z"; a naive timestamp is taken as UTC rather than local time.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


def to_prefect_event(
    hook: FivetranWebhook, *, now: datetime | None = None
) -> dict[str, Any] | None:
    """The Prefect event (JSON-ready dict for ``POST /api/events``) for ``hook``, or None for
    ``test_event``. ``now`` is used for ``occurred`` only when the body has no ``created``."""
    name = prefect_event_name(hook)
    if name is None:
        return None
    resource = {
        "prefect.resource.id": f"fivetran.connector.{hook.connector_id}",
        "fivetran.connector_id": hook.connector_id,
    }
    # Resource labels must be strings: absent values are left out rather than sent as "None".
    if hook.connector_name is not None:
        resource["prefect.resource.name"] = hook.connector_name
        resource["fivetran.connector_name"] = hook.connector_name
    if hook.sync_id is not None:
        resource["fivetran.sync_id"] = hook.sync_id
    occurred = hook.created or now or datetime.now(UTC)
    return {
        "id": str(uuid5(NAMESPACE_URL, _dedupe_key(hook, name))),
        "occurred": _iso(occurred),
        "event": name,
        "resource": resource,
        "payload": hook.raw,
    }


CLOUD_WEBHOOK_TEMPLATE = "cloud_webhook.json.j2"


def cloud_webhook_template() -> str:
    """The Prefect Cloud webhook template (Jinja) that turns a Fivetran webhook body into the
    event ``to_prefect_event`` makes, ``id`` and ``occurred`` aside (Cloud sets those)."""
    return files("postload.fivetran").joinpath(CLOUD_WEBHOOK_TEMPLATE).read_text(encoding="utf-8")
