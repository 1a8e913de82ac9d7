from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml
from prefect.blocks.system import Secret
from pydantic import ValidationError

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


def test_receiver_settings_defaults_and_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTLOAD_PROJECT_DIR", str(tmp_path))
    settings = Settings(_env_file=None)
    assert (settings.receiver_host, settings.receiver_port) == ("127.0.0.1", 8787)
    assert settings.receiver_outbox_path == tmp_path / ".postload" / "receiver-outbox.sqlite3"
    assert settings.receiver_max_body_bytes == 1 << 20
    assert settings.fivetran_webhook_secret is None
    assert settings.fivetran_webhook_secret_block == "postload-fivetran-webhook-secret"

    monkeypatch.setenv("POSTLOAD_RECEIVER_HOST", "0.0.0.0")
    monkeypatch.setenv("POSTLOAD_RECEIVER_PORT", "9000")
    monkeypatch.setenv("POSTLOAD_RECEIVER_OUTBOX", "state/outbox.sqlite3")
    monkeypatch.setenv("POSTLOAD_RECEIVER_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("POSTLOAD_FIVETRAN_WEBHOOK_SECRET", "s3cr3t-value")
    settings = Settings(_env_file=None)
    assert (settings.receiver_host, settings.receiver_port) == ("0.0.0.0", 9000)
    assert settings.receiver_outbox_path == tmp_path / "state" / "outbox.sqlite3"
    assert settings.receiver_max_body_bytes == 4096
    assert "s3cr3t-value" not in repr(settings)


@pytest.mark.parametrize(
    ("key", "value"),
    [("receiver_port", 0), ("receiver_port", 70000), ("receiver_max_body_bytes", 0)],
)
def test_receiver_settings_are_checked(tmp_path: Path, key: str, value: int) -> None:
    with pytest.raises(ValidationError, match=key):
        Settings(_env_file=None, project_dir=tmp_path, **{key: value})


def secret_settings(tmp_path: Path, secret: str | None, block: str) -> Settings:
    return Settings(
        _env_file=None,
        project_dir=tmp_path,
        fivetran_webhook_secret=secret,
        fivetran_webhook_secret_block=block,
    )


def test_webhook_secret_variable_wins_over_the_block(prefect_server: str, tmp_path: Path) -> None:
    block = f"test-webhook-secret-{uuid.uuid4().hex[:8]}"
    Secret(value="from-the-block").save(block)
    settings = secret_settings(tmp_path, "from-the-variable", block)
    assert settings.resolve_fivetran_webhook_secret() == (
        "from-the-variable",
        "POSTLOAD_FIVETRAN_WEBHOOK_SECRET",
    )


@pytest.mark.parametrize("secret", [None, "", "  "], ids=["unset", "empty", "blank"])
def test_webhook_secret_comes_from_the_block_without_the_variable(
    prefect_server: str, tmp_path: Path, secret: str | None
) -> None:
    block = f"test-webhook-secret-{uuid.uuid4().hex[:8]}"
    Secret(value="from-the-block").save(block)
    settings = secret_settings(tmp_path, secret, block)
    assert settings.resolve_fivetran_webhook_secret() == (
        "from-the-block",
        f"Secret block {block!r}",
    )


def test_no_webhook_secret_anywhere_names_the_variable_and_the_block(
    prefect_server: str, tmp_path: Path
) -> None:
    block = f"absent-webhook-secret-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigError) as err:
        secret_settings(tmp_path, None, block).resolve_fivetran_webhook_secret()
    assert str(err.value) == (
        "no Fivetran webhook secret: POSTLOAD_FIVETRAN_WEBHOOK_SECRET is not set (or empty) and "
        f"the Prefect Secret block {block!r} does not exist. Expected one of them: set "
        "POSTLOAD_FIVETRAN_WEBHOOK_SECRET, or create the block with `postload blocks register` "
        "while it is set (POSTLOAD_FIVETRAN_WEBHOOK_SECRET_BLOCK names another block)"
    )


def test_a_block_without_a_usable_secret_is_reported(prefect_server: str, tmp_path: Path) -> None:
    block = f"test-webhook-secret-{uuid.uuid4().hex[:8]}"
    Secret(value={"not": "a string"}).save(block)
    with pytest.raises(ConfigError, match=rf"{block!r} holds a dict, not a non-empty string"):
        secret_settings(tmp_path, None, block).resolve_fivetran_webhook_secret()


def test_missing_config_outside_the_checkout_says_to_set_the_project_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flow run started outside the checkout (a worker's working directory) is told why."""
    monkeypatch.delenv("POSTLOAD_PROJECT_DIR", raising=False)
    monkeypatch.delenv("POSTLOAD_PIPELINE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        Settings(_env_file=None).load_pipeline()
    assert str(err.value) == (
        f"{tmp_path / 'postload.yaml'}: pipeline config not found (expected a YAML file). "
        f"POSTLOAD_PROJECT_DIR is not set, so the postload checkout is taken to be the working "
        f"directory {tmp_path}: run from the checkout, or set POSTLOAD_PROJECT_DIR to it"
    )

    monkeypatch.setenv("POSTLOAD_PROJECT_DIR", str(tmp_path))
    with pytest.raises(ConfigError) as err:
        Settings(_env_file=None).load_pipeline()
    assert str(err.value) == (
        f"{tmp_path / 'postload.yaml'}: pipeline config not found (expected a YAML file)"
    )


def test_a_stage_without_a_raw_table_is_refused_naming_both(tmp_path: Path) -> None:
    # Files in a stage load into raw_table; a stage alone would be silently unused.
    path = tmp_path / "postload.yaml"
    path.write_text(
        "sources:\n  - name: shop\n    stage: shop\n"
        "    loader: {type: fivetran, connector_id: shop_conn}\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_pipeline_config(path)
    assert "stage 'shop' is set but raw_table is not" in str(raised.value)
