"""No secret leaks: representative operations run with distinctive secret values, and everything
they leave behind is searched for those values.

"Everything" is what an operator or an attacker could read: log records (at DEBUG), the
receiver's JSON log lines, stdout/stderr at the file-descriptor level, exception messages,
reprs and tracebacks, HTTP replies, the receiver's outbox rows, the Prefect events it forwards
and the block documents as the Prefect API serves them. Each test also checks that the operation
really ran with the secret (it registered, verified, forwarded...), so a pass is not vacuous.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sqlite3
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import snowflake.connector
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL, temporary_settings
from prefect_dbt.cloud import DbtCloudCredentials
from prefect_snowflake import SnowflakeConnector, SnowflakeCredentials
from pydantic import ValidationError
from snowflake.connector import errors as sf_errors
from typer.testing import CliRunner

from postload.blocks import (
    PAGERDUTY_BLOCK,
    SLACK_BLOCK,
    SNOWFLAKE_CREDENTIALS_BLOCK,
    BlockEnv,
    slack_notification_block,
)
from postload.cli import app as postload_cli
from postload.config import ConfigError, PipelineConfig, Settings
from postload.fivetran.receiver import JsonLogFormatter
from postload.fivetran.webhook import SIGNATURE_HEADER
from postload.hooks import (
    SLACK_HOOK_BLOCK,
)
from postload.warehouse._snowflake import SnowflakeWarehouse
from tests.conftest import suite_secret
from tests.fivetran.test_receiver import free_port, wait_for_events
from tests.fivetran.test_receiver_hostile import InProcessReceiver, padded, sign

# Distinctive values: nothing else in this project or its dependencies contains them.
WEBHOOK_SECRET = suite_secret("leak canary: webhook_secret", "whsec-LEAKCANARY-webhook-7c1f0e5a")
SLACK_PATH = suite_secret(
    "leak canary: slack_path", "T0LEAKCANARY/B0LEAKCANARY/LeakCanarySlackPath42"
)
SLACK_URL = f"https://hooks.slack.com/services/{SLACK_PATH}"
DBT_CLOUD_API_KEY = suite_secret("leak canary: dbt_cloud_api_key", "dbtc_LEAKCANARY_api_key_93b1")
SNOWFLAKE_PASSWORD = suite_secret("leak canary: snowflake_password", "LEAKCANARY-snowflake-pw-5d2e")
PAGERDUTY_INTEGRATION_KEY = suite_secret(
    "leak canary: pagerduty_integration_key", "LEAKCANARYpdintegration0042"
)
PAGERDUTY_API_KEY = suite_secret(
    "leak canary: pagerduty_api_key", "LEAKCANARYpdapikey0043"
)  # set, unused
PREFECT_KEY = suite_secret("leak canary: prefect_key", "pnu_LEAKCANARY_prefect_key_0c9d")
API_PASSWORD = suite_secret("leak canary: api_password", "LEAKCANARY-basic-auth-pw")
SECRETS = (
    WEBHOOK_SECRET,
    SLACK_PATH,
    "LeakCanarySlackPath42",
    DBT_CLOUD_API_KEY,
    SNOWFLAKE_PASSWORD,
    PAGERDUTY_INTEGRATION_KEY,
    PAGERDUTY_API_KEY,
    PREFECT_KEY,
    API_PASSWORD,
)
HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def assert_no_secret(captured: str, *also: str) -> None:
    for secret in (*SECRETS, *also):
        assert secret not in captured, f"{secret!r} leaked: ...{_around(captured, secret)}..."


def _around(text: str, secret: str) -> str:
    i = text.find(secret)
    return text[max(0, i - 120) : i + len(secret) + 120].replace(secret, "<<SECRET>>")


def everything_about(exc: BaseException) -> str:
    """Every message and traceback line a failure could print, its chain included."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        parts += [str(node), repr(node), *(repr(a) for a in node.args)]
        parts += [str(getattr(node, a, "")) for a in ("msg", "raw_msg", "query")]
        stack += [node.__cause__, node.__context__]
    return "\n".join(parts)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The receiver's JSON log lines, as `postload receiver` writes them on stderr."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    handler.setLevel(logging.DEBUG)
    receiver_logger = logging.getLogger("postload.receiver")
    level = receiver_logger.level
    receiver_logger.addHandler(handler)
    receiver_logger.setLevel(logging.DEBUG)
    yield stream
    receiver_logger.removeHandler(handler)
    receiver_logger.setLevel(level)


