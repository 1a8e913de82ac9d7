"""Injection: names from webhook payloads and from the pipeline config never reach SQL or the
dbt command line unvalidated.

Three doors: the webhook body (refused with 400, nothing recorded), the pipeline config (refused
with a ConfigError when loaded, so no SQL is ever built from it; the SQL builders check again),
and the ``postload plan`` argument (a clear error, not a traceback). dbt selections are the one
free-form config value: they reach dbt Core as argv elements and dbt Cloud inside a command
string, so no word of one may read as an option.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from dbt.cli.main import cli as dbt_cli
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from postload.cli import app as postload_cli
from postload.config import ConfigError, PipelineConfig, Selection, load_pipeline_config
from postload.fivetran.webhook import FivetranWebhook
from postload.plan import union_selection
from postload.sources import SourceTable
from postload.warehouse import _sql
from postload.warehouse._snowflake import copy_sql
from tests.conftest import PostloadHome
from tests.fivetran.test_receiver_hostile import SIGNATURE_HEADER, InProcessReceiver, hostile, sign

INJECTIONS = [
    "x; drop table raw.events; --",
    "events' or '1'='1",
    'events" or "1"="1',
    "--select *",
    "--full-refresh",
    "-x",
    "$(rm -rf /)",
    "`rm -rf /`",
    "events\nselect 1",
    "events\r\n",
    "../../etc/passwd",
    "events\x00",
    "events;",
    "raw.events",
    "events -- comment",
    "events/*",
    "a" * 10_000,
    "\u0435vents",  # Cyrillic small ie: looks like "events", is not ASCII
    "\uff45\uff56\uff45\uff4e\uff54\uff53",  # "events" in fullwidth letters
    "events\u200b",  # zero-width space
    "",
    " ",
]
IDS = [repr(s)[:24] for s in INJECTIONS]


# --- the webhook -------------------------------------------------------------------------------


def sync_end(**overrides: Any) -> dict[str, Any]:
    return {
        "event": "sync_end",
        "connector_id": "warm_ambitious",
        "sync_id": "b4703f73-6315-4e22-8d7a-3bfb18b2fed2",
        "data": {"status": "SUCCESSFUL"},
        **overrides,
    }


@pytest.fixture
def receiver(tmp_path: Path) -> Any:
    under_test = InProcessReceiver(tmp_path / "outbox.sqlite3")
    yield under_test
    under_test.close()


@pytest.mark.parametrize("field", ["connector_id", "sync_id", "event", "destination_group_id"])
def test_injection_in_a_webhook_identifier_is_400_and_records_nothing(
    receiver: InProcessReceiver, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="postload.receiver")
    # Directly on the logger: `postload receiver` turns its propagation off when it runs.
    logging.getLogger("postload.receiver").addHandler(caplog.handler)
    for injection in INJECTIONS:
        raw = json.dumps(sync_end(**{field: injection})).encode()
        response = receiver.post(raw, [(SIGNATURE_HEADER, sign(raw))])
        assert response.status_code == 400, (injection, response.text)
        assert response.json()["invalid"][0]["field"] == field
        # Named, never echoed: not in the reply and not in the log.
        if len(injection.strip()) >= 5:
            assert injection not in response.text
            assert injection not in caplog.text
    logging.getLogger("postload.receiver").removeHandler(caplog.handler)
    assert receiver.rows() == {}


# --- the pipeline config -------------------------------------------------------------------------


def base_config() -> dict[str, Any]:
    return {
        "raw_schema": "raw",
        "ops_schema": "ops",
        "sources": [
            {
                "name": "events",
                "raw_table": "events",
                "stage": "events",
                "dbt_source": "events",
                "loaded_at_field": "_loaded_at",
                "loader": {"type": "fivetran", "connector_id": "warm_ambitious"},
                "selection": {"tag": "events"},
            }
        ],
        "full_run": {"sources": ["events"], "stale_after": {"events": "2h"}},
    }


def inject(config: dict[str, Any], key: str, value: str) -> str:
    """Put ``value`` at ``key`` (a dotted path); returns the path the error must name."""
    source = config["sources"][0]
    if key in ("raw_schema", "ops_schema"):
        config[key] = value
    elif key.startswith("selection."):
        source["selection"] = {key.split(".")[1]: value}
    elif key == "loader.connector_id":
        source["loader"]["connector_id"] = value
    elif key == "full_run.sources":
        config["full_run"]["sources"] = [value]
    elif key == "full_run.stale_after":
        config["full_run"]["stale_after"] = {value: "2h"}
    else:
        source[key] = value
    return key.split(".")[-1]


# Every config value that is a name: each must be a plain identifier (or, for the connector, a
# Fivetran id), so every injection string is refused.
NAME_KEYS = [
    "raw_schema",
    "ops_schema",
    "name",
    "raw_table",
    "stage",
    "dbt_source",
    "loaded_at_field",
    "selection.tag",
    "selection.selector",
    "loader.connector_id",
    "full_run.sources",
    "full_run.stale_after",
]


@pytest.mark.parametrize("key", NAME_KEYS)
def test_injection_in_a_config_name_is_a_config_error(tmp_path: Path, key: str) -> None:
    path = tmp_path / "postload.yaml"
    for injection in INJECTIONS:
        config = base_config()
        named = inject(config, key, injection)
        path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            load_pipeline_config(path)
        message = str(err.value)
        assert str(path) in message
        assert named in message or "names source" in message, message[:500]


# Words dbt reads as options or a shell reads as syntax: an accepted selection has none.
SHELL_SYNTAX = set(";|&$`'\"\\<>(){}[]!#~\n\r\t\x00")


def dbt_cloud_step(selection: Selection) -> list[str]:
    """The dbt Cloud step postload sends (``steps_override``), split as a command line."""
    return shlex.split(f"dbt build {selection.describe()}")


@pytest.mark.parametrize("injection", INJECTIONS, ids=IDS)
def test_a_select_either_is_refused_or_cannot_carry_an_option(injection: str) -> None:
    try:
        selection = Selection(select=injection)
    except ValidationError:
        return
    # Accepted ("raw.events", "../../etc/passwd": harmless node-selection syntax that matches
    # nothing): one argv element for dbt Core, only non-option words for dbt Cloud.
    assert selection.cli_args() == ["--select", injection]
    words = dbt_cloud_step(selection)[3:]
    assert words == injection.split()
    assert not any(w.startswith("-") for w in words)
    assert not SHELL_SYNTAX & set(injection)


def test_an_option_inside_a_select_was_an_injection_into_dbt_cloud(tmp_path: Path) -> None:
    """Before the fix, this selection passed validation. As one argv element (dbt Core) it is
    harmless, but dbt Cloud runs ``dbt build <selection>`` as a command string, where the words
    become options: dbt's own parser shows both."""
    value = "source:events+ --full-refresh --target prod"
    build = dbt_cli.commands["build"]
    as_argv = build.make_context("build", ["--select", value], resilient_parsing=True)
    assert as_argv.params["full_refresh"] is False and as_argv.params["target"] is None
    as_step = build.make_context("build", shlex.split(f"--select {value}"), resilient_parsing=True)
    assert as_step.params["full_refresh"] is True and as_step.params["target"] == "prod"

    with pytest.raises(ValidationError, match="is not a dbt selection"):
        Selection(select=value)
    config = base_config()
    config["sources"][0]["selection"] = {"select": value}
    path = tmp_path / "postload.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"selection\.select: .* is not a dbt selection"):
        load_pipeline_config(path)


