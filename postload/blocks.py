"""Register the production block documents from environment variables, idempotently.

The embedded default (DuckDB + dbt Core) needs no block at all. Production deployments need up
to four groups of blocks, each registered only when its environment variables are complete:

=================  ===============================================  ================================
group              blocks (name: type)                              needed when
=================  ===============================================  ================================
snowflake          ``postload-snowflake-credentials``:              ``POSTLOAD_WAREHOUSE=snowflake``
                   snowflake-credentials, and
                   ``settings.snowflake_block``: snowflake-connector
dbt-cloud          ``settings.dbt_cloud_credentials_block``:        ``POSTLOAD_DBT_RUNNER=cloud``
                   dbt-cloud-credentials
slack              ``postload-slack``: custom-webhook (core Prefect failure notifications
                   block posting Slack's webhook JSON, so a plain  (``postload automations
                   self-hosted server can send), and               apply``, the flows' failure
                   ``postload-slack-webhook``: slack-incoming-     hook; postload.alerts)
                   webhook (prefect-slack, for the flows' hook)
pagerduty          ``postload-pagerduty``: custom-webhook posting   pages for failed, timed-out
                   PagerDuty Events API v2 JSON                     and crashed runs (optional)
fivetran-webhook   ``settings.fivetran_webhook_secret_block``:      the Fivetran webhook receiver
                   secret                                           (``postload receiver``)
=================  ===============================================  ================================

Every value comes from the environment (or a ``.env`` file); nothing is ever a literal here.
Each group is all-or-nothing and independent of the others: a group with none of its variables is
*skipped*, one with some but not all is *incomplete* (and nothing of it is saved), and a failure
while saving one group never stops the next. Re-running is idempotent: documents are saved with
``overwrite=True`` under fixed names, so they keep their ids, and a document whose stored data
already equals the wanted data is left alone and reported *unchanged*.

Secret values never appear in the report, a log line or an exception message built here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast
from uuid import UUID, uuid4

from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect_dbt.cloud import DbtCloudCredentials
from prefect_slack import SlackWebhook  # type: ignore[import-untyped]
from prefect_snowflake import SnowflakeConnector, SnowflakeCredentials
from pydantic import SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from postload.config import DEFAULT_FIVETRAN_WEBHOOK_SECRET_BLOCK, Settings
from postload.hooks import SLACK_HOOK_BLOCK

__all__ = [
    "DBT_CLOUD_GROUP",
    "FIVETRAN_WEBHOOK_GROUP",
    "FIVETRAN_WEBHOOK_SECRET_BLOCK",
    "SLACK_BLOCK",
    "SLACK_GROUP",
    "SNOWFLAKE_CREDENTIALS_BLOCK",
    "SNOWFLAKE_GROUP",
    "BlockEnv",
    "BlockResult",
    "BlockStatus",
    "RegistrationReport",
    "format_report",
    "register_blocks",
]

logger = logging.getLogger(__name__)

SNOWFLAKE_CREDENTIALS_BLOCK = "postload-snowflake-credentials"
SLACK_BLOCK = "postload-slack"
PAGERDUTY_BLOCK = "postload-pagerduty"
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
# The default name; ``settings.fivetran_webhook_secret_block`` is the one registered and read.
FIVETRAN_WEBHOOK_SECRET_BLOCK = DEFAULT_FIVETRAN_WEBHOOK_SECRET_BLOCK

SNOWFLAKE_GROUP = "snowflake"
DBT_CLOUD_GROUP = "dbt-cloud"
SLACK_GROUP = "slack"
PAGERDUTY_GROUP = "pagerduty"
FIVETRAN_WEBHOOK_GROUP = "fivetran-webhook"

_SNOWFLAKE_AUTH = "SNOWFLAKE_PASSWORD or SNOWFLAKE_PRIVATE_KEY_PATH"

# What each group is for, and what to set to register it (for the CLI's hints).
_USED_BY = {
    SNOWFLAKE_GROUP: "the Snowflake warehouse (POSTLOAD_WAREHOUSE=snowflake)",
    DBT_CLOUD_GROUP: "the dbt Cloud runner (POSTLOAD_DBT_RUNNER=cloud)",
    SLACK_GROUP: "failure notifications to Slack",
    PAGERDUTY_GROUP: "pages for failed, timed-out and crashed runs (optional)",
    FIVETRAN_WEBHOOK_GROUP: "the Fivetran webhook receiver (`postload receiver`)",
}
_REQUIRED = {
    SNOWFLAKE_GROUP: (
        "SNOWFLAKE_ACCOUNT",
        "SNOWFLAKE_USER",
        _SNOWFLAKE_AUTH,
        "SNOWFLAKE_ROLE",
        "SNOWFLAKE_WAREHOUSE",
        "SNOWFLAKE_DATABASE",
    ),
    DBT_CLOUD_GROUP: ("DBT_CLOUD_API_KEY", "DBT_CLOUD_ACCOUNT_ID"),
    SLACK_GROUP: ("SLACK_WEBHOOK_URL",),
    PAGERDUTY_GROUP: ("PAGERDUTY_INTEGRATION_KEY",),
    FIVETRAN_WEBHOOK_GROUP: ("POSTLOAD_FIVETRAN_WEBHOOK_SECRET",),
}


class BlockEnv(BaseSettings):
    """The environment variables the production blocks are built from (no prefix; all optional).

    An empty variable counts as unset. ``SNOWFLAKE_SCHEMA`` and ``DBT_CLOUD_DOMAIN`` have
    defaults; setting them explicitly still marks their group as configured.
    """

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", env_ignore_empty=True, hide_input_in_errors=True
    )

    snowflake_account: str | None = None
    snowflake_user: str | None = None
    snowflake_password: SecretStr | None = None
    snowflake_private_key_path: str | None = None
    snowflake_private_key_passphrase: SecretStr | None = None
    snowflake_role: str | None = None
    snowflake_warehouse: str | None = None
    snowflake_database: str | None = None
    snowflake_schema: str = "RAW"

    dbt_cloud_api_key: SecretStr | None = None
    dbt_cloud_account_id: str | None = None
    dbt_cloud_domain: str = "cloud.getdbt.com"

    slack_webhook_url: SecretStr | None = None

    # an Events API v2 integration's key (the routing key); the URL only for a proxy or a test
    pagerduty_integration_key: SecretStr | None = None
    pagerduty_events_url: str = PAGERDUTY_EVENTS_URL

    postload_fivetran_webhook_secret: SecretStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        """Drop empty values, so an empty variable is exactly like an absent one."""
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if not _is_empty(value)}

    def is_set(self, env_var: str) -> bool:
        """Whether ``env_var`` was given (a defaulted variable counts only when given)."""
        name = env_var.lower()
        return name in self.model_fields_set and getattr(self, name) is not None

    def secret_values(self) -> list[str]:
        """Every secret value given (to scrub from messages as a last line of defence)."""
        values = []
        for name in self.__class__.model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr) and value.get_secret_value():
                values.append(value.get_secret_value())
        return values


def _is_empty(value: Any) -> bool:
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    return raw is None or (isinstance(raw, str) and raw.strip() == "")


class BlockStatus(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    SKIPPED = "skipped"
    INCOMPLETE = "incomplete"
    INVALID = "invalid"
    FAILED = "failed"


_PROBLEMS = (BlockStatus.INCOMPLETE, BlockStatus.INVALID, BlockStatus.FAILED)


@dataclass(frozen=True)
class BlockResult:
    """What happened to one block document. ``detail`` never contains a secret value."""

    group: str
    name: str
    block_type: str
    status: BlockStatus
    missing: tuple[str, ...] = ()
    document_id: UUID | None = None
    detail: str = ""


@dataclass(frozen=True)
class RegistrationReport:
    blocks: tuple[BlockResult, ...] = field(default_factory=tuple)

    def __iter__(self):
        return iter(self.blocks)

    def get(self, name: str) -> BlockResult:
        for result in self.blocks:
            if result.name == name:
                return result
        raise KeyError(name)

    def group(self, group: str) -> list[BlockResult]:
        return [r for r in self.blocks if r.group == group]

    @property
    def ok(self) -> bool:
        """False when a group is incomplete, invalid or failed (skipped groups are fine)."""
        return not any(r.status in _PROBLEMS for r in self.blocks)

    @property
    def incomplete(self) -> bool:
        return any(r.status is BlockStatus.INCOMPLETE for r in self.blocks)

    @property
    def missing(self) -> list[str]:
        """The missing variable names of incomplete groups, in order, without duplicates."""
        return list(dict.fromkeys(v for r in self.blocks for v in r.missing))


# --- the groups --------------------------------------------------------------------------------


class _Invalid(ValueError):
    """A group whose variables are all given but whose values cannot make a usable block."""


Builder = Callable[[BlockEnv, dict[str, Block]], Block]


def _no_check(env: BlockEnv) -> None:
    return None


@dataclass(frozen=True)
class _Spec:
    """One block document: its name, its type and how to build it (from the env and the
    blocks built before it in the same group)."""

    name: str
    block_type: type[Block]
    build: Builder


@dataclass(frozen=True)
class _Group:
    name: str
    env_vars: tuple[str, ...]  # every variable of the group: configured = any of them is set
    specs: tuple[_Spec, ...]
    check: Callable[[BlockEnv], None] = _no_check

    def configured(self, env: BlockEnv) -> bool:
        return any(env.is_set(v) for v in self.env_vars)

    def missing(self, env: BlockEnv) -> list[str]:
        return [
            req
            for req in _REQUIRED[self.name]
            if not any(env.is_set(alt) for alt in req.split(" or "))
        ]


def _check_snowflake(env: BlockEnv) -> None:
    if env.snowflake_password is not None and env.snowflake_private_key_path is not None:
        raise _Invalid(
            "set either SNOWFLAKE_PASSWORD (password auth) or SNOWFLAKE_PRIVATE_KEY_PATH "
            "(key-pair auth), not both"
        )
    if env.snowflake_private_key_passphrase is not None and env.snowflake_private_key_path is None:
        raise _Invalid(
            "SNOWFLAKE_PRIVATE_KEY_PASSPHRASE only applies with SNOWFLAKE_PRIVATE_KEY_PATH"
        )


def _snowflake_credentials(env: BlockEnv, built: dict[str, Block]) -> Block:
    kwargs: dict[str, Any] = {
        "account": env.snowflake_account,
        "user": env.snowflake_user,
        "role": env.snowflake_role,
    }
    if env.snowflake_private_key_path is not None:
        # Only the path is stored: the key file is read where the flow runs (the worker).
        kwargs["private_key_path"] = env.snowflake_private_key_path
        if env.snowflake_private_key_passphrase is not None:
            kwargs["private_key_passphrase"] = env.snowflake_private_key_passphrase
    else:
        kwargs["password"] = env.snowflake_password
    return SnowflakeCredentials(**kwargs)


def _snowflake_connector(env: BlockEnv, built: dict[str, Block]) -> Block:
    # The very credentials instance saved just before: once saved it carries its document id,
    # so the connector document references it instead of embedding a copy.
    return SnowflakeConnector(
        credentials=built[SNOWFLAKE_CREDENTIALS_BLOCK],
        database=env.snowflake_database,
        warehouse=env.snowflake_warehouse,
        schema=env.snowflake_schema,
    )


def _check_dbt_cloud(env: BlockEnv) -> None:
    raw = (env.dbt_cloud_account_id or "").strip()
    if not raw.isdigit() or int(raw) <= 0:
        raise _Invalid(
            "DBT_CLOUD_ACCOUNT_ID must be a positive integer (the number after /accounts/ in "
            f"your dbt Cloud URL); got {raw!r}"
        )


def _dbt_cloud_credentials(env: BlockEnv, built: dict[str, Block]) -> Block:
    return DbtCloudCredentials(
        api_key=env.dbt_cloud_api_key,
        account_id=int((env.dbt_cloud_account_id or "").strip()),
        domain=env.dbt_cloud_domain,
    )


def _slack_webhook(env: BlockEnv, built: dict[str, Block]) -> Block:
    assert env.slack_webhook_url is not None  # built only once the group is complete
    return slack_notification_block(env.slack_webhook_url.get_secret_value())


def slack_notification_block(webhook_url: str) -> CustomWebhookNotificationBlock:
    """A core block posting Slack's incoming-webhook JSON (see postload.alerts for why).

    The URL's secret part (after ``/services/``, or the whole path) is kept in the block's
    ``secrets``, so the block document shows only ``https://hooks.slack.com/services/{{...}}``.
    """
    scheme, has_scheme, rest = webhook_url.partition("://")
    host, _, path = rest.partition("/")
    if not has_scheme or scheme not in ("https", "http") or not host or not path:
        # Never echo the value: a pasted "T…/B…/…" path alone is the whole secret.
        raise _Invalid(
            "SLACK_WEBHOOK_URL is not a webhook URL: expected "
            "https://hooks.slack.com/services/T…/B…/… (scheme, host and path)"
        )
    base, marker, secret = webhook_url.partition("/services/")
    if not marker:
        base, marker, secret = f"{scheme}://{host}", "/", path
    return CustomWebhookNotificationBlock(
        name="postload-slack",
        url=f"{base}{marker}{{{{slack_webhook_path}}}}",
        method="POST",
        json_data={"text": "*{{subject}}*\n{{body}}"},
        secrets={"slack_webhook_path": secret},
    )


def _slack_hook_webhook(env: BlockEnv, built: dict[str, Block]) -> Block:
    assert env.slack_webhook_url is not None  # built only once the group is complete
    return SlackWebhook(url=env.slack_webhook_url)


def _pagerduty(env: BlockEnv, built: dict[str, Block]) -> Block:
    assert env.pagerduty_integration_key is not None  # built only once the group is complete
    return pagerduty_notification_block(
        env.pagerduty_integration_key.get_secret_value(), env.pagerduty_events_url
    )


def pagerduty_notification_block(
    routing_key: str, events_url: str = PAGERDUTY_EVENTS_URL
) -> CustomWebhookNotificationBlock:
    """A core block posting a PagerDuty Events API v2 trigger (see postload.alerts for why).

    The automation renders ``body`` as the flow run's id and ``subject`` as the summary; the
    routing key is kept in ``secrets``, so the block document never shows it.
    """
    scheme, _, rest = events_url.partition("://")
    if scheme not in ("https", "http") or not rest.partition("/")[0]:
        raise _Invalid(
            "PAGERDUTY_EVENTS_URL is not a URL: expected https://events.pagerduty.com/v2/enqueue"
        )
    return CustomWebhookNotificationBlock(
        name=PAGERDUTY_BLOCK,
        url=events_url,
        method="POST",
        json_data={
            "routing_key": "{{routing_key}}",
            "event_action": "trigger",
            "dedup_key": "postload/flow-run/{{body}}",
            "client": "postload (Prefect)",
            "payload": {
                "summary": "{{subject}}",
                "source": "postload",
                "severity": "critical",
                "component": "prefect-flow-run",
                "class": "flow run failed",
                "custom_details": {"flow_run_id": "{{body}}"},
            },
        },
        secrets={"routing_key": routing_key},
    )


def _fivetran_secret(env: BlockEnv, built: dict[str, Block]) -> Block:
    return Secret(value=env.postload_fivetran_webhook_secret)


def _groups(settings: Settings) -> tuple[_Group, ...]:
    return (
        _Group(
            name=SNOWFLAKE_GROUP,
            env_vars=(
                "SNOWFLAKE_ACCOUNT",
                "SNOWFLAKE_USER",
                "SNOWFLAKE_PASSWORD",
                "SNOWFLAKE_PRIVATE_KEY_PATH",
                "SNOWFLAKE_PRIVATE_KEY_PASSPHRASE",
                "SNOWFLAKE_ROLE",
                "SNOWFLAKE_WAREHOUSE",
                "SNOWFLAKE_DATABASE",
                "SNOWFLAKE_SCHEMA",
            ),
            specs=(
                _Spec(SNOWFLAKE_CREDENTIALS_BLOCK, SnowflakeCredentials, _snowflake_credentials),
                _Spec(settings.snowflake_block, SnowflakeConnector, _snowflake_connector),
            ),
            check=_check_snowflake,
        ),
        _Group(
            name=DBT_CLOUD_GROUP,
            env_vars=("DBT_CLOUD_API_KEY", "DBT_CLOUD_ACCOUNT_ID", "DBT_CLOUD_DOMAIN"),
            specs=(
                _Spec(
                    settings.dbt_cloud_credentials_block,
                    DbtCloudCredentials,
                    _dbt_cloud_credentials,
                ),
            ),
            check=_check_dbt_cloud,
        ),
        _Group(
            name=SLACK_GROUP,
            env_vars=("SLACK_WEBHOOK_URL",),
            specs=(
                _Spec(SLACK_BLOCK, CustomWebhookNotificationBlock, _slack_webhook),
                _Spec(SLACK_HOOK_BLOCK, SlackWebhook, _slack_hook_webhook),
            ),
        ),
        _Group(
            name=PAGERDUTY_GROUP,
            env_vars=("PAGERDUTY_INTEGRATION_KEY", "PAGERDUTY_EVENTS_URL"),
            specs=(_Spec(PAGERDUTY_BLOCK, CustomWebhookNotificationBlock, _pagerduty),),
        ),
        _Group(
            name=FIVETRAN_WEBHOOK_GROUP,
            env_vars=("POSTLOAD_FIVETRAN_WEBHOOK_SECRET",),
            specs=(_Spec(settings.fivetran_webhook_secret_block, Secret, _fivetran_secret),),
        ),
    )


# --- registration ------------------------------------------------------------------------------


def register_blocks(settings: Settings, env: BlockEnv | None = None) -> RegistrationReport:
    """Create or update every block whose variables are complete; report on each block.

    Uses the Prefect API of the current profile/environment (``PREFECT_API_URL``). Never raises
    for one group's problem: incomplete, invalid and failed groups are reported as such.
    """
    env = env if env is not None else BlockEnv()
    scrub = _Scrubber(env.secret_values())
    results: list[BlockResult] = []
    for group in _groups(settings):
        results.extend(_register_group(group, env, scrub))
    return RegistrationReport(tuple(results))


def _register_group(group: _Group, env: BlockEnv, scrub: _Scrubber) -> list[BlockResult]:
    def every_block(status: BlockStatus, missing: Iterable[str] = (), detail: str = ""):
        return [
            BlockResult(
                group=group.name,
                name=spec.name,
                block_type=spec.block_type.get_block_type_slug(),
                status=status,
                missing=tuple(missing),
                detail=detail,
            )
            for spec in group.specs
        ]

    if not group.configured(env):
        logger.info("blocks: %s not configured (no variables set); skipped", group.name)
        return every_block(BlockStatus.SKIPPED)
    missing = group.missing(env)
    if missing:
        logger.warning(
            "blocks: %s is incomplete, nothing saved for it; missing %s",
            group.name,
            ", ".join(missing),
        )
        return every_block(BlockStatus.INCOMPLETE, missing)

    # Build (and so validate) every block of the group before saving any of them.
    built: dict[str, Block] = {}
    try:
        group.check(env)
        for spec in group.specs:
            built[spec.name] = spec.build(env, built)
    except _Invalid as exc:
        detail = scrub(str(exc))
    except ValidationError as exc:
        detail = scrub(_summarise_validation_error(exc))
    else:
        detail = ""
    if detail:
        logger.warning("blocks: %s is invalid, nothing saved for it: %s", group.name, detail)
        return every_block(BlockStatus.INVALID, detail=detail)

    results: list[BlockResult] = []
    failed_at: str | None = None
    for spec in group.specs:
        slug = spec.block_type.get_block_type_slug()
        if failed_at is not None:
            detail = f"not saved: {failed_at} failed"
            results.append(
                BlockResult(group.name, spec.name, slug, BlockStatus.FAILED, (), None, detail)
            )
            continue
        try:
            status, document_id = _save(built[spec.name], spec.name)
        except Exception as exc:
            detail = scrub(f"{type(exc).__name__}: {exc}")
            logger.error("blocks: saving %s (%s) failed: %s", spec.name, slug, detail)
            results.append(
                BlockResult(group.name, spec.name, slug, BlockStatus.FAILED, (), None, detail)
            )
            failed_at = spec.name
            continue
        logger.info("blocks: %s (%s) %s [%s]", spec.name, slug, status.value, document_id)
        results.append(BlockResult(group.name, spec.name, slug, status, (), document_id))
    return results


def _save(block: Block, name: str) -> tuple[BlockStatus, UUID]:
    """Save ``block`` as ``name`` unless the stored document already holds exactly its data."""
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_block_document_by_name(
                name=name, block_type_slug=block.get_block_type_slug(), include_secrets=True
            )
        except ObjectNotFound:
            existing = None
    if existing is not None and _stored_equals(existing, block, name):
        # Let a block saved after this one (the connector) reference this document.
        block._block_document_id = existing.id
        block._block_document_name = name
        return BlockStatus.UNCHANGED, existing.id
    # `_sync` is async_dispatch's keyword, missing from its type: the id, not a coroutine.
    document_id = cast(UUID, block.save(name, overwrite=True, _sync=True))  # type: ignore[call-arg]
    return (BlockStatus.CREATED if existing is None else BlockStatus.UPDATED), document_id


def _stored_equals(existing: Any, block: Block, name: str) -> bool:
    schema = existing.block_schema
    if schema is None or schema.checksum != block._calculate_schema_checksum():
        return False  # saving again moves the document to this version's schema
    wanted = block._to_block_document(
        name=name, block_schema_id=uuid4(), block_type_id=uuid4(), include_secrets=True
    ).data
    stored = dict(existing.data)
    # The API returns nested documents hydrated; compare them as the references we would save.
    for key, reference in (existing.block_document_references or {}).items():
        stored[key] = {"$ref": {"block_document_id": reference["block_document"]["id"]}}
    # A save merges top-level keys into the stored data, so only the keys we write matter.
    return all(_plain(stored.get(key)) == _plain(value) for key, value in wanted.items())


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _summarise_validation_error(exc: ValidationError) -> str:
    """A pydantic error without the input values (which may be secrets)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False, include_context=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{exc.title}.{loc}: {msg}" if loc else f"{exc.title}: {msg}")
    return "; ".join(parts)


