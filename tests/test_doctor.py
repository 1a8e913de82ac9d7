"""`postload doctor`: each check alone (config, config vs dbt project, profile, connection,
warehouse) without a Prefect server, and the API, blocks, deployments and automations checks on
the session's test server."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from postload.cli import app
from postload.config import PipelineConfig, Settings
from postload.dbt import DbtProject
from postload.dbt.project import ProfileTarget
from postload.doctor import (
    CheckResult,
    Status,
    check_automations,
    check_blocks,
    check_config,
    check_dbt_connection,
    check_dbt_profile,
    check_deployments,
    check_prefect_api,
    check_sources,
    check_warehouse_matches_profile,
    scrub,
)
from tests.conftest import REPO, suite_secret

runner = CliRunner()

WEBHOOK_SECRET = suite_secret("doctor: Fivetran webhook secret", "whsec-doctor-71c2e9")
SNOWFLAKE_PASSWORD = suite_secret("doctor: Snowflake password", "sfpass-doctor-0d4a")


@pytest.fixture
def home(tmp_path: Path, parsed_dbt_project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout: the repo's postload.yaml and prefect.yaml, the demo dbt project (parsed)."""
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copytree(parsed_dbt_project, root / "dbt_project")
    shutil.copy(REPO / "postload.yaml", root / "postload.yaml")
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    monkeypatch.setenv("POSTLOAD_PROJECT_DIR", str(root))
    monkeypatch.chdir(root)
    for name in ("POSTLOAD_WAREHOUSE", "POSTLOAD_DBT_RUNNER", "POSTLOAD_DUCKDB_PATH"):
        monkeypatch.delenv(name, raising=False)
    return root


def _pipeline(sources: list[dict]) -> PipelineConfig:
    return PipelineConfig.model_validate({"sources": sources})


def _by_check(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.check: r for r in results}


def test_a_config_that_does_not_load_fails_naming_the_key(home: Path) -> None:
    (home / "postload.yaml").write_text("sources:\n  - name: orders\n    stage: orders\n")
    result, pipeline = check_config(Settings())
    assert pipeline is None and result.status is Status.FAIL
    assert "sources[0](name=orders)" in result.message and "raw_table" in result.message
    assert "postload init" in (result.fix or "")


def test_sources_are_checked_against_the_dbt_project(home: Path) -> None:
    settings = Settings()
    project = DbtProject.from_settings(settings)
    pipeline = _pipeline(
        [
            # fine: a dbt-source-shaped Fivetran source
            {"name": "customers", "loader": {"type": "fivetran", "connector_id": "c1"}},
            # a dbt source the dbt project does not declare
            {"name": "salesforce", "loader": {"type": "fivetran", "connector_id": "c2"}},
            # a selection that selects nothing
            {
                "name": "orders",
                "raw_table": "orders",
                "stage": "orders",
                "selection": {"tag": "no_such_tag"},
            },
        ]
    )
    results = _by_check(check_sources(pipeline, project, project.manifest()))
    customers = results["source customers"]
    assert customers.status is Status.OK, customers
    assert "dbt source customers: 1 table(s), loaded_at_field _loaded_at" in customers.message
    assert "selects" in customers.message

    salesforce = results["source salesforce"]
    assert salesforce.status is Status.FAIL
    assert "dbt source 'salesforce'" in salesforce.message
    assert "dbt sources: customers, events, orders" in salesforce.message

    orders = results["source orders"]
    assert orders.status is Status.FAIL
    assert "--select tag:no_such_tag selects nothing" in orders.message
    assert "postload plan orders" in (orders.fix or "")


