from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from postload.config import (
    ConfigError,
    PipelineConfig,
    Selection,
    Settings,
    UnknownSourceError,
    WarehouseKind,
    load_pipeline_config,
)

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "postload.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def source(**overrides: object) -> dict[str, object]:
    return {"name": "events", "raw_table": "events", "stage": "events", **overrides}


def test_checked_in_config_loads_and_defaults_selection() -> None:
    config = load_pipeline_config(REPO / "postload.yaml")
    assert config.source_names == ["customers", "orders", "events"]
    assert config.source("events").effective_selection.cli_args() == [
        "--selector",
        "events_pipeline",
    ]
    bare = PipelineConfig.model_validate({"sources": [source()]})
    assert bare.source("events").effective_selection.cli_args() == ["--select", "source:events+"]


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, {"sources": [source(raw_tabel="x")]})
    with pytest.raises(ConfigError) as err:
        load_pipeline_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "sources[0](name=events).raw_tabel" in message
    assert "unknown key" in message


def test_wrong_type_names_key_and_expected_form(tmp_path: Path) -> None:
    path = write(tmp_path, {"sources": [source(dbt_cloud_job_id="abc")]})
    with pytest.raises(ConfigError, match=r"dbt_cloud_job_id: Input should be a valid integer"):
        load_pipeline_config(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("raw_table", "events; drop table raw.events"),
        ("raw_table", 'ev"ents'),
        ("stage", "../../etc"),
        ("name", "1events"),
    ],
)
def test_non_identifier_names_rejected_before_any_sql(tmp_path: Path, key: str, value: str) -> None:
    path = write(tmp_path, {"sources": [source(**{key: value})]})
    with pytest.raises(ConfigError, match=rf"{key}: .* is not a plain identifier"):
        load_pipeline_config(path)


def test_schema_names_are_identifiers_too(tmp_path: Path) -> None:
    path = write(tmp_path, {"raw_schema": "raw.x", "sources": [source()]})
    with pytest.raises(ConfigError, match=r"raw_schema: 'raw.x' is not a plain identifier"):
        load_pipeline_config(path)


@pytest.mark.parametrize("bad", ["source:events+; rm -rf /", "--full-refresh", "$(whoami)", ""])
def test_dbt_selection_must_be_selection_syntax(bad: str) -> None:
    with pytest.raises(ValueError, match="is not a dbt selection"):
        Selection(select=bad)


def test_selection_needs_exactly_one_form(tmp_path: Path) -> None:
    path = write(tmp_path, {"sources": [source(selection={"tag": "events", "selector": "x"})]})
    with pytest.raises(ConfigError, match="expected exactly one of 'select'"):
        load_pipeline_config(path)


def test_fivetran_loader_needs_connector_id(tmp_path: Path) -> None:
    path = write(tmp_path, {"sources": [source(loader={"type": "fivetran"})]})
    with pytest.raises(ConfigError, match=r"loader.connector_id: required key is missing"):
        load_pipeline_config(path)


def test_duplicate_source_names_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, {"sources": [source(), source()]})
    with pytest.raises(ConfigError, match="declared twice"):
        load_pipeline_config(path)


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline_config(write(tmp_path, "sources: [\n"))
    with pytest.raises(ConfigError, match="pipeline config not found"):
        load_pipeline_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_pipeline_config(write(tmp_path, "- just\n- a list\n"))


def test_unknown_source_lists_known_ones() -> None:
    config = load_pipeline_config(REPO / "postload.yaml")
    with pytest.raises(UnknownSourceError) as err:
        config.source("evnets")
    assert str(err.value) == "unknown source 'evnets'; known sources: customers, orders, events"


def test_settings_default_to_embedded_paths_under_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTLOAD_PROJECT_DIR", str(tmp_path))
    settings = Settings(_env_file=None)
    assert settings.warehouse is WarehouseKind.DUCKDB
    assert settings.duckdb_file == tmp_path / ".postload" / "warehouse.duckdb"
    assert settings.stage_root_path == tmp_path / ".postload" / "stage"
    monkeypatch.setenv("POSTLOAD_WAREHOUSE", "snowflake")
    monkeypatch.setenv("POSTLOAD_DUCKDB_PATH", "/data/w.duckdb")
    settings = Settings(_env_file=None)
    assert settings.warehouse is WarehouseKind.SNOWFLAKE
    assert settings.duckdb_file == Path("/data/w.duckdb")
