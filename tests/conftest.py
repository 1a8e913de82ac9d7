"""Shared fixtures: one Prefect test server for the session, and an isolated postload home."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A real Prefect API server (SQLite) for the whole session; ~25 s to start on 2 cores."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@dataclass(frozen=True)
class PostloadHome:
    """An isolated checkout-like folder: its own warehouse, stage and dbt target."""

    root: Path
    env: dict[str, str]

    @property
    def stage(self) -> Path:
        return self.root / ".postload" / "stage"

    @property
    def duckdb(self) -> Path:
        return self.root / ".postload" / "warehouse.duckdb"


def make_home(root: Path, monkeypatch: pytest.MonkeyPatch) -> PostloadHome:
    """Settings point at a copy of the pipeline config and dbt project under root."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "postload.yaml", root / "postload.yaml")
    shutil.copytree(
        REPO / "dbt_project",
        root / "dbt_project",
        ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"),
    )
    env = {
        "POSTLOAD_PROJECT_DIR": str(root),
        "POSTLOAD_RETRY_BACKOFF_SECONDS": "0",
        # Unique per home so runs of different tests never share a concurrency slot by accident.
        "POSTLOAD_WAREHOUSE_CONCURRENCY_LIMIT": f"postload-warehouse-{root.parent.name}",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return PostloadHome(root=root, env=env)


def sql(home: PostloadHome, query: str, params: list[Any] | None = None) -> list[tuple]:
    """Query the home's warehouse. Read-write like dbt-duckdb: DuckDB refuses a second handle on
    the same file in one process with a different configuration."""
    con = duckdb.connect(str(home.duckdb))
    try:
        return con.execute(query, params or []).fetchall()
    finally:
        con.close()


@pytest.fixture
def postload_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PostloadHome:
    """An isolated home for one test (dbt writes its own target/)."""
    return make_home(tmp_path / "checkout", monkeypatch)


DEMO_MODELS = {
    "stg_customers",
    "stg_orders",
    "stg_events",
    "customer_orders",
    "fct_orders",
    "fct_daily_events",
}


def land_and_load(home: PostloadHome, source: str, batch: int) -> None:
    """A sync: rows land in the raw table, nothing is transformed (as after a Fivetran sync)."""
    from postload.config import Settings
    from postload.demo_data import write_demo_batch
    from postload.warehouse._duckdb import DuckDBWarehouse

    write_demo_batch(home.stage, source, batch)
    settings = Settings()
    pipeline = settings.load_pipeline()
    warehouse = DuckDBWarehouse(settings.duckdb_file, settings.stage_root_path, pipeline)
    warehouse.ensure_schema()
    warehouse.load(pipeline.source(source), None)


def hostile(max_examples: int) -> Any:
    """hypothesis settings for the hostile-input tests: no deadline (generation is cheap next to
    a request, and timing is not what is tested) and no example database (nothing is written
    into the checkout)."""
    from hypothesis import HealthCheck, settings

    return settings(
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
        max_examples=max_examples,
    )