selection_alphabet = st.text(alphabet="abz09_.:*+@/,- ", max_size=40)


@hostile(300)
@given(values=st.lists(selection_alphabet, min_size=1, max_size=4))
def test_no_accepted_selection_or_union_of_them_carries_an_option(values: list[str]) -> None:
    """Over the whole alphabet the check allows (dashes and spaces included): whatever is
    accepted, alone or merged into one build by ``union_selection``, reaches dbt Core as one
    argv element and dbt Cloud as words that are not options."""
    accepted = []
    for value in values:
        try:
            accepted.append(Selection(select=value))
        except ValidationError:
            continue
    if not accepted:
        return
    # Selectors are resolved to model names by dbt; plain selections need no resolving.
    merged = union_selection(accepted, lambda s: pytest.fail("no selector here"))
    for selection in [*accepted, merged]:
        args = selection.cli_args()
        assert len(args) == 2 and args[0] == "--select"
        words = dbt_cloud_step(selection)[3:]
        assert words and not any(w.startswith("-") for w in words), args
        ctx = dbt_cli.commands["build"].make_context(
            "build", dbt_cloud_step(selection)[2:], resilient_parsing=True
        )
        # dbt's parser finds no option but --select in the step.
        assert ctx.params["full_refresh"] is False and ctx.params["target"] is None


