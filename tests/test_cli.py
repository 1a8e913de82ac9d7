from __future__ import annotations

import pytest
from typer.testing import CliRunner

from postload.cli import app
from tests.conftest import PostloadHome

runner = CliRunner()

COMMANDS = [
    [],
    ["demo"],
    ["run"],
    ["plan"],
    ["sources"],
    ["status"],
    ["blocks"],
    ["blocks", "register"],
]


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
    assert "unknown source 'ordres'; known sources: customers, orders, events" in result.output


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
