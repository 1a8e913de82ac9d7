"""Block registration against a real Prefect server: skipped / incomplete / created / unchanged.

Every test builds its own ``BlockEnv`` (``_env_file=None``) or sets the variables with
monkeypatch after clearing them, so nothing depends on the machine's environment or a ``.env``.
"""

from __future__ import annotations

import logging
import runpy
import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect_dbt.cloud import DbtCloudCredentials
from prefect_slack import SlackWebhook
from prefect_snowflake import SnowflakeConnector, SnowflakeCredentials
from typer.testing import CliRunner

from postload.blocks import (
    DBT_CLOUD_GROUP,
    FIVETRAN_WEBHOOK_GROUP,
    FIVETRAN_WEBHOOK_SECRET_BLOCK,
    PAGERDUTY_BLOCK,
    PAGERDUTY_GROUP,
    SLACK_BLOCK,
    SLACK_GROUP,
    SNOWFLAKE_CREDENTIALS_BLOCK,
    SNOWFLAKE_GROUP,
    BlockEnv,
    BlockStatus,
    format_report,
    register_blocks,
)
from postload.cli import app
from postload.config import Settings
from postload.hooks import SLACK_HOOK_BLOCK
from tests.conftest import suite_secret

REGISTER_SCRIPT = Path(__file__).resolve().parent.parent / "blocks" / "register.py"

SNOWFLAKE_PASSWORD = suite_secret("blocks: Snowflake password", "pw-secret-xyz")
DBT_API_KEY = suite_secret("blocks: dbt Cloud API key", "dbtc-secret-api-key-7731")
SLACK_URL = "https://hooks.slack.com/services/T0SECRET/B0SECRET/" + suite_secret(
    "blocks: Slack webhook path", "slacksecret42"
)
FIVETRAN_SECRET = suite_secret("blocks: Fivetran webhook secret", "fivetran-signing-secret-9f2c")
PAGERDUTY_KEY = suite_secret("blocks: PagerDuty key", "pd-routing-key-5521")
SECRETS = (
    SNOWFLAKE_PASSWORD,
    DBT_API_KEY,
    SLACK_URL,
    FIVETRAN_SECRET,
    "slacksecret42",
    PAGERDUTY_KEY,
)

FULL_ENV: dict[str, str] = {
    "SNOWFLAKE_ACCOUNT": "acct-123",
    "SNOWFLAKE_USER": "loader",
    "SNOWFLAKE_PASSWORD": SNOWFLAKE_PASSWORD,
    "SNOWFLAKE_ROLE": "TRANSFORMER",
    "SNOWFLAKE_WAREHOUSE": "TRANSFORMING",
    "SNOWFLAKE_DATABASE": "ANALYTICS",
    "DBT_CLOUD_API_KEY": DBT_API_KEY,
    "DBT_CLOUD_ACCOUNT_ID": "4242",
    "SLACK_WEBHOOK_URL": SLACK_URL,
    "PAGERDUTY_INTEGRATION_KEY": PAGERDUTY_KEY,
    "POSTLOAD_FIVETRAN_WEBHOOK_SECRET": FIVETRAN_SECRET,
}
FIXED_NAMES = (
    (SNOWFLAKE_CREDENTIALS_BLOCK, "snowflake-credentials"),
    (SLACK_BLOCK, "custom-webhook"),
    (SLACK_HOOK_BLOCK, "slack-incoming-webhook"),
    (PAGERDUTY_BLOCK, "custom-webhook"),
)


def _env(**values: str) -> BlockEnv:
    return BlockEnv(_env_file=None, **{k.lower(): v for k, v in values.items()})


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Block names unique to the test, so tests never see each other's documents."""
    suffix = uuid.uuid4().hex[:8]
    return Settings(
        _env_file=None,
        project_dir=tmp_path,
        snowflake_block=f"test-snowflake-{suffix}",
        dbt_cloud_credentials_block=f"test-dbt-cloud-{suffix}",
        fivetran_webhook_secret_block=f"test-fivetran-secret-{suffix}",
    )


@pytest.fixture
def no_fixed_blocks(prefect_server: str):
    """The fixed-name documents (credentials, Slack) do not exist before or after."""
    _delete_fixed()
    yield
    _delete_fixed()


def _delete_fixed() -> None:
    with get_client(sync_client=True) as client:
        for name, slug in FIXED_NAMES:
            try:
                doc = client.read_block_document_by_name(name, slug, include_secrets=False)
            except ObjectNotFound:
                continue
            client.delete_block_document(doc.id)


def _documents() -> dict[tuple[str, str], list[Any]]:
    """Every named block document on the server: (name, type slug) -> [(id, updated)]."""
    found: dict[tuple[str, str], list[Any]] = {}
    with get_client(sync_client=True) as client:
        for doc in client.read_block_documents(include_secrets=False, limit=200):
            if doc.name is None:
                continue
            slug = doc.block_type.slug if doc.block_type else ""
            found.setdefault((doc.name, slug), []).append((doc.id, doc.updated))
    return found