class _Scrubber:
    """Replace any known secret value in a message (a last line of defence)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, message: str) -> str:
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message


# --- the CLI's rendering -----------------------------------------------------------------------

EMBEDDED_DEFAULT_NOTE = (
    "The embedded default (POSTLOAD_WAREHOUSE=duckdb, POSTLOAD_DBT_RUNNER=core) needs none of "
    "these blocks."
)


def format_report(report: RegistrationReport) -> str:
    """A small table (one row per block) and what to set for what is missing. No secrets."""
    header = ("BLOCK", "TYPE", "STATUS", "MISSING / NOTE")
    rows = [header]
    for r in report:
        rows.append((r.name, r.block_type, r.status.value, _names(r.missing) or r.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(
            [*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]
        ).rstrip()
        for row in rows
    ]

    hints: list[str] = []
    for group in dict.fromkeys(r.group for r in report):
        results = report.group(group)
        statuses = {r.status for r in results}
        used_by = _USED_BY.get(group, group)
        if BlockStatus.INCOMPLETE in statuses:
            hints.append(
                f"- {group}: incomplete, nothing saved; set {_names(results[0].missing)} "
                f"(needed for {used_by})."
            )
        elif statuses == {BlockStatus.SKIPPED}:
            hints.append(
                f"- {group}: not configured; to use {used_by}, set "
                f"{_names(_REQUIRED[group])}{_OPTIONAL.get(group, '')}."
            )
        elif statuses & {BlockStatus.INVALID, BlockStatus.FAILED}:
            hints.append(f"- {group}: not registered; fix the problem shown above and re-run.")
    if hints:
        lines += ["", "To register what is missing:", *hints]
    lines += ["", EMBEDDED_DEFAULT_NOTE]
    return "\n".join(lines)


def _names(names: Iterable[str]) -> str:
    """Join variable names; a choice ("A or B") is parenthesised so the list stays readable."""
    return ", ".join(f"({n})" if " or " in n else n for n in names)


_OPTIONAL = {
    SNOWFLAKE_GROUP: (
        " (optional: SNOWFLAKE_PRIVATE_KEY_PASSPHRASE, SNOWFLAKE_SCHEMA (default RAW))"
    ),
    DBT_CLOUD_GROUP: " (optional: DBT_CLOUD_DOMAIN (default cloud.getdbt.com))",
    PAGERDUTY_GROUP: f" (optional: PAGERDUTY_EVENTS_URL (default {PAGERDUTY_EVENTS_URL}))",
}
