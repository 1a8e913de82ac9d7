"""Where each source's rows live: its tables, as postload.yaml or the dbt project declares them.

A copy source is one table, ``<raw_schema>.<raw_table>``, with postload's own ``_loaded_at``. A
source without ``raw_table`` is a dbt source: a Fivetran connector's schema with its many tables,
each with the ``loaded_at_field`` the dbt project gives it (``_fivetran_synced``), in whatever
database and schema the dbt source names. Both become ``SourceTable`` rows, which is all the
planner and the warehouse need: one watermark per table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postload.config import ConfigError, PipelineConfig, Settings, SourceConfig, check_identifier

__all__ = ["SourceTable", "needs_manifest", "source_tables", "tables_for"]


@dataclass(frozen=True)
class SourceTable:
    """One table of a source: where it is and which column says when each row landed."""

    source: str  # the postload source's name
    dbt_source: str
    table: str  # the dbt source table's name (``source:<dbt_source>.<table>``)
    database: str | None
    schema: str
    identifier: str
    loaded_at_field: str
    # True for a source postload.yaml names by raw_table: recorded builds from before per-table
    # bookkeeping (``ops.transform_runs``) still count as covering it.
    named_by_config: bool = False
    # The table's name in SQL as dbt renders it (the manifest's ``relation_name``), quoting
    # included: the adapter's quoting rules, so a table named ``order`` or ``user`` works.
    rendered: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.table)

    @property
    def relation(self) -> str:
        """The table's name in SQL: as dbt renders it, else its checked plain identifiers."""
        if self.rendered:
            return self.rendered
        parts = [self.schema, self.identifier]
        if self.database is not None:
            parts.insert(0, self.database)
        return ".".join(check_identifier(p) for p in parts)

    @property
    def downstream(self) -> str:
        """dbt's selection of this table and everything built from it."""
        return f"source:{self.dbt_source}.{self.table}+"


def needs_manifest(pipeline: PipelineConfig) -> bool:
    return any(s.tables_from_dbt for s in pipeline.sources)


def tables_for(settings: Settings, pipeline: PipelineConfig) -> dict[str, list[SourceTable]]:
    """Each source's tables, reading the dbt project's manifest only when a source needs it
    (parsed again only when a project file is newer than it)."""
    from postload.dbt import DbtProject

    manifest = DbtProject.from_settings(settings).manifest() if needs_manifest(pipeline) else None
    return source_tables(pipeline, manifest, settings.pipeline_config_path)


def source_tables(
    pipeline: PipelineConfig,
    manifest: dict[str, Any] | None,
    config_path: Path | str = "postload.yaml",
) -> dict[str, list[SourceTable]]:
    """Each source's tables, in config order; ``manifest`` is needed when a source has no raw_table.

    Raises ``ConfigError`` naming the source when the dbt project does not declare it, or a table
    has no ``loaded_at_field`` (its freshness, and so what needs building, cannot be measured).
    """
    by_dbt_source: dict[str, list[dict[str, Any]]] = {}
    for node in (manifest or {}).get("sources", {}).values():
        by_dbt_source.setdefault(node["source_name"], []).append(node)
    tables: dict[str, list[SourceTable]] = {}
    for source in pipeline.sources:
        if source.raw_table is not None:
            tables[source.name] = [
                SourceTable(
                    source=source.name,
                    dbt_source=source.dbt_source_name,
                    table=source.raw_table,
                    database=None,
                    schema=pipeline.raw_schema,
                    identifier=source.raw_table,
                    loaded_at_field=source.loaded_at_field,
                    named_by_config=True,
                )
            ]
            continue
        if manifest is None:
            raise ValueError(f"source {source.name!r} is read from the dbt manifest: pass it")
        nodes = by_dbt_source.get(source.dbt_source_name)
        if not nodes:
            raise ConfigError(
                f"{config_path}: source {source.name!r} has no raw_table, so its tables are those "
                f"of dbt source {source.dbt_source_name!r}, which the dbt project does not declare "
                f"(dbt sources: {', '.join(sorted(by_dbt_source)) or 'none'}); expected a "
                "`sources:` entry of that name in the dbt project, or `dbt_source:` on the source"
            )
        tables[source.name] = [
            _from_node(source, node, config_path) for node in sorted(nodes, key=_node_name)
        ]
    return tables


# One to three dot-separated parts, each a double-quoted name (no quote inside) or a plain one:
# what dbt's adapters render, and nothing else reaches SQL.
_RELATION = re.compile(
    r'^(?:"[^"]{1,255}"|[A-Za-z_][A-Za-z0-9_$]{0,254})(?:\.(?:"[^"]{1,255}"|[A-Za-z_][A-Za-z0-9_$]{0,254})){0,2}$'
)


def _checked_relation(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _RELATION.fullmatch(value):
        raise ValueError(
            f"relation {value!r} is not one to three dot-separated names, each plain or "
            "double-quoted"
        )
    return value


def _node_name(node: dict[str, Any]) -> str:
    return str(node["name"])


def _from_node(source: SourceConfig, node: dict[str, Any], config_path: Path | str) -> SourceTable:
    where = f"dbt source {source.dbt_source_name!r}, table {node['name']!r}"
    field = node.get("loaded_at_field") or (
        source.loaded_at_field if "loaded_at_field" in source.model_fields_set else None
    )
    if not field:
        raise ConfigError(
            f"{config_path}: source {source.name!r}: {where} has no loaded_at_field, so postload "
            "cannot tell when its rows landed; expected `loaded_at_field: _fivetran_synced` (or "
            "your load-time column) on the dbt source or table, or on the source in postload.yaml"
        )
    try:
        return SourceTable(
            source=source.name,
            dbt_source=source.dbt_source_name,
            table=check_identifier(node["name"]),
            database=check_identifier(node["database"]) if node.get("database") else None,
            schema=check_identifier(node["schema"]),
            identifier=check_identifier(node.get("identifier") or node["name"]),
            loaded_at_field=check_identifier(field),
            rendered=_checked_relation(node.get("relation_name")),
        )
    except ValueError as exc:
        raise ConfigError(
            f"{config_path}: source {source.name!r}: {where}: {exc}; postload reads these names "
            "into SQL and accepts plain identifiers only"
        ) from None