def test_no_variables_skips_every_group_and_creates_nothing(
    prefect_server: str, settings: Settings
) -> None:
    before = _documents()

    report = register_blocks(settings, _env())

    assert [r.status for r in report] == [BlockStatus.SKIPPED] * 7
    assert {r.group for r in report} == {
        SNOWFLAKE_GROUP,
        DBT_CLOUD_GROUP,
        SLACK_GROUP,
        PAGERDUTY_GROUP,
        FIVETRAN_WEBHOOK_GROUP,
    }
    assert all(r.missing == () and r.document_id is None for r in report)
    assert report.ok and not report.incomplete
    assert _documents() == before
    text = format_report(report)
    assert "embedded default" in text
    assert "SNOWFLAKE_ACCOUNT" in text and "DBT_CLOUD_API_KEY" in text
    assert (
        "- fivetran-webhook: not configured; to use the Fivetran webhook receiver "
        "(`postload receiver`), set POSTLOAD_FIVETRAN_WEBHOOK_SECRET."
    ) in text


def test_partial_snowflake_is_incomplete_names_missing_and_saves_nothing(
    prefect_server: str, settings: Settings
) -> None:
    before = _documents()
    env = _env(
        SNOWFLAKE_ACCOUNT="acct-123",
        SNOWFLAKE_PASSWORD=SNOWFLAKE_PASSWORD,
        SNOWFLAKE_DATABASE="ANALYTICS",
    )

    report = register_blocks(settings, env)

    snowflake = report.group(SNOWFLAKE_GROUP)
    assert [r.name for r in snowflake] == [SNOWFLAKE_CREDENTIALS_BLOCK, settings.snowflake_block]
    expected_missing = ("SNOWFLAKE_USER", "SNOWFLAKE_ROLE", "SNOWFLAKE_WAREHOUSE")
    for result in snowflake:
        assert result.status is BlockStatus.INCOMPLETE
        assert result.missing == expected_missing
        assert result.document_id is None
    # the other groups are independent of it
    assert {r.status for r in report if r.group != SNOWFLAKE_GROUP} == {BlockStatus.SKIPPED}
    assert report.incomplete and not report.ok
    assert report.missing == list(expected_missing)
    assert _documents() == before
    with pytest.raises(ValueError):
        SnowflakeConnector.load(settings.snowflake_block)

    text = format_report(report)
    assert "incomplete" in text
    assert "SNOWFLAKE_USER, SNOWFLAKE_ROLE, SNOWFLAKE_WAREHOUSE" in text
    assert SNOWFLAKE_PASSWORD not in text


def test_missing_auth_is_named_as_either_variable(prefect_server: str, settings: Settings) -> None:
    report = register_blocks(settings, _env(**{"SNOWFLAKE_ACCOUNT": "acct-123"}))
    assert "SNOWFLAKE_PASSWORD or SNOWFLAKE_PRIVATE_KEY_PATH" in report.missing
    env = _env(
        **{
            k: v
            for k, v in FULL_ENV.items()
            if k.startswith("SNOWFLAKE_") and k != "SNOWFLAKE_PASSWORD"
        }
    )
    report = register_blocks(settings, env)
    assert report.get(settings.snowflake_block).missing == (
        "SNOWFLAKE_PASSWORD or SNOWFLAKE_PRIVATE_KEY_PATH",
    )


