"""The profile postload parses a dbt Cloud project with: no credentials, never connected.

On dbt Cloud the builds run in dbt Cloud's environment, with its connection; postload only reads
the project (``dbt parse`` for the manifest, ``dbt ls`` to resolve selectors), and neither
connects. So in Cloud mode postload writes its own ``profiles.yml`` under the project's target
folder instead of reading the user's: a Snowflake-only project, or one with packages, parses
without a local warehouse profile or any secret.

It names the profile the project asks for, with one target of the warehouse's adapter type
(the adapter decides how relation names render). Where the manifest records a value postload
reads back, the value is the real one: the database sources default to (Snowflake: the
Snowflake block's database, DuckDB: the warehouse file, whose stem is dbt-duckdb's database).
Everything else is a placeholder that is not a secret.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from postload.config import Settings, WarehouseKind

__all__ = [
    "PARSE_PROFILE_DIR",
    "PLACEHOLDER",
    "parse_profile",
    "parse_profile_writer",
    "write_parse_profile",
]

# under the project's target folder (dbt's own scratch space, git-ignored by dbt projects)
PARSE_PROFILE_DIR = "postload-parse-profile"
PLACEHOLDER = "postload_parse_only"
DEFAULT_TARGET = "parse_only"


def parse_profile_writer(
    project_dir: Path, target_path: Path, settings: Settings
) -> Callable[[], Path]:
    """Writes the profile when dbt first needs it (and once): a project that cannot have one
    fails where dbt's own errors are reported, as ``DbtInvocationError``."""

    @functools.cache
    def write() -> Path:
        from postload.dbt.project import DbtInvocationError

        try:
            return write_parse_profile(project_dir, target_path, settings)
        except (ValueError, OSError) as exc:
            raise DbtInvocationError(str(exc)) from None

    return write


def write_parse_profile(project_dir: Path, target_path: Path, settings: Settings) -> Path:
    """Write the parse-only ``profiles.yml`` (only when it changed: its modification time tells
    postload when to parse again) and return the folder holding it."""
    folder = target_path / PARSE_PROFILE_DIR
    path = folder / "profiles.yml"
    text = (
        "# Written by postload for dbt parse / dbt ls in dbt Cloud mode: no credentials, never\n"
        "# used to connect. dbt Cloud builds with its own environment's connection.\n"
        + yaml.safe_dump(parse_profile(project_dir, settings), sort_keys=False)
    )
    try:
        if path.read_text("utf-8") == text:
            return folder
    except OSError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")
    return folder


def parse_profile(project_dir: Path, settings: Settings) -> dict[str, Any]:
    profile = os.environ.get("DBT_PROFILE") or _project_profile(project_dir)
    # dbt honours DBT_TARGET over the profile's own target: name ours after it then
    target = os.environ.get("DBT_TARGET") or DEFAULT_TARGET
    output: dict[str, Any]
    if settings.warehouse is WarehouseKind.SNOWFLAKE:
        output = {
            "type": "snowflake",
            "account": PLACEHOLDER,
            "user": PLACEHOLDER,
            "password": PLACEHOLDER,
            "database": _snowflake_database(settings),
            "warehouse": PLACEHOLDER,
            "schema": PLACEHOLDER,
            "threads": 1,
        }
    else:
        # dbt-duckdb names the database after the file's stem, and parse never opens it
        output = {
            "type": "duckdb",
            "path": str(settings.duckdb_file),
            "schema": PLACEHOLDER,
            "threads": 1,
        }
    # no `config:` block: dbt refuses it beside a project's `flags:` (it is deprecated)
    return {profile: {"target": target, "outputs": {target: output}}}


def _project_profile(project_dir: Path) -> str:
    yml = project_dir / "dbt_project.yml"
    try:
        raw = yaml.safe_load(yml.read_text("utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {yml} to name the profile dbt parses with: {exc}") from None
    name = raw.get("profile") if isinstance(raw, dict) else None
    if not isinstance(name, str) or not name.strip() or "{" in name:
        raise ValueError(
            f"{yml} names no plain `profile:` (got {name!r}); in dbt Cloud mode postload parses "
            "the project with a profile of its own under that name: expected `profile: <name>`, "
            "or set DBT_PROFILE"
        )
    return name.strip()


def _snowflake_database(settings: Settings) -> str:
    """The database the Snowflake block connects to: dbt sources default to the target's."""
    from postload.warehouse._snowflake import load_connector_block

    # its SnowflakeBlockError (a ValueError) names the block and the fix
    connector = load_connector_block(settings.snowflake_block)
    return str(connector.database)
