"""dbt node failures: `dbt retry` re-runs only the failed nodes and their children; failed data
tests are reported, never retried. Real dbt on DuckDB, the runner outside a flow."""

from __future__ import annotations

from pathlib import Path

import pytest

from postload.config import Selection, Settings
from postload.dbt._core import CoreDbtRunner
from postload.local.demo_data import write_demo_batch
from postload.warehouse._duckdb import DuckDBWarehouse
from tests.conftest import PostloadHome

# Fails until the project's on-run-end hook has created the table it reads: the first build fails
# it (and skips its child), the hook opens the gate, and `dbt retry` succeeds.
GATED_MODEL = """{{ config(materialized='table') }}
select opened from {{ target.schema }}.retry_gate
"""
CHILD_MODEL = "select opened + 1 as next from {{ ref('gated') }}\n"
OPEN_GATE_HOOK = (
    '\non-run-end:\n  - "create table if not exists {{ target.schema }}.retry_gate as '
    'select 1 as opened"\n'
)


@pytest.fixture
def loaded_home(prefect_server: str, postload_home: PostloadHome) -> PostloadHome:
    settings = Settings()
    pipeline = settings.load_pipeline()
    warehouse = DuckDBWarehouse(settings.duckdb_file, settings.stage_root_path, pipeline)
    warehouse.ensure_schema()
    for source in pipeline.sources:
        write_demo_batch(postload_home.stage, source.name, 1)
        warehouse.load(source, None)
    return postload_home


def runner(home: PostloadHome, retries: int) -> CoreDbtRunner:
    settings = Settings()
    return CoreDbtRunner(
        settings.dbt_project_path,
        settings.duckdb_file,
        node_retries=retries,
        node_retry_delay_seconds=0,
    )


def add(home: PostloadHome, relative: str, text: str) -> None:
    path: Path = home.root / "dbt_project" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_retry_reruns_only_the_failed_model_and_its_child(loaded_home: PostloadHome) -> None:
    add(loaded_home, "models/marts/gated.sql", GATED_MODEL)
    add(loaded_home, "models/marts/gated_child.sql", CHILD_MODEL)
    project = loaded_home.root / "dbt_project" / "dbt_project.yml"
    project.write_text(project.read_text() + OPEN_GATE_HOOK)

    result = runner(loaded_home, retries=2).build(Selection(select="fqn:*"), cause="test")

    assert result.status == "success", result.failed_nodes
    assert result.retried == [["model.postload_demo.gated", "model.postload_demo.gated_child"]]
    by_id = {n.unique_id: n.status for n in result.nodes}
    assert by_id["model.postload_demo.gated"] == "success"
    assert by_id["model.postload_demo.gated_child"] == "success"
    assert by_id["model.postload_demo.fct_orders"] == "success"  # built once, in attempt 1


def test_failed_data_test_is_reported_not_retried(loaded_home: PostloadHome) -> None:
    add(loaded_home, "tests/orders_are_never_empty_today.sql", "select 1 as always_fails\n")

    result = runner(loaded_home, retries=2).build(Selection(select="fqn:*"), cause="test")

    assert result.status == "error"
    assert result.retried == []
    assert [n.name for n in result.failed_nodes] == ["orders_are_never_empty_today"]


def test_after_the_last_attempt_the_failed_models_are_named(loaded_home: PostloadHome) -> None:
    add(loaded_home, "models/marts/gated.sql", GATED_MODEL)  # no hook: it never opens

    result = runner(loaded_home, retries=1).build(Selection(select="fqn:*"), cause="test")

    assert result.status == "error"
    assert result.retried == [["model.postload_demo.gated"]]
    assert [n.name for n in result.failed_nodes] == ["gated"]
    assert "retry_gate" in (result.failed_nodes[0].message or "")