def test_the_profile_and_the_warehouse(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    project = DbtProject.from_settings(settings)
    result, target = check_dbt_profile(settings, project)
    assert result.status is Status.OK, result
    assert target is not None and target.type == "duckdb"
    assert check_warehouse_matches_profile(settings, target).status is Status.OK

    monkeypatch.setenv("POSTLOAD_WAREHOUSE", "snowflake")
    mismatch = check_warehouse_matches_profile(Settings(), target)
    assert mismatch.status is Status.FAIL
    assert "POSTLOAD_WAREHOUSE=snowflake but the dbt target 'duckdb'" in mismatch.message
    assert "POSTLOAD_WAREHOUSE=duckdb" in (mismatch.fix or "")
    postgres = ProfileTarget(Path("profiles.yml"), "p", "dev", "postgres", None)
    assert check_warehouse_matches_profile(settings, postgres).status is Status.FAIL


def test_a_profile_opening_another_duckdb_file_fails(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not hasattr(DbtProject, "check_profile"):
        pytest.skip("DbtProject.check_profile is not in this checkout")
    profiles = home / "dbt_project" / "profiles.yml"
    profiles.write_text(
        profiles.read_text().replace("\"{{ env_var('POSTLOAD_DUCKDB_PATH') }}\"", "other.duckdb")
    )
    settings = Settings()
    result, _ = check_dbt_profile(settings, DbtProject.from_settings(settings))
    assert result.status is Status.FAIL
    assert "other.duckdb" in result.message and "POSTLOAD_DUCKDB_PATH" in result.message


def test_the_dbt_connection(home: Path) -> None:
    settings = Settings()
    project = DbtProject.from_settings(settings)
    _, target = check_dbt_profile(settings, project)
    assert target is not None
    # No warehouse yet: not created by the doctor.
    absent = check_dbt_connection(settings, project, target)
    assert absent.status is Status.OK and "does not exist yet" in absent.message
    assert not settings.duckdb_file.exists()

    import duckdb

    settings.duckdb_file.parent.mkdir(parents=True)
    duckdb.connect(str(settings.duckdb_file)).close()
    ok = check_dbt_connection(settings, project, target)
    assert ok.status is Status.OK and "dbt connects with target 'duckdb'" in ok.message

    settings.duckdb_file.write_bytes(b"not a duckdb database" * 1000)
    broken = check_dbt_connection(settings, project, target)
    assert broken.status is Status.FAIL, broken
    assert "dbt cannot connect" in broken.message and "dbt debug" in (broken.fix or "")


def test_doctor_without_a_prefect_api(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # A Fivetran source and its secret from the environment; secrets never in the output.
    config = yaml.safe_load((home / "postload.yaml").read_text())
    config["sources"][1] = {"name": "orders", "loader": {"type": "fivetran", "connector_id": "c"}}
    (home / "postload.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("POSTLOAD_FIVETRAN_WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("SNOWFLAKE_PASSWORD", SNOWFLAKE_PASSWORD)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("✓ pipeline config:")
    assert "✓ source orders: dbt source orders: 1 table(s)" in result.output
    assert "✓ Fivetran webhook secret: from POSTLOAD_FIVETRAN_WEBHOOK_SECRET" in result.output
    assert "! Prefect API: no PREFECT_API_URL: flows would use a temporary local server" in (
        result.output
    )
    assert "- deployments: not checked" in result.output
    assert result.output.rstrip().endswith("everything required holds")
    assert WEBHOOK_SECRET not in result.output and SNOWFLAKE_PASSWORD not in result.output


def test_a_failing_check_fails_the_command(home: Path) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    (home / "postload.yaml").write_text(
        "sources:\n  - name: salesforce\n    loader: {type: fivetran, connector_id: c}\n"
    )
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1, result.output
    assert "✗ source salesforce:" in result.output
    assert "1 check(s) failed" in result.output


def test_an_api_that_does_not_answer_fails_without_its_credentials() -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: f"http://doctor:{WEBHOOK_SECRET}@127.0.0.1:9/api"}),
        get_client(sync_client=True) as client,
    ):
        result = check_prefect_api(client)
    assert result.status is Status.FAIL
    assert "PREFECT_API_URL=http://127.0.0.1:9/api does not answer" in result.message
    assert WEBHOOK_SECRET not in " ".join(result.lines())


def test_scrub_removes_secret_values() -> None:
    assert scrub(f"token={WEBHOOK_SECRET}!", [WEBHOOK_SECRET]) == "token=***!"


# --- on the Prefect test server ----------------------------------------------------------------


@pytest.fixture
def client(prefect_server: str) -> Iterator[object]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        yield c


def test_api_deployments_blocks_and_automations(
    client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.automations import Automation

    from postload.alerts import apply_automations, automation_names
    from postload.blocks import slack_notification_block

    assert check_prefect_api(client).status is Status.OK

    # Deployments not applied: a failure saying how to apply them.
    names = [f"doctor-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    prefect_yaml = tmp_path / "prefect.yaml"
    prefect_yaml.write_text(
        yaml.safe_dump({"deployments": [{"name": n, "entrypoint": "flows/x.py:x"} for n in names]})
    )
    missing = check_deployments(prefect_yaml, client)
    assert missing.status is Status.FAIL
    assert f"not on the Prefect API: {names[0]}, {names[1]}" in missing.message
    assert "postload serve" in (missing.fix or "") and "prefect deploy" in (missing.fix or "")

    flow_id = client.create_flow_from_name("doctor-test-flow")
    for name in names:
        client.create_deployment(flow_id=flow_id, name=name)
    present = check_deployments(prefect_yaml, client)
    # created, never polled by a runner or worker
    assert present.status in (Status.OK, Status.WARN), present
    assert present.status is Status.OK or "no runner or worker is polling" in present.message

    # Blocks the settings need: Snowflake's connector; the webhook secret from the environment.
    monkeypatch.setenv("POSTLOAD_WAREHOUSE", "snowflake")
    monkeypatch.setenv("POSTLOAD_SNOWFLAKE_BLOCK", f"doctor-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("POSTLOAD_FIVETRAN_WEBHOOK_SECRET", WEBHOOK_SECRET)
    fivetran = _pipeline([{"name": "sf", "loader": {"type": "fivetran", "connector_id": "c"}}])
    blocks = _by_check(check_blocks(Settings(), fivetran, client))
    snowflake = next(r for name, r in blocks.items() if name.startswith("block doctor-"))
    assert snowflake.status is Status.FAIL and "postload blocks register" in (snowflake.fix or "")
    assert blocks["Fivetran webhook secret"].status is Status.OK
    # Without the variable: the Secret block, which must exist.
    from prefect.blocks.system import Secret

    secret_block = f"doctor-secret-{uuid.uuid4().hex[:8]}"
    monkeypatch.delenv("POSTLOAD_FIVETRAN_WEBHOOK_SECRET")
    monkeypatch.setenv("POSTLOAD_FIVETRAN_WEBHOOK_SECRET_BLOCK", secret_block)
    no_secret = _by_check(check_blocks(Settings(), fivetran, client))["Fivetran webhook secret"]
    assert no_secret.status is Status.FAIL, no_secret
    assert "postload blocks register" in (no_secret.fix or "")
    Secret(value=WEBHOOK_SECRET).save(secret_block)
    from_block = _by_check(check_blocks(Settings(), fivetran, client))["Fivetran webhook secret"]
    assert from_block.status is Status.OK and secret_block in from_block.message
    assert WEBHOOK_SECRET not in " ".join(from_block.lines())

    # Automations: no notification block → a warning saying how to add one; the block without
    # the automations → a failure; applied → ok.
    slack_name = f"doctor-slack-{uuid.uuid4().hex[:8]}"
    no_block = check_automations(client, slack_name)
    assert no_block.status is Status.WARN
    assert "SLACK_WEBHOOK_URL" in (no_block.fix or "")
    assert "postload blocks register" in (no_block.fix or "")
    assert "postload automations apply" in (no_block.fix or "")
    for name in automation_names():  # whatever an earlier test left
        for automation in client.read_automations_by_name(name):
            client.delete_automation(automation.id)
    block_id = slack_notification_block("http://127.0.0.1:9/services/T0/B0/doctor").save(
        slack_name, overwrite=True
    )
    try:
        unapplied = check_automations(client, slack_name)
        assert unapplied.status is Status.FAIL
        assert "missing: postload-run-crashed" in unapplied.message
        assert unapplied.fix == "run `postload automations apply`"
        apply_automations(block_id)
        applied = check_automations(client, slack_name)
        assert applied.status is Status.OK, applied
    finally:
        for name in automation_names():
            for automation in client.read_automations_by_name(name):
                Automation.read(id=automation.id).delete()
        client.delete_block_document(block_id)


# -- dbt Core on Snowflake ----------------------------------------------------------------------


def _snowflake_block(database: str = "DB", schema: str = "ANALYTICS") -> Any:
    from prefect_snowflake import SnowflakeConnector, SnowflakeCredentials

    return SnowflakeConnector(
        credentials=SnowflakeCredentials(account="acct", user="u", password=SNOWFLAKE_PASSWORD),
        database=database,
        warehouse="WH",
        schema=schema,
    )


def test_dbt_core_on_snowflake(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dbt-snowflake, the block dbt's connection comes from, then the target's database."""
    from prefect_snowflake import SnowflakeConnector

    from postload.doctor import check_dbt_on_snowflake

    blocks: dict[str, Any] = {}

    def load(cls: type, name: str, **kwargs: Any) -> Any:
        if name not in blocks:
            raise ValueError(f"Unable to find block document named {name}")
        return blocks[name]

    monkeypatch.setattr(SnowflakeConnector, "load", classmethod(load))
    monkeypatch.setenv("POSTLOAD_WAREHOUSE", "snowflake")
    monkeypatch.setenv("POSTLOAD_SNOWFLAKE_BLOCK", "sf-doctor")
    settings = Settings()

    # no Prefect API: the block cannot be read, so neither can the project
    results, ready = check_dbt_on_snowflake(settings, DbtProject.from_settings(settings), False)
    assert not ready
    assert [(r.check, r.status) for r in results] == [
        ("dbt-snowflake", Status.OK),
        ("dbt's Snowflake connection", Status.SKIP),
    ]

    missing, ready = check_dbt_on_snowflake(settings, DbtProject.from_settings(settings), True)
    assert not ready and missing[1].status is Status.FAIL
    assert "'sf-doctor'" in missing[1].message and "postload blocks register" in (
        missing[1].fix or ""
    )

    blocks["sf-doctor"] = _snowflake_block()
    project = DbtProject.from_settings(settings)
    found, ready = check_dbt_on_snowflake(settings, project, True)
    assert ready and found[1].status is Status.OK
    assert "account acct, database DB, schema ANALYTICS" in found[1].message
    profile, target = check_dbt_profile(settings, project)
    assert profile.status is Status.OK, profile
    assert "building in the Snowflake database DB" in profile.message
    assert target is not None
    assert check_warehouse_matches_profile(settings, target).status is Status.OK

    # the block's default schema (RAW) is where postload loads: dbt's models would land there
    blocks["sf-doctor"] = _snowflake_block(schema="RAW")
    raw, _ = check_dbt_profile(settings, DbtProject.from_settings(settings))
    assert raw.status is Status.WARN, raw
    assert "schema RAW: the schema postload loads raw tables into" in raw.message
    assert "SNOWFLAKE_SCHEMA=ANALYTICS" in (raw.fix or "")

    # a user's own snowflake target on another database: both named
    profiles = home / "dbt_project" / "profiles.yml"
    profiles.write_text(
        profiles.read_text().replace(
            "\"{{ env_var('POSTLOAD_SNOWFLAKE_DATABASE') }}\"", "ANALYTICS_DEV"
        )
    )
    elsewhere, _ = check_dbt_profile(settings, DbtProject.from_settings(settings))
    assert elsewhere.status is Status.FAIL
    assert "'ANALYTICS_DEV'" in elsewhere.message and "'DB'" in elsewhere.message

    # no adapter: said, and the dbt checks that need it are not tried
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "dbt.adapters.snowflake" else real_find_spec(name, *a),
    )
    no_adapter, ready = check_dbt_on_snowflake(settings, DbtProject.from_settings(settings), True)
    assert not ready and no_adapter[0].status is Status.FAIL
    assert no_adapter[0].fix == "pip install 'postload[snowflake]'"
    assert SNOWFLAKE_PASSWORD not in " ".join(line for r in no_adapter for line in r.lines())


def test_doctor_on_snowflake_without_a_prefect_api_says_what_it_cannot_check(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dbt's connection comes from a block on the Prefect API: without one, the dbt checks are
    skipped with that reason (not failed on a variable postload would have set)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from postload.doctor import run_checks

    monkeypatch.setenv("POSTLOAD_WAREHOUSE", "snowflake")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        results = list(run_checks(Settings()))
    by_check = _by_check(results)
    assert by_check["dbt-snowflake"].status is Status.OK
    assert by_check["dbt's Snowflake connection"].status is Status.SKIP
    assert "'postload-snowflake': no Prefect API" in by_check["dbt's Snowflake connection"].message
    for check in ("dbt project", "sources", "dbt profile", "dbt connection", "warehouse"):
        assert by_check[check].status is Status.SKIP, by_check[check]
    assert by_check["Prefect API"].status is Status.WARN
    assert not [r for r in results if r.failed]
