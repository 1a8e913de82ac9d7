"""The environment of one dbt invocation: the variables the profile reads (the DuckDB warehouse
path, the target, the Snowflake connection), dbt-duckdb's process-wide DuckDB handle, and what the
running dbt command keeps in its click context."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

# The checked-in profiles.yml reads the warehouse path from this variable — the same one Settings
# reads — so users can run plain `dbt` against the same file by exporting it.
DUCKDB_PATH_ENV = "POSTLOAD_DUCKDB_PATH"
# The checked-in profile's target: postload sets it to its warehouse's (duckdb or snowflake).
DBT_TARGET_ENV = "POSTLOAD_DBT_TARGET"


@contextmanager
def profile_env(duckdb_path: Path, variables: Mapping[str, str] | None = None) -> Iterator[None]:
    """Expose the warehouse path (and ``variables``: the target, the Snowflake connection) to
    profiles.yml for one dbt invocation only, then let go of them.

    Restored afterwards so they never leak into later runs or child processes of a long-lived
    worker (where they would override another run's settings), and a credential is in the
    environment only while dbt runs.
    """
    values = {DUCKDB_PATH_ENV: str(duckdb_path), **(variables or {})}
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        release_duckdb_file()
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def release_duckdb_file() -> None:
    """Close dbt-duckdb's process-wide DuckDB handle so the file's write lock is released.

    dbt-duckdb caches one DuckDB instance per process until exit (an atexit hook in
    dbt/adapters/duckdb/connections.py), so a long-lived worker would keep the warehouse locked
    against every other process after its first dbt run. Our writer slot is released when the
    flow's warehouse work ends; the file must be released with it.
    """
    try:
        from dbt.adapters.duckdb.connections import DuckDBConnectionManager
    except ImportError:  # another adapter: nothing cached here
        return
    with DuckDBConnectionManager._LOCK:
        env, DuckDBConnectionManager._ENV = DuckDBConnectionManager._ENV, None
    if env is not None:
        env.close()


def running_dbt_command(key: str) -> Any:
    """What the dbt command running in this thread keeps under ``key`` in its click context
    (``manifest``, ``runtime_config``: dbt/cli/requires.py), or None outside one."""
    ctx = click.get_current_context(silent=True)
    return ctx.obj.get(key) if ctx is not None and isinstance(ctx.obj, dict) else None


def dbt_shares_duckdb_instance(credentials: Any, duckdb_path: Path) -> bool:
    """Whether dbt-duckdb's connection for these credentials joins a plain connection's instance.

    dbt-duckdb 1.11 (``Environment.initialize_db``) connects with ``config_options`` and what its
    plugins add, read-write: the same configuration as ``duckdb.connect(path)`` when there are
    neither. It also attaches databases, registers filesystems and creates secrets on the
    instance, which must not meet what an earlier invocation left there: no sharing then either.
    """
    if getattr(credentials, "type", None) != "duckdb":
        return False
    if any(
        getattr(credentials, name, None)
        for name in ("config_options", "plugins", "remote", "attach", "filesystems", "secrets")
    ) or getattr(credentials, "is_motherduck", False):
        return False
    path = getattr(credentials, "path", None)
    if not path:
        return False
    return Path(path).resolve() == duckdb_path.resolve()
