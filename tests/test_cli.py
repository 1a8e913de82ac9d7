from __future__ import annotations

import json
import os
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from postload.cli import app
from tests.conftest import PostloadHome

runner = CliRunner()


def _all_commands() -> list[list[str]]:
    """Every command and sub-command of the CLI, found from the app itself."""
    import typer

    found: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        found.append(path)
        if hasattr(command, "commands"):  # a group (typer ships its own click classes)
            for name, sub in command.commands.items():
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


COMMANDS = _all_commands()


def test_the_cli_has_the_documented_commands() -> None:
    names = {" ".join(c) for c in COMMANDS}
    assert {"demo", "stack", "send-sync", "serve", "receiver", "plan", "automations apply"} <= names


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "postload")
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert len(result.output.strip().splitlines()) > 3


def test_sources_lists_selection_per_source(postload_home: PostloadHome) -> None:
    result = runner.invoke(app, ["sources"])
    assert result.exit_code == 0, result.output
    assert "events" in result.output and "--selector events_pipeline" in result.output
    assert "--select source:orders+" in result.output


def test_plan_lists_nodes_without_building(postload_home: PostloadHome) -> None:
    result = runner.invoke(app, ["plan", "orders"])
    assert result.exit_code == 0, result.output
    assert "dbt build --select source:orders+" in result.output
    assert "model.postload_demo.stg_orders" in result.output
    assert "model.postload_demo.customer_orders" in result.output
    assert "stg_events" not in result.output
    assert not postload_home.duckdb.exists(), "plan must not build anything"


def test_plan_unknown_source_lists_known(postload_home: PostloadHome) -> None:
    result = runner.invoke(app, ["plan", "ordres"])
    assert result.exit_code == 2
    assert (
        "unknown source or connector id 'ordres': expected one of the sources "
        "(customers, orders, events) or Fivetran connector ids "
        "(none: no source has loader type fivetran)"
    ) in result.output
    assert str(postload_home.root / "postload.yaml") in result.output


CONNECTOR = "warm_ambitious"


def fivetran_loaded(home: PostloadHome, **connectors: str) -> None:
    """Rewrite the home's pipeline config so the named sources are loaded by Fivetran."""
    path = home.root / "postload.yaml"
    config = yaml.safe_load(path.read_text())
    for source in config["sources"]:
        if source["name"] in connectors:
            source["loader"] = {"type": "fivetran", "connector_id": connectors[source["name"]]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def test_plan_connector_id_builds_the_union_of_its_sources(postload_home: PostloadHome) -> None:
    # orders selects with `select`, events with a selectors.yml selector: the union resolves
    # the selector to model names, as the sync-triggered transform does.
    fivetran_loaded(postload_home, orders=CONNECTOR, events=CONNECTOR, customers="other_conn")

    result = runner.invoke(app, ["plan", CONNECTOR])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"connector {CONNECTOR}: sources orders, events"
    assert "  orders: --select source:orders+" in lines
    assert "  events: --selector events_pipeline" in lines
    build = next(line for line in lines if line.startswith("dbt build "))
    assert build.startswith("dbt build --select source:orders+ ")
    assert "stg_events" in build.split() and "fct_daily_events" in build.split()
    nodes = {line.strip() for line in lines if line.startswith("  model.")}
    assert {
        "model.postload_demo.stg_orders",
        "model.postload_demo.fct_orders",
        "model.postload_demo.customer_orders",
        "model.postload_demo.stg_events",
        "model.postload_demo.fct_daily_events",
    } <= nodes
    assert "model.postload_demo.stg_customers" not in nodes
    assert any(line.startswith("  test.postload_demo.") for line in lines), "tests follow"
    assert not postload_home.duckdb.exists(), "plan must not build anything"


def test_plan_connector_with_one_source_is_that_sources_selection(
    postload_home: PostloadHome,
) -> None:
    fivetran_loaded(postload_home, customers="solo_conn")
    result = runner.invoke(app, ["plan", "solo_conn"])
    assert result.exit_code == 0, result.output
    assert "connector solo_conn: sources customers" in result.output
    assert "dbt build --selector customers_pipeline" in result.output
    assert "model.postload_demo.stg_customers" in result.output
    assert "model.postload_demo.stg_orders" not in result.output


def test_plan_unknown_target_lists_sources_and_connector_ids(postload_home: PostloadHome) -> None:
    fivetran_loaded(postload_home, orders=CONNECTOR, events=CONNECTOR, customers="other_conn")
    result = runner.invoke(app, ["plan", "warm_ambitous"])
    assert result.exit_code == 2
    assert (
        "unknown source or connector id 'warm_ambitous': expected one of the sources "
        f"(customers, orders, events) or Fivetran connector ids (other_conn, {CONNECTOR})"
    ) in result.output
    assert "Traceback" not in result.output


def test_cloud_webhook_template_prints_the_packaged_template() -> None:
    from postload.fivetran.webhook import cloud_webhook_template

    result = runner.invoke(app, ["cloud-webhook-template"])
    assert result.exit_code == 0, result.output
    assert result.output == cloud_webhook_template()
    assert '"payload": {{ body | tojson }}' in result.output
    json.dumps(result.output)  # one argument for `--template "$(...)"`


def test_bad_config_is_reported_not_a_traceback(postload_home: PostloadHome) -> None:
    (postload_home.root / "postload.yaml").write_text(
        "sources:\n  - name: x\n    raw_table: 'a b'\n    stage: x\n"
    )
    result = runner.invoke(app, ["sources"])
    assert result.exit_code == 2
    assert "sources[0](name=x).raw_table: 'a b' is not a plain identifier" in result.output


def test_status_on_a_new_warehouse(postload_home: PostloadHome) -> None:
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "(no loads recorded yet)" in result.output


def test_entry_point_gives_a_temporary_local_api_the_local_server_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from postload import cli
    from postload.local.stack import LOCAL_SERVER_SETTINGS

    for name in LOCAL_SERVER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE", "7")
    monkeypatch.setattr("sys.argv", ["postload", "--help"])

    with pytest.raises(SystemExit):
        cli.main()

    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL"] == "1"
    assert os.environ["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"] == "7"  # yours wins