def test_all_variables_create_loadable_blocks_and_rerun_is_idempotent(
    prefect_server: str, settings: Settings, no_fixed_blocks: None
) -> None:
    env = _env(**FULL_ENV)

    first = register_blocks(settings, env)

    assert [(r.name, r.block_type, r.status) for r in first] == [
        (SNOWFLAKE_CREDENTIALS_BLOCK, "snowflake-credentials", BlockStatus.CREATED),
        (settings.snowflake_block, "snowflake-connector", BlockStatus.CREATED),
        (settings.dbt_cloud_credentials_block, "dbt-cloud-credentials", BlockStatus.CREATED),
        (SLACK_BLOCK, "custom-webhook", BlockStatus.CREATED),
        (SLACK_HOOK_BLOCK, "slack-incoming-webhook", BlockStatus.CREATED),
        (PAGERDUTY_BLOCK, "custom-webhook", BlockStatus.CREATED),
        (settings.fivetran_webhook_secret_block, "secret", BlockStatus.CREATED),
    ]
    assert first.ok and all(r.document_id is not None for r in first)

    connector = SnowflakeConnector.load(settings.snowflake_block)
    assert connector.database == "ANALYTICS"
    assert connector.warehouse == "TRANSFORMING"
    assert connector.schema_ == "RAW"
    assert connector.credentials.account == "acct-123"
    assert connector.credentials.role == "TRANSFORMER"
    assert connector.credentials.password.get_secret_value() == SNOWFLAKE_PASSWORD
    # the connector references the credentials document rather than embedding a copy
    assert (
        connector.credentials._block_document_id
        == first.get(SNOWFLAKE_CREDENTIALS_BLOCK).document_id
    )

    dbt = DbtCloudCredentials.load(settings.dbt_cloud_credentials_block)
    assert dbt.account_id == 4242
    assert dbt.domain == "cloud.getdbt.com"
    assert dbt.api_key.get_secret_value() == DBT_API_KEY
    slack = CustomWebhookNotificationBlock.load(SLACK_BLOCK)
    # the document shows the host, never the secret path; the path sits in the block's secrets
    assert slack.url == "https://hooks.slack.com/services/{{slack_webhook_path}}"
    assert slack.secrets.get_secret_value() == {
        "slack_webhook_path": "T0SECRET/B0SECRET/slacksecret42"
    }
    # the failure hook's prefect-slack block posts to the same webhook
    assert SlackWebhook.load(SLACK_HOOK_BLOCK).url.get_secret_value() == SLACK_URL
    # PagerDuty: Events API v2 at PagerDuty's URL, the routing key only in the block's secrets
    pagerduty = CustomWebhookNotificationBlock.load(PAGERDUTY_BLOCK)
    assert pagerduty.url == "https://events.pagerduty.com/v2/enqueue"
    assert pagerduty.secrets.get_secret_value() == {"routing_key": PAGERDUTY_KEY}
    assert pagerduty.json_data["routing_key"] == "{{routing_key}}"
    assert pagerduty.json_data["dedup_key"] == "postload/flow-run/{{body}}"
    assert Secret.load(settings.fivetran_webhook_secret_block).get() == FIVETRAN_SECRET
    # ... and it is where the receiver finds the secret when the variable is not set
    assert Settings(
        _env_file=None,
        project_dir=settings.project_dir,
        fivetran_webhook_secret_block=settings.fivetran_webhook_secret_block,
    ).resolve_fivetran_webhook_secret() == (
        FIVETRAN_SECRET,
        f"Secret block {settings.fivetran_webhook_secret_block!r}",
    )

    docs_after_first = _documents()

    second = register_blocks(settings, env)

    assert [r.status for r in second] == [BlockStatus.UNCHANGED] * 7
    assert [r.document_id for r in second] == [r.document_id for r in first]
    assert _documents() == docs_after_first  # not even touched
    for result in second:
        assert len(docs_after_first[(result.name, result.block_type)]) == 1


def test_webhook_secret_block_name_comes_from_settings(
    prefect_server: str, settings: Settings
) -> None:
    assert Settings.model_fields["fivetran_webhook_secret_block"].default == (
        FIVETRAN_WEBHOOK_SECRET_BLOCK
    )
    report = register_blocks(settings, _env(POSTLOAD_FIVETRAN_WEBHOOK_SECRET=FIVETRAN_SECRET))
    [result] = report.group(FIVETRAN_WEBHOOK_GROUP)
    assert (result.name, result.status) == (
        settings.fivetran_webhook_secret_block,
        BlockStatus.CREATED,
    )
    assert FIVETRAN_SECRET not in format_report(report)


def test_changed_values_update_in_place(
    prefect_server: str, settings: Settings, no_fixed_blocks: None, tmp_path: Path
) -> None:
    first = register_blocks(settings, _env(**FULL_ENV))

    # switch Snowflake to key-pair auth and move the connector to another database
    key_env = {k: v for k, v in FULL_ENV.items() if k != "SNOWFLAKE_PASSWORD"}
    key_env |= {
        "SNOWFLAKE_PRIVATE_KEY_PATH": str(tmp_path / "rsa_key.p8"),
        "SNOWFLAKE_PRIVATE_KEY_PASSPHRASE": "passphrase-secret-55",
        "SNOWFLAKE_DATABASE": "ANALYTICS_V2",
        "SNOWFLAKE_SCHEMA": "LANDING",
    }
    second = register_blocks(settings, _env(**key_env))

    statuses = {r.name: r.status for r in second}
    assert statuses[SNOWFLAKE_CREDENTIALS_BLOCK] is BlockStatus.UPDATED
    assert statuses[settings.snowflake_block] is BlockStatus.UPDATED
    assert statuses[settings.dbt_cloud_credentials_block] is BlockStatus.UNCHANGED
    assert [r.document_id for r in second] == [r.document_id for r in first]

    connector = SnowflakeConnector.load(settings.snowflake_block)
    assert (connector.database, connector.schema_) == ("ANALYTICS_V2", "LANDING")
    creds = SnowflakeCredentials.load(SNOWFLAKE_CREDENTIALS_BLOCK)
    assert str(creds.private_key_path) == key_env["SNOWFLAKE_PRIVATE_KEY_PATH"]
    assert creds.password is None  # the old password does not linger after the update
    assert "passphrase-secret-55" not in format_report(second)


