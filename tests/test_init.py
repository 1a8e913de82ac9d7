"""`postload init`: a validated, commented postload.yaml from a dbt project (the demo project's
dbt sources customers, orders and events), never overwriting one; Fivetran faked at HTTP level."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import httpx
import pytest
import respx
import yaml
from typer.testing import CliRunner

from postload.cli import app
from postload.config import FivetranLoader, Settings, load_pipeline_config
from postload.dbt import DbtProject
from postload.init import (
    ConfigExistsError,
    DbtSource,
    FivetranMapping,
    InitError,
    fivetran_connection_schema,
    parse_fivetran_option,
    resolve_fivetran_mappings,
    write_new_file,
)
from postload.sources import source_tables
from tests.conftest import suite_secret

runner = CliRunner()

FIVETRAN_KEY = suite_secret("init: Fivetran API key", "ftkey-3b81c0d2")
FIVETRAN_SECRET = suite_secret("init: Fivetran API secret", "ftsecret-a9e4f7")
CONNECTION_URL = "https://api.fivetran.com/v1/connections/{}"


@pytest.fixture
def project(tmp_path: Path, parsed_dbt_project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout without postload.yaml: POSTLOAD_PROJECT_DIR and the working directory."""
    root = tmp_path / "checkout"
    root.mkdir()
    # copy2 keeps the modification times: the copied manifest stays newer than the project.
    shutil.copytree(parsed_dbt_project, root / "dbt_project")
    monkeypatch.setenv("POSTLOAD_PROJECT_DIR", str(root))
    monkeypatch.chdir(root)
    for name in ("FIVETRAN_API_KEY", "FIVETRAN_API_SECRET", "POSTLOAD_DBT_PROJECT_DIR"):
        monkeypatch.delenv(name, raising=False)
    return root


def test_init_writes_one_source_per_mapped_dbt_source(project: Path) -> None:
    result = runner.invoke(
        app,
        [
            "init",
            "--dbt-project",
            "dbt_project",
            "--fivetran",
            "conn_orders=orders",
            "--fivetran",
            "conn_events=events",
        ],
    )
    assert result.exit_code == 0, result.output
    written = project / "postload.yaml"
    assert f"wrote {written}" in result.output
    assert "customers" in result.output and "left out" in result.output
    assert "POSTLOAD_DBT_PROJECT_DIR" not in result.output  # the default dbt_project

    pipeline = load_pipeline_config(written)
    assert pipeline == Settings().load_pipeline()
    assert pipeline.source_names == ["events", "orders"]
    loaders = {s.name: s.loader for s in pipeline.sources}
    assert loaders == {
        "events": FivetranLoader(type="fivetran", connector_id="conn_events"),
        "orders": FivetranLoader(type="fivetran", connector_id="conn_orders"),
    }
    assert all(s.tables_from_dbt and s.stage is None for s in pipeline.sources)
    assert pipeline.full_run is None  # opt-in: written commented out

    text = written.read_text()
    assert "# - name: customers" in text  # the unmapped dbt source, with a hint
    assert "--fivetran CONNECTOR_ID=customers" in " ".join(text.split())
    assert "\n# full_run:\n" in text
    assert "POSTLOAD_DBT_PROJECT_DIR" not in text
    # Its tables come from the dbt manifest, with the dbt project's loaded_at_field.
    manifest = DbtProject(project / "dbt_project", project / "w.duckdb").manifest()
    tables = source_tables(pipeline, manifest)
    assert [(t.table, t.schema, t.loaded_at_field) for t in tables["orders"]] == [
        ("orders", "raw", "_loaded_at")
    ]
    # Uncommenting the full_run example gives a valid config too.
    opted_in = text.replace(
        "\n# full_run:\n#   min_interval: 6h", "\nfull_run:\n  min_interval: 6h"
    )
    assert yaml.safe_load(opted_in)["full_run"] == {"min_interval": "6h"}
    (project / "opted-in.yaml").write_text(opted_in)
    assert load_pipeline_config(project / "opted-in.yaml").full_run is not None
    assert not list(project.glob(".postload.yaml.*")), "no temporary file is left behind"