@hostile(200)
@given(connector_id=st.text(alphabet="aZ09_-", min_size=1, max_size=12))
def test_every_configured_connector_id_is_one_the_receiver_accepts(connector_id: str) -> None:
    """A connector id the config takes but the receiver refuses would never trigger its source
    (the config took "-x" before the fix)."""
    config = base_config()
    config["sources"][0]["loader"]["connector_id"] = connector_id
    try:
        PipelineConfig.model_validate(config)
    except ValidationError:
        return
    FivetranWebhook.model_validate(sync_end(connector_id=connector_id))


TABLE = SourceTable("events", "events", "events", None, "raw", "events", "_loaded_at")


@pytest.mark.parametrize("injection", INJECTIONS, ids=IDS)
def test_sql_builders_refuse_unchecked_names(injection: str) -> None:
    """Defence in depth: a name that somehow bypassed the config still never becomes SQL."""
    builders = [
        lambda: copy_sql(injection, "events", "events"),
        lambda: copy_sql("raw", injection, "events"),
        lambda: copy_sql("raw", "events", injection),
        lambda: _sql.ops_ddl(injection),
        lambda: _sql.pipeline_status_view(injection),
        lambda: _sql.watermarks_sql(injection, [TABLE], epoch_us=str),
        lambda: _sql.watermarks_sql("ops", [replace(TABLE, source=injection)], epoch_us=str),
        lambda: _sql.watermarks_sql("ops", [replace(TABLE, table=injection)], epoch_us=str),
        lambda: _sql.watermarks_sql("ops", [replace(TABLE, schema=injection)], epoch_us=str),
        lambda: _sql.watermarks_sql(
            "ops", [replace(TABLE, loaded_at_field=injection)], epoch_us=str
        ),
        lambda: _sql.last_build_sql(injection, "?"),
        lambda: _sql.transform_history_sql(injection, 10),
    ]
    for build in builders:
        with pytest.raises(ValueError, match="is not a plain identifier"):
            build()


@pytest.mark.parametrize("key", ["raw_table", "stage", "raw_schema", "ops_schema"])
def test_the_cli_stops_at_the_config_before_touching_the_warehouse(
    postload_home: PostloadHome, key: str
) -> None:
    """`postload status` runs SQL right after loading the config: with an injected name it
    names the file and the key and exits, and the warehouse file is never even created."""
    config = base_config()
    inject(config, key, "x; drop table raw.events; --")
    (postload_home.root / "postload.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(postload_cli, ["status"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "postload.yaml" in result.output and key in result.output
    assert not postload_home.duckdb.exists()


# --- postload plan ------------------------------------------------------------------------------


@pytest.mark.parametrize("injection", INJECTIONS, ids=IDS)
def test_plan_with_an_injection_is_a_clear_error(
    postload_home: PostloadHome, injection: str
) -> None:
    # "--" ends the options, so even "--select *" arrives as the argument itself.
    result = CliRunner().invoke(postload_cli, ["plan", "--", injection])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert "error: unknown source or connector id" in result.output
    assert repr(injection)[:60] in result.output
    assert not postload_home.duckdb.exists()


@pytest.mark.parametrize("argument", ["--select *", "-x", "--full-refresh"])
def test_plan_with_an_option_like_argument_is_a_usage_error(
    postload_home: PostloadHome, argument: str
) -> None:
    result = CliRunner().invoke(postload_cli, ["plan", argument])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "No such option" in result.output