def test_invalid_values_are_reported_without_saving(
    prefect_server: str, settings: Settings
) -> None:
    before = _documents()
    values = {k: v for k, v in FULL_ENV.items() if k.startswith(("SNOWFLAKE_", "DBT_"))}
    values |= {
        "SNOWFLAKE_PRIVATE_KEY_PATH": "/keys/rsa_key.p8",  # and a password: ambiguous
        "DBT_CLOUD_ACCOUNT_ID": "not-a-number",
    }
    env = _env(**values)
    report = register_blocks(settings, env)

    assert {r.status for r in report.group(SNOWFLAKE_GROUP)} == {BlockStatus.INVALID}
    assert "not both" in report.get(settings.snowflake_block).detail
    dbt = report.get(settings.dbt_cloud_credentials_block)
    assert dbt.status is BlockStatus.INVALID and "DBT_CLOUD_ACCOUNT_ID" in dbt.detail
    assert not report.ok
    assert _documents() == before
    text = format_report(report)
    assert SNOWFLAKE_PASSWORD not in text and DBT_API_KEY not in text


def test_secrets_never_reach_report_logs_or_output(
    prefect_server: str,
    settings: Settings,
    no_fixed_blocks: None,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    env = _env(**FULL_ENV)

    reports = [register_blocks(settings, env), register_blocks(settings, env)]
    incomplete = register_blocks(
        settings, _env(SNOWFLAKE_PASSWORD=SNOWFLAKE_PASSWORD, DBT_CLOUD_API_KEY=DBT_API_KEY)
    )
    texts = [format_report(r) for r in [*reports, incomplete]]
    for text in texts:
        print(text)

    out = capsys.readouterr()
    captured = "\n".join([*texts, repr(reports), repr(incomplete), caplog.text, out.out, out.err])
    assert "postload-snowflake-credentials" in caplog.text  # the logs do name the blocks
    for secret in SECRETS:
        assert secret not in captured


def test_register_script_exit_codes(
    prefect_server: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env file is read
    for name in BlockEnv.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    suffix = uuid.uuid4().hex[:8]
    monkeypatch.setenv("POSTLOAD_SNOWFLAKE_BLOCK", f"script-snowflake-{suffix}")
    monkeypatch.setenv("POSTLOAD_DBT_CLOUD_CREDENTIALS_BLOCK", f"script-dbt-{suffix}")
    main = runpy.run_path(str(REGISTER_SCRIPT), run_name="register")["main"]

    assert main() == 0  # nothing configured: fine for the embedded default
    assert "skipped" in capsys.readouterr().out

    monkeypatch.setenv("DBT_CLOUD_API_KEY", DBT_API_KEY)
    assert main() == 1  # incomplete
    out = capsys.readouterr().out
    assert "DBT_CLOUD_ACCOUNT_ID" in out and DBT_API_KEY not in out

    # Invalid: the script and `postload blocks register` both fail, and say which variable.
    monkeypatch.setenv("DBT_CLOUD_ACCOUNT_ID", "not-a-number")
    assert main() == 1
    assert "DBT_CLOUD_ACCOUNT_ID" in capsys.readouterr().out
    cli = CliRunner().invoke(app, ["blocks", "register"])
    assert cli.exit_code == 1, cli.output
    assert "DBT_CLOUD_ACCOUNT_ID" in cli.output and DBT_API_KEY not in cli.output

    monkeypatch.setenv("DBT_CLOUD_ACCOUNT_ID", "99")
    assert main() == 0
    out = capsys.readouterr().out
    assert "created" in out and DBT_API_KEY not in out
    assert DbtCloudCredentials.load(f"script-dbt-{suffix}").account_id == 99


def test_pagerduty_events_url_can_point_elsewhere_and_a_bad_one_is_refused(
    settings: Settings,
) -> None:
    from postload.blocks import pagerduty_notification_block

    proxy = "http://pd-proxy.internal:8080/v2/enqueue"
    assert pagerduty_notification_block(PAGERDUTY_KEY, proxy).url == proxy
    report = register_blocks(
        settings,
        _env(PAGERDUTY_INTEGRATION_KEY=PAGERDUTY_KEY, PAGERDUTY_EVENTS_URL="events.pagerduty.com"),
    )
    (result,) = report.group(PAGERDUTY_GROUP)
    assert result.status is BlockStatus.INVALID and "PAGERDUTY_EVENTS_URL" in result.detail
    assert PAGERDUTY_KEY not in result.detail
