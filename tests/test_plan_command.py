"""`postload plan` on a source read from the dbt project: which tables are pending, and the nodes
they select (real dbt, a DuckDB warehouse written the way Fivetran writes it)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from postload.cli import app

PROFILE = """postload:
  target: duckdb
  outputs:
    duckdb:
      type: duckdb
      path: "{{ env_var('POSTLOAD_DUCKDB_PATH') }}"
      schema: analytics
      threads: 1
"""
SOURCES = """sources:
  - name: salesforce
    schema: salesforce
    loaded_at_field: _fivetran_synced
    freshness: {warn_after: {count: 12, period: hour}}
    tables: [{name: account}, {name: opportunity}, {name: user}]
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    dbt = tmp_path / "dbt_project"
    (dbt / "models").mkdir(parents=True)
    (dbt / "dbt_project.yml").write_text(
        "name: crm\nversion: '1.0.0'\nprofile: postload\nmodel-paths: [models]\n"
    )
    (dbt / "profiles.yml").write_text(PROFILE)
    (dbt / "models" / "_sources.yml").write_text(SOURCES)
    for table in ("account", "opportunity", "user"):
        (dbt / "models" / f"stg_{table}.sql").write_text(
            f"select * from {{{{ source('salesforce', '{table}') }}}}"
        )
    (dbt / "models" / "pipeline.sql").write_text(
        "select a.id from {{ ref('stg_account') }} a join {{ ref('stg_opportunity') }} o on a.id = o.id"
    )
    (tmp_path / "postload.yaml").write_text(
        "sources:\n  - name: salesforce\n    loader: {type: fivetran, connector_id: sf_conn}\n"
    )
    monkeypatch.chdir(tmp_path)
    for name in ("POSTLOAD_PIPELINE_CONFIG", "POSTLOAD_DBT_PROJECT_DIR", "POSTLOAD_DUCKDB_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("POSTLOAD_PROJECT_DIR", str(tmp_path))
    monkeypatch.setenv("POSTLOAD_HOME", str(tmp_path / ".postload"))
    warehouse = tmp_path / ".postload" / "warehouse.duckdb"
    warehouse.parent.mkdir()
    with duckdb.connect(str(warehouse)) as con:
        con.execute("create schema salesforce")
        for table in ("account", "opportunity", "user"):
            con.execute(f"create table salesforce.{table} (id int, _fivetran_synced timestamptz)")
        # a sync that changed account only; user has no rows yet
        con.execute("insert into salesforce.account values (1, ?)", [datetime.now(UTC)])
    return tmp_path


def test_plan_shows_the_pending_tables_and_builds_only_what_reads_them(project: Path) -> None:
    result = CliRunner().invoke(app, ["plan", "sf_conn"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert 'salesforce.account ("warehouse"."salesforce"."account"): pending' in out, out
    assert "salesforce.user (" in out and "): no rows yet" in out, out
    assert "source salesforce: dbt build --select source:salesforce.account+" in out, out
    listed = {line.strip() for line in out.splitlines() if line.startswith("  model.")}
    assert listed == {"model.crm.stg_account", "model.crm.pipeline"}, out