def test_init_refuses_to_overwrite(project: Path) -> None:
    (project / "postload.yaml").write_text("# mine\n")
    result = runner.invoke(app, ["init", "--dbt-project", "dbt_project", "--fivetran", "c=orders"])
    assert result.exit_code == 2, result.output
    assert "already exists" in result.output and "not overwritten" in result.output
    assert (project / "postload.yaml").read_text() == "# mine\n"


def test_an_unknown_dbt_source_lists_the_dbt_sources(project: Path) -> None:
    result = runner.invoke(
        app, ["init", "--dbt-project", "dbt_project", "--fivetran", "conn_sf=salesforce"]
    )
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "no source 'salesforce'" in output
    assert "customers (raw), events (raw), orders (raw)" in output
    assert not (project / "postload.yaml").exists()


def test_init_without_a_mapping_says_how_to_give_one(project: Path) -> None:
    result = runner.invoke(app, ["init", "--dbt-project", "dbt_project"])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "--fivetran CONNECTOR_ID=DBT_SOURCE" in output and "customers, events, orders" in output
    assert not (project / "postload.yaml").exists()


def test_a_dbt_project_elsewhere_is_named_for_the_environment(project: Path) -> None:
    shutil.move(project / "dbt_project", project / "analytics")
    result = runner.invoke(
        app, ["init", "--dbt-project", "analytics", "--fivetran", "c1=customers"]
    )
    assert result.exit_code == 0, result.output
    assert "POSTLOAD_DBT_PROJECT_DIR=analytics" in " ".join(result.output.split())
    text = (project / "postload.yaml").read_text()
    assert "#   POSTLOAD_DBT_PROJECT_DIR=analytics\n" in text
    assert load_pipeline_config(project / "postload.yaml").source_names == ["customers"]


def test_a_connector_id_alone_is_looked_up_in_fivetran(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIVETRAN_API_KEY", FIVETRAN_KEY)
    monkeypatch.setenv("FIVETRAN_API_SECRET", FIVETRAN_SECRET)
    with respx.mock(assert_all_called=True) as fivetran:
        route = fivetran.get(CONNECTION_URL.format("warm_ambitious")).mock(
            return_value=httpx.Response(
                200,
                json={
                    "code": "Success",
                    # Snowflake-style upper case: matched case-insensitively
                    "data": {"id": "warm_ambitious", "service": "postgres", "schema": "RAW"},
                },
            )
        )
        result = runner.invoke(
            app, ["init", "--dbt-project", "dbt_project", "--fivetran", "warm_ambitious"]
        )
    assert result.exit_code == 0, result.output
    request = route.calls.last.request
    assert request.headers["Accept"] == "application/json;version=2"
    expected = base64.b64encode(f"{FIVETRAN_KEY}:{FIVETRAN_SECRET}".encode()).decode()
    assert request.headers["Authorization"] == f"Basic {expected}"
    pipeline = load_pipeline_config(project / "postload.yaml")
    # the demo's three dbt sources all read schema raw: one connection writes them all
    assert pipeline.connector_ids == ["warm_ambitious"]
    assert pipeline.source_names == ["customers", "events", "orders"]
    assert FIVETRAN_KEY not in result.output and FIVETRAN_SECRET not in result.output


def test_a_connector_id_alone_without_credentials_asks_for_the_source(project: Path) -> None:
    result = runner.invoke(app, ["init", "--dbt-project", "dbt_project", "--fivetran", "conn"])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "--fivetran conn=DBT_SOURCE" in output and "FIVETRAN_API_KEY" in output


# --- the parts, without dbt --------------------------------------------------------------------


def _source(name: str, schema: str) -> DbtSource:
    return DbtSource(name, schema, None, (name,), (), "shop")


SOURCES = {
    s.name: s
    for s in [
        _source("salesforce", "salesforce"),
        _source("shop_public", "pg_shop_public"),
        _source("shop_sales", "pg_shop_sales"),
        _source("events", "raw"),
    ]
}


def test_a_connection_schema_matches_its_dbt_source_or_its_prefixed_schemas() -> None:
    schemas = {"c_sf": "SALESFORCE", "c_pg": "pg_shop"}
    mapped = resolve_fivetran_mappings(
        [FivetranMapping("c_sf", None), FivetranMapping("c_pg", None)],
        SOURCES,
        schemas.__getitem__,
    )
    # A database connector writes <prefix>_<source schema>: one connection, several dbt sources.
    assert mapped == {"salesforce": "c_sf", "shop_public": "c_pg", "shop_sales": "c_pg"}


def test_a_connection_schema_no_dbt_source_reads_is_an_error() -> None:
    with pytest.raises(InitError, match=r"writes schema 'hubspot', which no dbt source"):
        resolve_fivetran_mappings([FivetranMapping("c", None)], SOURCES, lambda _: "hubspot")


def test_one_dbt_source_cannot_have_two_connectors() -> None:
    with pytest.raises(InitError, match="two Fivetran connectors"):
        resolve_fivetran_mappings(
            [FivetranMapping("a", "events"), FivetranMapping("b", "events")], SOURCES, None
        )


@pytest.mark.parametrize("value", ["-x=events", "a b=events", "=events", "c="])
def test_a_malformed_fivetran_option_is_refused(value: str) -> None:
    with pytest.raises(InitError, match="--fivetran"):
        parse_fivetran_option(value)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (401, {"code": "AuthFailed"}, "refused FIVETRAN_API_KEY/FIVETRAN_API_SECRET"),
        (404, {"code": "NotFound_Connection"}, "no connection 'nope'"),
        (200, {"code": "Success", "data": {}}, "without a destination schema"),
    ],
)
def test_fivetran_api_errors_say_what_to_do_without_the_credentials(
    status: int, body: dict, expected: str
) -> None:
    with respx.mock() as fivetran:
        fivetran.get(CONNECTION_URL.format("nope")).mock(
            return_value=httpx.Response(status, json=body)
        )
        with pytest.raises(InitError, match=expected) as err:
            fivetran_connection_schema("nope", FIVETRAN_KEY, FIVETRAN_SECRET)
    assert FIVETRAN_KEY not in str(err.value) and FIVETRAN_SECRET not in str(err.value)


