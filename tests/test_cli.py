from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from postload.cli import app
from tests.conftest import REPO, PostloadHome, land_and_load

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
    assert {
        "demo",
        "stack",
        "send-sync",
        "serve",
        "receiver",
        "plan",
        "transform",
        "automations apply",
        "schedules apply",
        "init",
        "doctor",
    } <= names


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


# --- postload transform ------------------------------------------------------------------------


@dataclass
class FakeFlow:
    """transform-on-sync as the command loads it from its entrypoint: records its calls."""

    result: dict[str, Any] = field(default_factory=lambda: {"builds": []})
    error: Exception | None = None
    params: tuple[str, ...] = ("connector_id", "sync_id", "reason", "sources")
    calls: list[dict[str, Any]] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)  # the entrypoints it was loaded from

    @property
    def parameters(self) -> Any:
        return SimpleNamespace(properties={name: {} for name in self.params})

    def __call__(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def fake_transform(postload_home: PostloadHome, monkeypatch: pytest.MonkeyPatch) -> FakeFlow:
    shutil.copy(REPO / "prefect.yaml", postload_home.root / "prefect.yaml")
    fake = FakeFlow()

    def load_deployment_flow(root: Path, spec: Any) -> FakeFlow:
        assert root == postload_home.root
        fake.loaded.append(spec.entrypoint)
        return fake

    monkeypatch.setattr("postload.local.serve.load_deployment_flow", load_deployment_flow)
    return fake


def test_transform_builds_what_is_pending_in_this_process(fake_transform: FakeFlow) -> None:
    fake_transform.result = {
        "builds": [
            {
                "sources": ["orders", "events"],
                "selection": "--select source:orders+ stg_events",
                "status": "success",
            }
        ]
    }
    result = runner.invoke(app, ["transform"])
    assert result.exit_code == 0, result.output
    assert fake_transform.loaded == ["flows/transform_on_sync.py:transform_on_sync"]
    assert fake_transform.calls == [{"reason": "manual"}]
    assert result.output.splitlines() == [
        "orders, events: dbt build --select source:orders+ stg_events → success"
    ]


def test_transform_with_nothing_pending_says_so(fake_transform: FakeFlow) -> None:
    result = runner.invoke(app, ["transform"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("nothing pending:")


def test_transform_only_the_named_sources(fake_transform: FakeFlow) -> None:
    result = runner.invoke(app, ["transform", "orders", "events", "orders"])
    assert result.exit_code == 0, result.output
    assert fake_transform.calls == [{"reason": "manual", "sources": ["orders", "events"]}]
    assert result.output.startswith("nothing pending for orders, events:")


def test_transform_of_an_unknown_source_lists_the_known_ones(
    fake_transform: FakeFlow, postload_home: PostloadHome
) -> None:
    result = runner.invoke(app, ["transform", "orders", "ordres"])
    assert result.exit_code == 2
    assert (
        f"unknown source(s) 'ordres': expected sources from {postload_home.root / 'postload.yaml'} "
        "(customers, orders, events)"
    ) in " ".join(result.output.split())
    assert fake_transform.loaded == []


def test_transform_of_sources_needs_a_flow_that_takes_them(fake_transform: FakeFlow) -> None:
    fake_transform.params = ("connector_id", "sync_id", "reason")
    result = runner.invoke(app, ["transform", "orders"])
    assert result.exit_code == 2
    assert "takes no `sources` parameter" in result.output
    assert fake_transform.calls == []
    # without sources it runs
    assert runner.invoke(app, ["transform"]).exit_code == 0


def test_a_failed_build_fails_the_command(fake_transform: FakeFlow) -> None:
    from postload.dbt import DbtBuildError, DbtBuildResult
    from postload.warehouse import NodeResult

    failed = NodeResult(
        unique_id="model.postload_demo.fct_orders",
        name="fct_orders",
        resource_type="model",
        status="error",
        message="Binder Error: column x not found",
    )
    fake_transform.error = DbtBuildError(
        DbtBuildResult(selection="--select source:orders+", nodes=[failed])
    )
    result = runner.invoke(app, ["transform"])
    assert result.exit_code == 1
    assert (
        "failed: dbt build --select source:orders+ failed: fct_orders (error: Binder Error: "
        "column x not found)"
    ) in result.output
    assert "run `postload transform` again" in result.output


def test_transform_reruns_a_failed_transform_without_new_data(
    prefect_server: str, postload_home: PostloadHome, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The story the command is for: a build fails, nothing new lands, the fix is in: one
    command builds the source that stayed pending, and then nothing is."""
    monkeypatch.setenv("POSTLOAD_SYNC_DEBOUNCE_SECONDS", "0")
    monkeypatch.setenv("POSTLOAD_RETRIES", "0")
    shutil.copy(REPO / "prefect.yaml", postload_home.root / "prefect.yaml")
    shutil.copytree(
        REPO / "flows", postload_home.root / "flows", ignore=shutil.ignore_patterns("__pycache__")
    )
    model = postload_home.root / "dbt_project" / "models" / "marts" / "fct_daily_events.sql"
    good = model.read_text()
    model.write_text("select no_such_column from {{ ref('stg_events') }}\n")
    land_and_load(postload_home, "events", 1)

    failed = runner.invoke(app, ["transform"])
    assert failed.exit_code == 1, failed.output
    assert "fct_daily_events" in failed.output

    model.write_text(good)
    fixed = runner.invoke(app, ["transform"])
    assert fixed.exit_code == 0, fixed.output
    [line] = [line for line in fixed.output.splitlines() if line.startswith("events: ")]
    assert line.endswith("→ success"), line

    again = runner.invoke(app, ["transform", "events"])
    assert again.exit_code == 0, again.output
    assert "nothing pending for events" in again.output


def test_schedules_apply_needs_the_prefect_api(postload_home: PostloadHome) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = runner.invoke(
            app, ["schedules", "apply", "--prefect-yaml", str(REPO / "prefect.yaml")]
        )
    assert result.exit_code == 2
    assert "PREFECT_API_URL is not set" in result.output
