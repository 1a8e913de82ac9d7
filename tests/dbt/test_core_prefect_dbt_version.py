"""Another prefect-dbt than the tested one: dbt runs through prefect-dbt's own runner, with one
warning naming both versions; postload's changes to prefect-dbt's internals are never used."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect_dbt import PrefectDbtRunner

from postload.config import NodeTaskMode, Selection
from postload.dbt import _prefect_dbt_public
from postload.dbt._core import CoreDbtRunner
from postload.dbt._prefect_dbt_public import TESTED_PREFECT_DBT_VERSION
from tests.dbt.test_project import ENV_PROFILE


@pytest.fixture(autouse=True)
def no_prefect_api() -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        yield


@pytest.fixture
def another_prefect_dbt(monkeypatch: pytest.MonkeyPatch) -> str:
    """prefect-dbt 0.8.0 as the installed version, postload's internals module unimportable
    (as if that version had moved what it relies on), and no warning given yet."""
    monkeypatch.setattr(_prefect_dbt_public, "installed_prefect_dbt_version", lambda: "0.8.0")
    monkeypatch.setattr(_prefect_dbt_public, "_warned", type(_prefect_dbt_public._warned)())
    monkeypatch.setitem(sys.modules, "postload.dbt._prefect_dbt", None)  # import raises
    return "0.8.0"


def tiny_project(root: Path) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "dbt_project.yml").write_text(
        'name: tiny\nversion: "1.0.0"\nprofile: tiny\nflags:\n  send_anonymous_usage_stats: false\n'
    )
    (root / "models" / "answer.sql").write_text("select 42 as answer")
    (root / "profiles.yml").write_text(ENV_PROFILE)
    return root


def test_another_prefect_dbt_builds_through_its_own_runner_with_one_warning(
    another_prefect_dbt: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=_prefect_dbt_public.__name__)
    project = tiny_project(tmp_path / "project")
    runners = [
        CoreDbtRunner(project, tmp_path / "wh.duckdb", node_task_mode=mode)
        for mode in (NodeTaskMode.PROCESS, NodeTaskMode.THREAD)
    ]
    assert all(type(r._runner()) is PrefectDbtRunner for r in runners)

    build = runners[0].build(Selection(select="answer"), cause="test")
    assert [(n.name, n.status) for n in build.nodes] == [("answer", "success")]

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "prefect-dbt 0.8.0 is installed" in warnings[0]
    assert f"prefect-dbt {TESTED_PREFECT_DBT_VERSION} only" in warnings[0]


def test_the_tested_prefect_dbt_gets_postloads_runner(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from postload.dbt._prefect_dbt import NodeTaskDbtRunner

    assert _prefect_dbt_public.installed_prefect_dbt_version() == TESTED_PREFECT_DBT_VERSION
    runner = CoreDbtRunner(tiny_project(tmp_path / "project"), tmp_path / "wh.duckdb")
    assert isinstance(runner._runner(), NodeTaskDbtRunner)
    assert not [r for r in caplog.records if r.name == _prefect_dbt_public.__name__]