def test_a_file_that_does_not_validate_is_never_written(tmp_path: Path) -> None:
    target = tmp_path / "postload.yaml"

    def refuse(path: Path) -> None:
        raise InitError("no")

    with pytest.raises(InitError):
        write_new_file(target, "sources: []\n", refuse)
    assert list(tmp_path.iterdir()) == []
    target.write_text("x")
    with pytest.raises(ConfigExistsError):
        write_new_file(target, "y", lambda _: None)
    assert target.read_text() == "x"


def test_the_dbt_profile_must_be_findable(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (project / "dbt_project" / "profiles.yml").unlink()
    monkeypatch.setenv("DBT_PROFILES_DIR", str(project / "nowhere"))
    result = runner.invoke(app, ["init", "--dbt-project", "dbt_project", "--fivetran", "c=orders"])
    assert result.exit_code == 2, result.output
    assert "no dbt profiles.yml found" in " ".join(result.output.split())
    assert not (project / "postload.yaml").exists()


def test_a_dbt_source_without_loaded_at_field_gets_fivetrans(project: Path) -> None:
    sources_yml = project / "dbt_project" / "models" / "staging" / "events" / "_events__sources.yml"
    sources_yml.write_text(sources_yml.read_text().replace("loaded_at_field: _loaded_at", ""))
    result = runner.invoke(app, ["init", "--dbt-project", "dbt_project", "--fivetran", "c=events"])
    assert result.exit_code == 0, result.output
    text = (project / "postload.yaml").read_text()
    assert "loaded_at_field: _fivetran_synced   # no loaded_at_field in dbt for events" in text
    pipeline = load_pipeline_config(project / "postload.yaml")
    manifest = DbtProject(project / "dbt_project", project / "w.duckdb").manifest()
    assert [t.loaded_at_field for t in source_tables(pipeline, manifest)["events"]] == [
        "_fivetran_synced"
    ]
