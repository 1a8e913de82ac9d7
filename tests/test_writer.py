"""The warehouse writer slot: a Prefect concurrency limit on Snowflake, a file lock on DuckDB."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_snowflake_writer_slot_is_a_prefect_concurrency_limit(
    prefect_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client

    from postload.config import Settings
    from postload.writer import warehouse_writer

    monkeypatch.setenv("POSTLOAD_WAREHOUSE", "snowflake")
    monkeypatch.setenv("POSTLOAD_WAREHOUSE_CONCURRENCY_LIMIT", "postload-warehouse-gcl-test")
    settings = Settings(_env_file=None)
    with get_client(sync_client=True) as client:
        with warehouse_writer(settings):
            held = client.read_global_concurrency_limit_by_name("postload-warehouse-gcl-test")
        released = client.read_global_concurrency_limit_by_name("postload-warehouse-gcl-test")
    assert (held.limit, held.active_slots) == (1, 1)
    assert released.active_slots == 0


def test_duckdb_writer_lock_is_released_when_its_holder_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    from postload.config import Settings
    from postload.writer import warehouse_writer

    monkeypatch.setenv("POSTLOAD_DUCKDB_PATH", str(tmp_path / "w.duckdb"))
    code = (
        "import sys; from postload.config import Settings; "
        "from postload.writer import warehouse_writer\n"
        "with warehouse_writer(Settings()):\n print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # crashes while holding the slot
    holder.wait(timeout=30)
    holder.stdin.close()
    holder.stdout.close()
    with warehouse_writer(Settings(_env_file=None)):
        pass  # acquired: the dead holder did not leave it taken