def outbox_dump(path: Path) -> str:
    """Every column of every outbox row."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return "\n".join(repr(row) for row in db.execute("select * from outbox"))
    finally:
        db.close()


# --- the receiver --------------------------------------------------------------------------------


def test_the_receiver_never_logs_stores_or_answers_a_secret_or_signature(
    prefect_server: str,
    tmp_path: Path,
    json_log: io.StringIO,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    connector = f"leak_{uuid.uuid4().hex[:10]}"
    # Forwards to the real Prefect API, with an API key it must never print.
    live = InProcessReceiver(
        tmp_path / "live.sqlite3", secret=WEBHOOK_SECRET, api=prefect_server, api_key=PREFECT_KEY
    )
    # Forwards to nothing, through a URL carrying a password: the failure path.
    down = InProcessReceiver(
        tmp_path / "down.sqlite3",
        secret=WEBHOOK_SECRET,
        api=f"http://svc:{API_PASSWORD}@127.0.0.1:{free_port()}/api",
        api_key=PREFECT_KEY,
    )
    body = json.dumps(
        {
            "event": "sync_end",
            "connector_id": connector,
            "connector_name": "pg",
            "sync_id": "sync-1",
            "data": {"status": "SUCCESSFUL"},
        }
    ).encode()
    right = sign(body, WEBHOOK_SECRET)
    sent: list[str] = [right]  # every signature put on the wire, and every right digest
    replies: list[str] = []
    try:
        for receiver in (live, down):
            for raw, header in [
                (body, right),  # accepted
                (body, right.upper()),  # a redelivery
                (body, sign(body, "not-the-secret")),  # wrong secret
                (body + b" ", right),  # body changed
                (body, None),  # unsigned
                (b"not json", sign(b"not json", WEBHOOK_SECRET)),
                (b'{"event": "test_event"}', sign(b'{"event": "test_event"}', WEBHOOK_SECRET)),
                (
                    json.dumps({"event": "sync_end", "connector_id": "bad id"}).encode(),
                    sign(
                        json.dumps({"event": "sync_end", "connector_id": "bad id"}).encode(),
                        WEBHOOK_SECRET,
                    ),
                ),
                (padded(1 << 20 | 1), "0" * 64),
            ]:
                headers: list[tuple[str | bytes, str | bytes]] = []
                if header is not None:
                    headers.append((SIGNATURE_HEADER, header))
                    sent.append(header)
                sent.append(sign(raw, WEBHOOK_SECRET))
                response = receiver.post(raw, headers)
                assert response.status_code != 500, response.text
                replies.append(response.text)

        # A request that fails inside: another process holds the outbox's write lock (the
        # receiver gives up after its 1 s busy timeout and answers 503, logging why).
        other = json.dumps({"event": "sync_start", "connector_id": connector, "sync_id": "2"})
        locker = sqlite3.connect(down.outbox_path, isolation_level=None)
        locker.execute("begin exclusive")
        try:
            failed = down.post_signed(other.encode())
        finally:
            locker.execute("rollback")
            locker.close()
        assert failed.status_code == 503
        replies.append(failed.text)

        assert live.forward() == 1
        with pytest.raises(Exception) as forward_error:
            down.forward()
        health = [live.get("/healthz").text, down.get("/healthz").text]
        assert "Connect" in health[1]  # the forwarding error is reported...
        reprs = [repr(live.receiver), repr(down.receiver), everything_about(forward_error.value)]
        outboxes = outbox_dump(live.outbox_path) + outbox_dump(down.outbox_path)
    finally:
        live.close()
        down.close()

    events = wait_for_events(prefect_server, "fivetran.sync.succeeded", connector)
    assert [e["payload"]["connector_id"] for e in events] == [connector]

    lines = json_log.getvalue()
    assert lines.count('"msg": "request"') >= 19  # one line per request, every status
    assert "could not store an event" in lines  # the 503, with SQLite's reason
    out, err = capfd.readouterr()
    captured = "\n".join(
        [lines, caplog.text, out, err, *replies, *health, *reprs, outboxes, json.dumps(events)]
    )
    # ...but no secret, API key, password, signature or digest anywhere.
    assert_no_secret(captured, *sent)
    for own in (lines, caplog.text):
        assert not HEX64.search(own), "something 64-hex long (a digest) was logged"


# --- settings -----------------------------------------------------------------------------------


def test_settings_never_show_the_webhook_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # .env is read from the working directory
    monkeypatch.setenv("POSTLOAD_FIVETRAN_WEBHOOK_SECRET", WEBHOOK_SECRET)
    settings = Settings()
    secret, source = settings.resolve_fivetran_webhook_secret()
    assert secret == WEBHOOK_SECRET  # it is really there
    texts = [
        repr(settings),
        str(settings),
        f"{settings}",
        repr(settings.model_dump()),
        settings.model_dump_json(),
        repr(settings.fivetran_webhook_secret),
        str(settings.fivetran_webhook_secret),
        source,
    ]

    # Invalid settings next to the secret: the error shows the bad value, not the secret.
    monkeypatch.setenv("POSTLOAD_RECEIVER_PORT", "not-a-port")
    monkeypatch.setenv("POSTLOAD_RECEIVER_MAX_BODY_BYTES", "-1")
    with pytest.raises(ValidationError) as from_env:
        Settings()
    # ...and the same from a .env file holding the secret.
    monkeypatch.delenv("POSTLOAD_FIVETRAN_WEBHOOK_SECRET")
    monkeypatch.delenv("POSTLOAD_RECEIVER_PORT")
    monkeypatch.delenv("POSTLOAD_RECEIVER_MAX_BODY_BYTES")
    (tmp_path / ".env").write_text(
        f"POSTLOAD_FIVETRAN_WEBHOOK_SECRET={WEBHOOK_SECRET}\nPOSTLOAD_RECEIVER_PORT=99999\n"
    )
    with pytest.raises(ValidationError) as from_file:
        Settings()
    for err in (from_env.value, from_file.value):
        assert "receiver_port" in str(err)
        texts += [everything_about(err), err.json(), repr(err.errors())]
    assert_no_secret("\n".join(texts))


# --- the webhook secret's resolution -------------------------------------------------------------


def test_resolving_the_secret_never_shows_it_when_it_fails(
    prefect_server: str, tmp_path: Path
) -> None:
    # A Secret block holding something else than a string, with the secret inside.
    block = f"leak-webhook-secret-{uuid.uuid4().hex[:8]}"
    Secret(value={"secret": WEBHOOK_SECRET}).save(block)
    settings = Settings(_env_file=None, project_dir=tmp_path, fivetran_webhook_secret_block=block)
    with pytest.raises(ConfigError) as holds_a_dict:
        settings.resolve_fivetran_webhook_secret()
    assert "holds a dict" in str(holds_a_dict.value)

    # The Prefect API unreachable, through a URL with a password and with an API key.
    api = f"http://svc:{API_PASSWORD}@127.0.0.1:{free_port()}/api"
    with (
        temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_KEY: PREFECT_KEY}),
        pytest.raises(ConfigError) as unreachable,
    ):
        settings.resolve_fivetran_webhook_secret()
    assert "could not be read from the Prefect API" in str(unreachable.value)

    assert_no_secret(everything_about(holds_a_dict.value) + everything_about(unreachable.value))


# --- postload blocks register -------------------------------------------------------------------

BLOCK_ENV = {
    "SNOWFLAKE_ACCOUNT": "acct-leak",
    "SNOWFLAKE_USER": "loader",
    "SNOWFLAKE_PASSWORD": SNOWFLAKE_PASSWORD,
    "SNOWFLAKE_ROLE": "TRANSFORMER",
    "SNOWFLAKE_WAREHOUSE": "TRANSFORMING",
    "SNOWFLAKE_DATABASE": "ANALYTICS",
    "DBT_CLOUD_API_KEY": DBT_CLOUD_API_KEY,
    "DBT_CLOUD_ACCOUNT_ID": "4242",
    "SLACK_WEBHOOK_URL": SLACK_URL,
    "PAGERDUTY_INTEGRATION_KEY": PAGERDUTY_INTEGRATION_KEY,
    "PAGERDUTY_API_KEY": PAGERDUTY_API_KEY,
    "POSTLOAD_FIVETRAN_WEBHOOK_SECRET": WEBHOOK_SECRET,
}
FIXED_BLOCKS = (
    (SNOWFLAKE_CREDENTIALS_BLOCK, "snowflake-credentials"),
    (SLACK_BLOCK, "custom-webhook"),
    (PAGERDUTY_BLOCK, "custom-webhook"),
    (SLACK_HOOK_BLOCK, "slack-incoming-webhook"),
)


def _fixed_block_ids() -> dict[str, Any]:
    found = {}
    with get_client(sync_client=True) as client:
        for name, slug in FIXED_BLOCKS:
            try:
                found[name] = client.read_block_document_by_name(
                    name, slug, include_secrets=False
                ).id
            except ObjectNotFound:
                continue
    return found


@pytest.fixture
def block_env(
    prefect_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """The production variables set, block names unique to this test where they are settings;
    the fixed-name documents this test creates are deleted afterwards (test_blocks expects to
    create them itself)."""
    monkeypatch.chdir(tmp_path)  # no .env file is read
    for name in BlockEnv.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    suffix = uuid.uuid4().hex[:8]
    names = {
        "POSTLOAD_SNOWFLAKE_BLOCK": f"leak-snowflake-{suffix}",
        "POSTLOAD_DBT_CLOUD_CREDENTIALS_BLOCK": f"leak-dbt-cloud-{suffix}",
        "POSTLOAD_FIVETRAN_WEBHOOK_SECRET_BLOCK": f"leak-webhook-secret-{suffix}",
    }
    for key, value in {**BLOCK_ENV, **names}.items():
        monkeypatch.setenv(key, value)
    existing = _fixed_block_ids()
    yield names
    with get_client(sync_client=True) as client:
        for name, document_id in _fixed_block_ids().items():
            if existing.get(name) != document_id:
                client.delete_block_document(document_id)


def test_blocks_register_never_shows_a_secret(
    block_env: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    runner = CliRunner()
    outputs = []

    first = runner.invoke(postload_cli, ["blocks", "register"])
    assert first.exit_code == 0, first.output
    assert first.output.count("created") >= 6  # every block really was saved
    again = runner.invoke(postload_cli, ["blocks", "register"])
    assert again.exit_code == 0 and again.output.count("unchanged") >= 6, again.output
    outputs += [first, again]

    # Invalid values next to the secrets (both Snowflake auth methods; a non-numeric account).
    monkeypatch.setenv("SNOWFLAKE_PRIVATE_KEY_PATH", "/keys/rsa_key.p8")
    monkeypatch.setenv("DBT_CLOUD_ACCOUNT_ID", "not-a-number")
    invalid = runner.invoke(postload_cli, ["blocks", "register"])
    assert "invalid" in invalid.output, invalid.output
    # Incomplete: a secret without its companions.
    for key in BLOCK_ENV:
        monkeypatch.delenv(key)
    monkeypatch.delenv("SNOWFLAKE_PRIVATE_KEY_PATH")
    monkeypatch.setenv("DBT_CLOUD_API_KEY", DBT_CLOUD_API_KEY)
    monkeypatch.setenv("SNOWFLAKE_PASSWORD", SNOWFLAKE_PASSWORD)
    incomplete = runner.invoke(postload_cli, ["blocks", "register"])
    assert incomplete.exit_code == 1 and "incomplete" in incomplete.output
    # Saving fails: the Prefect API unreachable, through a URL with a password and a key.
    monkeypatch.delenv("DBT_CLOUD_API_KEY")
    monkeypatch.delenv("SNOWFLAKE_PASSWORD")
    monkeypatch.setenv("POSTLOAD_FIVETRAN_WEBHOOK_SECRET", WEBHOOK_SECRET)
    api = f"http://svc:{API_PASSWORD}@127.0.0.1:{free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_KEY: PREFECT_KEY}):
        failed = runner.invoke(postload_cli, ["blocks", "register"])
    assert "failed" in failed.output, failed.output
    outputs += [invalid, incomplete, failed]

    # What the Prefect API serves (the UI's view, secrets not requested), and the blocks as
    # loaded by the flows, printed.
    with get_client(sync_client=True) as client:
        documents = [
            client.read_block_document_by_name(name, slug, include_secrets=False).model_dump_json()
            for name, slug in [
                (block_env["POSTLOAD_SNOWFLAKE_BLOCK"], "snowflake-connector"),
                (block_env["POSTLOAD_DBT_CLOUD_CREDENTIALS_BLOCK"], "dbt-cloud-credentials"),
                (block_env["POSTLOAD_FIVETRAN_WEBHOOK_SECRET_BLOCK"], "secret"),
                *FIXED_BLOCKS,
            ]
        ]
    loaded = [
        SnowflakeConnector.load(block_env["POSTLOAD_SNOWFLAKE_BLOCK"]),
        SnowflakeCredentials.load(SNOWFLAKE_CREDENTIALS_BLOCK),
        DbtCloudCredentials.load(block_env["POSTLOAD_DBT_CLOUD_CREDENTIALS_BLOCK"]),
        Secret.load(block_env["POSTLOAD_FIVETRAN_WEBHOOK_SECRET_BLOCK"]),
    ]
    # The secrets are really stored (only shown when asked for).
    assert loaded[1].password.get_secret_value() == SNOWFLAKE_PASSWORD
    assert loaded[3].get() == WEBHOOK_SECRET

    out, err = capfd.readouterr()
    captured = "\n".join(
        [
            *(r.output for r in outputs),
            *(everything_about(r.exception) for r in outputs if r.exception is not None),
            caplog.text,
            out,
            err,
            *documents,
            *(repr(block) for block in loaded),
            *(str(block) for block in loaded),
        ]
    )
    assert_no_secret(captured)


def test_a_slack_url_without_a_scheme_is_refused_without_echoing_it() -> None:
    # Only the T.../B.../... path pasted: it is the whole secret, so it must not become a URL.
    with pytest.raises(ValueError) as raised:
        slack_notification_block(SLACK_PATH)
    assert "https://hooks.slack.com/services/" in str(raised.value)
    assert SLACK_PATH not in str(raised.value)


# --- Snowflake ------------------------------------------------------------------------------------


def test_rejected_snowflake_credentials_never_show_the_password(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Not a transient failure, so it is re-raised as the driver's error rather than wrapped:
    it is scrubbed in place even then, including a driver message that echoes the password."""
    caplog.set_level(logging.DEBUG)
    attempts = []

    def refuse(**kwargs: Any) -> Any:
        attempts.append(kwargs["password"])
        raise sf_errors.DatabaseError(
            msg=f"Incorrect username or password was specified (password={kwargs['password']})",
            errno=390100,
            sqlstate="08001",
        )

    # The driver's connect is the boundary: everything above it is the real connector block
    # and the real warehouse code.
    monkeypatch.setattr(snowflake.connector, "connect", refuse)
    connector = SnowflakeConnector(
        credentials=SnowflakeCredentials(account="acct", user="u", password=SNOWFLAKE_PASSWORD),
        database="DB",
        warehouse="WH",
        schema="RAW",
    )
    pipeline = PipelineConfig.model_validate(
        {"sources": [{"name": "events", "raw_table": "events", "stage": "events"}]}
    )
    warehouse = SnowflakeWarehouse(lambda: connector.model_copy(), pipeline)
    with pytest.raises(sf_errors.DatabaseError) as rejected:
        warehouse.ensure_schema()
    assert attempts == [SNOWFLAKE_PASSWORD]  # the password was really used
    out, err = capfd.readouterr()
    assert_no_secret(
        "\n".join([everything_about(rejected.value), caplog.text, out, err, repr(connector)])
    )
