"""``postload init``: write a first ``postload.yaml`` from an existing dbt project.

One source per dbt source of the project, dbt-source-shaped (no ``raw_table``/``stage``: its
tables, schema and ``loaded_at_field`` are read from the dbt manifest at run time). A dbt source
mapped to a Fivetran connector (``--fivetran CONNECTOR_ID=DBT_SOURCE``) gets
``loader: {type: fivetran, connector_id: ...}``; the others are written commented out with a hint
(a source needs a loader: a Fivetran connector, or ``raw_table`` + ``stage`` for files postload
loads itself). The opt-in ``full_run:`` block is written commented out.

With ``FIVETRAN_API_KEY`` and ``FIVETRAN_API_SECRET`` set, ``--fivetran CONNECTOR_ID`` alone is
enough: the connection's destination schema (Fivetran REST API, ``GET /v1/connections/{id}``,
field ``schema``) picks the dbt source(s) reading that schema.

The text is validated (``load_pipeline_config``, and the manifest's tables through
``source_tables``) before it is written, and written atomically; an existing file is never
overwritten.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from postload.config import (
    ConfigError,
    FivetranLoader,
    PipelineConfig,
    Settings,
    check_identifier,
    load_pipeline_config,
)

__all__ = [
    "DEFAULT_DBT_PROJECT_DIR",
    "FIVETRAN_API_KEY_ENV",
    "FIVETRAN_API_SECRET_ENV",
    "FIVETRAN_API_URL",
    "ConfigExistsError",
    "DbtSource",
    "FivetranMapping",
    "InitError",
    "InitResult",
    "dbt_sources",
    "fivetran_connection_schema",
    "init_pipeline_config",
    "parse_fivetran_option",
    "render_pipeline_config",
    "resolve_fivetran_mappings",
    "write_new_file",
]

DEFAULT_DBT_PROJECT_DIR = Path("dbt_project")  # Settings.dbt_project_dir's default
FIVETRAN_API_URL = "https://api.fivetran.com"
FIVETRAN_API_KEY_ENV = "FIVETRAN_API_KEY"
FIVETRAN_API_SECRET_ENV = "FIVETRAN_API_SECRET"
# Fivetran's system column: when Fivetran last wrote the row (every table of every connector).
FIVETRAN_SYNCED = "_fivetran_synced"


class InitError(ValueError):
    """``postload init`` cannot write the config; the message says why and what to do."""


class ConfigExistsError(InitError):
    """The pipeline config already exists: init never overwrites it."""


@dataclass(frozen=True)
class DbtSource:
    """A dbt source as the manifest declares it (all its tables)."""

    name: str
    schema: str
    database: str | None
    tables: tuple[str, ...]
    # tables that have no loaded_at_field in the dbt project
    without_loaded_at: tuple[str, ...]
    package: str

    def describe(self) -> str:
        n = len(self.tables)
        return f"schema {self.schema}, {n} table{'s' if n != 1 else ''}"


def dbt_sources(manifest: Mapping[str, Any]) -> dict[str, DbtSource]:
    """The manifest's dbt sources by name, in name order (a source's tables are its nodes)."""
    nodes: dict[str, list[Mapping[str, Any]]] = {}
    for node in (manifest.get("sources") or {}).values():
        nodes.setdefault(str(node["source_name"]), []).append(node)
    found = {}
    for name in sorted(nodes):
        tables = sorted(nodes[name], key=lambda n: str(n["name"]))
        first = tables[0]
        found[name] = DbtSource(
            name=name,
            schema=str(first.get("schema") or ""),
            database=str(first["database"]) if first.get("database") else None,
            tables=tuple(str(t["name"]) for t in tables),
            without_loaded_at=tuple(str(t["name"]) for t in tables if not t.get("loaded_at_field")),
            package=str(first.get("package_name") or ""),
        )
    return found


@dataclass(frozen=True)
class FivetranMapping:
    """One ``--fivetran`` value: a connector and the dbt source it writes (None: look it up)."""

    connector_id: str
    dbt_source: str | None


def parse_fivetran_option(value: str) -> FivetranMapping:
    """``CONNECTOR_ID=DBT_SOURCE`` or ``CONNECTOR_ID``; the connector id as postload accepts it."""
    connector_id, has_source, dbt_source = value.partition("=")
    connector_id, dbt_source = connector_id.strip(), dbt_source.strip()
    try:
        FivetranLoader(type="fivetran", connector_id=connector_id)
    except ValidationError:
        raise InitError(
            f"--fivetran {value!r}: {connector_id!r} is not a Fivetran connector id (letters, "
            "digits, '_' and '-', not starting with '-'); expected CONNECTOR_ID=DBT_SOURCE, e.g. "
            "--fivetran warm_ambitious=salesforce"
        ) from None
    if has_source and not dbt_source:
        raise InitError(f"--fivetran {value!r}: no dbt source after '='")
    return FivetranMapping(connector_id, dbt_source if has_source else None)


def fivetran_connection_schema(
    connector_id: str,
    api_key: str,
    api_secret: str,
    *,
    base_url: str = FIVETRAN_API_URL,
    timeout_s: float = 30.0,
) -> str:
    """The destination schema of a Fivetran connection (``GET /v1/connections/{id}``).

    Raises ``InitError`` saying what went wrong; never with the credentials in it.
    """
    import httpx

    url = f"{base_url.rstrip('/')}/v1/connections/{connector_id}"
    try:
        response = httpx.get(
            url,
            auth=(api_key, api_secret),
            headers={"Accept": "application/json;version=2"},
            timeout=timeout_s,
        )
    except httpx.HTTPError as exc:
        raise InitError(
            f"could not reach the Fivetran API to read connection {connector_id!r} "
            f"({type(exc).__name__}); give --fivetran {connector_id}=DBT_SOURCE instead"
        ) from None
    if response.status_code in (401, 403):
        raise InitError(
            f"the Fivetran API refused {FIVETRAN_API_KEY_ENV}/{FIVETRAN_API_SECRET_ENV} "
            f"(HTTP {response.status_code}) reading connection {connector_id!r}: check them, or "
            f"give --fivetran {connector_id}=DBT_SOURCE instead"
        )
    if response.status_code == 404:
        raise InitError(
            f"Fivetran has no connection {connector_id!r} (HTTP 404): expected the connection id "
            "from the connection's Setup tab in Fivetran"
        )
    schema = None
    if response.status_code == 200:
        try:
            data = response.json().get("data") or {}
            schema = data.get("schema") if isinstance(data, dict) else None
        except ValueError:
            schema = None
    if not isinstance(schema, str) or not schema:
        raise InitError(
            f"the Fivetran API answered HTTP {response.status_code} without a destination schema "
            f"for connection {connector_id!r}; give --fivetran {connector_id}=DBT_SOURCE instead"
        )
    return schema


def _describe_sources(sources: Mapping[str, DbtSource]) -> str:
    return ", ".join(f"{s.name} ({s.schema})" for s in sources.values()) or "none"


def resolve_fivetran_mappings(
    mappings: Sequence[FivetranMapping],
    sources: Mapping[str, DbtSource],
    lookup_schema: Callable[[str], str] | None,
) -> dict[str, str]:
    """dbt source name -> connector id, for every mapping; ``lookup_schema`` (connector id ->
    destination schema) serves the mappings without a dbt source, or None when there are no
    Fivetran credentials.

    A connection's schema matches the dbt sources reading that schema (case-insensitive), or
    else those reading ``<schema>_<something>`` (a database connector writes one schema per
    source schema, with the connection's schema as prefix).
    """
    mapped: dict[str, str] = {}

    def assign(dbt_source: str, connector_id: str) -> None:
        other = mapped.get(dbt_source)
        if other is not None and other != connector_id:
            raise InitError(
                f"dbt source {dbt_source!r} is mapped to two Fivetran connectors ({other!r} and "
                f"{connector_id!r}): one connector writes one dbt source's schema"
            )
        mapped[dbt_source] = connector_id

    for mapping in mappings:
        if mapping.dbt_source is not None:
            if mapping.dbt_source not in sources:
                raise InitError(
                    f"--fivetran {mapping.connector_id}={mapping.dbt_source}: the dbt project has "
                    f"no source {mapping.dbt_source!r}; its dbt sources (schema): "
                    f"{_describe_sources(sources)}"
                )
            assign(mapping.dbt_source, mapping.connector_id)
            continue
        if lookup_schema is None:
            raise InitError(
                f"--fivetran {mapping.connector_id}: which dbt source does it write? Give "
                f"--fivetran {mapping.connector_id}=DBT_SOURCE (dbt sources: "
                f"{', '.join(sources) or 'none'}), or set {FIVETRAN_API_KEY_ENV} and "
                f"{FIVETRAN_API_SECRET_ENV} to read the connection's schema from Fivetran"
            )
        schema = lookup_schema(mapping.connector_id)
        matches = [s.name for s in sources.values() if s.schema.lower() == schema.lower()]
        if not matches:
            prefix = f"{schema.lower()}_"
            matches = [s.name for s in sources.values() if s.schema.lower().startswith(prefix)]
        if not matches:
            raise InitError(
                f"Fivetran connection {mapping.connector_id!r} writes schema {schema!r}, which no "
                f"dbt source of the project reads (dbt sources (schema): "
                f"{_describe_sources(sources)}); declare a dbt source for it, or give --fivetran "
                f"{mapping.connector_id}=DBT_SOURCE"
            )
        for name in matches:
            assign(name, mapping.connector_id)
    return mapped


def _is_identifier(value: str) -> bool:
    try:
        check_identifier(value)
    except ValueError:
        return False
    return True


def _yaml_str(value: str) -> str:
    """A scalar as YAML: plain when it reads back as the same string, else double-quoted."""
    import json

    import yaml

    try:
        if yaml.safe_load(value) == value and ":" not in value and "#" not in value:
            return value
    except yaml.YAMLError:
        pass
    return json.dumps(value)


def _comment(text: str, indent: str = "", width: int = 98) -> list[str]:
    """``text`` as ``#`` comment lines of at most ``width`` characters."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and len(indent) + 2 + len(line) + 1 + len(word) > width:
            lines.append(f"{indent}# {line}")
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(f"{indent}# {line}")
    return lines


def render_pipeline_config(
    sources: Mapping[str, DbtSource],
    mapped: Mapping[str, str],
    *,
    dbt_project: str,
    dbt_project_env: str | None,
    root: str = "",
) -> str:
    """The commented ``postload.yaml`` text: one source per dbt source (mapped ones active).

    ``dbt_project`` is how the header names the project; ``dbt_project_env`` the value to set
    POSTLOAD_DBT_PROJECT_DIR to when the project is not the default ``dbt_project``; ``root``
    the dbt project's name (sources of other packages say which package declares them).
    """
    out = [
        f"# postload pipeline config, written by `postload init` from the dbt project {dbt_project}.",
        "# Validated when loaded; every key: docs/configuration.md. Check the whole setup with",
        "# `postload doctor`.",
    ]
    if dbt_project_env is not None:
        out += [
            "#",
            "# The dbt project is not ./dbt_project, and this file cannot say where it is: set",
            f"#   POSTLOAD_DBT_PROJECT_DIR={dbt_project_env}",
            "# wherever postload runs (your shell, a .env file in this folder, the worker's",
            "# environment).",
        ]
    out += [
        "version: 1",
        "ops_schema: ops        # postload's own tables (load log, run results, pipeline_status)",
        "",
        "# Each source below is a dbt source of the project, without raw_table: its tables, schema",
        "# and each table's loaded_at_field are read from the dbt project. After a sync, postload",
        "# builds what is downstream of the tables whose newest loaded_at_field is newer than the",
        "# last successful build covered (default selection: source:<dbt source>.<table>+).",
        "sources:",
    ]
    for source in sources.values():
        connector_id = mapped.get(source.name)
        out.append("")
        out += _comment(
            f"dbt source {source.name} ({source.describe()}"
            + (f", from package {source.package}" if source.package not in ("", root) else "")
            + ").",
            "  ",
        )
        if not _is_identifier(source.name):
            out += _comment(
                f"Not usable as is: {source.name!r} is not a plain identifier, and postload "
                "names sources (and reads dbt source names into SQL) as plain identifiers only.",
                "  ",
            )
            continue
        entry = [f"- name: {source.name}"]
        if connector_id is not None:
            entry.append(f"  loader: {{type: fivetran, connector_id: {_yaml_str(connector_id)}}}")
        else:
            entry.append("  loader: {type: fivetran, connector_id: YOUR_CONNECTOR_ID}")
        if source.without_loaded_at:
            entry.append(
                f"  loaded_at_field: {FIVETRAN_SYNCED}   # no loaded_at_field in dbt for "
                + ", ".join(source.without_loaded_at[:3])
                + (", …" if len(source.without_loaded_at) > 3 else "")
            )
        entry.append(
            f'  # selection: {{select: "source:{source.name}+"}}   # optional: replaces the '
            "per-table default"
        )
        if connector_id is not None:
            out += [f"  {line}" for line in entry]
            continue
        out += _comment(
            "Not mapped to a Fivetran connector, so left out. To transform after its syncs, "
            "uncomment it and set connector_id (or run init again with "
            f"--fivetran CONNECTOR_ID={source.name}). For files postload loads itself, give it "
            "raw_table and stage instead of the loader (a copy source: docs/configuration.md).",
            "  ",
        )
        out += [f"  # {line}" for line in entry if not line.lstrip().startswith("#")]
    example = next(iter(mapped), "SOURCE")
    out += [
        "",
        "# Optional (opt-in, so commented out): one full dbt build each time every source has loaded",
        "# again since the last one and all are fresh (limits from each dbt source's freshness",
        "# block, or stale_after here). Uncomment to turn it on; limit it further with the keys below.",
        "# full_run:",
        "#   min_interval: 6h          # at least this long between two full builds",
        '#   cron: "0 6 * * *"         # at most one full build per period (UTC)',
        f"#   stale_after: {{{example}: 2h}}   # per source, when its dbt source has no freshness",
        "",
    ]
    return "\n".join(out)


def write_new_file(path: Path, text: str, validate: Callable[[Path], object]) -> None:
    """Write ``text`` to ``path`` atomically, after ``validate`` accepted it; never overwrite.

    The text is written to a temporary file next to ``path`` and validated there; it then
    appears under ``path`` in one step (a hard link, which fails when ``path`` exists).
    """
    if path.exists():
        raise ConfigExistsError(f"{path} already exists: not overwritten (remove or rename it)")
    # Created as open() creates files (mode 0666 less the umask), unlike mkstemp's 0600.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        validate(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ConfigExistsError(
                f"{path} already exists: not overwritten (remove or rename it)"
            ) from None
        except OSError:  # a filesystem without hard links: replace, after checking again
            if path.exists():
                raise ConfigExistsError(
                    f"{path} already exists: not overwritten (remove or rename it)"
                ) from None
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@dataclass(frozen=True)
class InitResult:
    path: Path
    text: str
    pipeline: PipelineConfig
    sources: dict[str, DbtSource]
    mapped: dict[str, str]  # dbt source -> connector id
    # what to set POSTLOAD_DBT_PROJECT_DIR to, when the project is not the default dbt_project
    dbt_project_env: str | None

    @property
    def unmapped(self) -> list[str]:
        return [name for name in self.sources if name not in self.mapped]


def _dbt_project_env(project_dir: Path, dbt_project: Path) -> str | None:
    """What POSTLOAD_DBT_PROJECT_DIR must be for ``dbt_project`` (None for the default one):
    relative to the project folder when inside it, else absolute."""
    resolved, root = dbt_project.resolve(), project_dir.resolve()
    if resolved == (root / DEFAULT_DBT_PROJECT_DIR).resolve():
        return None
    try:
        return resolved.relative_to(root).as_posix()
    except ValueError:
        return str(resolved)


def init_pipeline_config(
    settings: Settings,
    dbt_project: Path,
    fivetran: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    fivetran_api_url: str = FIVETRAN_API_URL,
) -> InitResult:
    """Write ``settings.pipeline_config_path`` from the dbt project at ``dbt_project``."""
    from postload.dbt import DbtInvocationError, DbtProject
    from postload.sources import source_tables

    env = os.environ if env is None else env
    path = settings.pipeline_config_path
    if path.exists():
        raise ConfigExistsError(f"{path} already exists: not overwritten (remove or rename it)")
    if not path.parent.is_dir():
        raise InitError(f"{path.parent}: no such folder (POSTLOAD_PROJECT_DIR)")
    mappings = [parse_fivetran_option(v) for v in fivetran]
    dbt_project = dbt_project.expanduser().resolve()
    if not (dbt_project / "dbt_project.yml").is_file():
        raise InitError(
            f"{dbt_project}: not a dbt project (no dbt_project.yml); expected --dbt-project "
            "to name the folder with your dbt_project.yml"
        )
    try:
        project = DbtProject(dbt_project, settings.duckdb_file)
        project.profiles_dir()  # the profile dbt needs is findable (even with a fresh manifest)
        manifest = project.manifest()
    except DbtInvocationError as exc:
        raise InitError(f"the dbt project {dbt_project} could not be parsed: {exc}") from None
    sources = dbt_sources(manifest)
    if not sources:
        raise InitError(
            f"the dbt project {dbt_project} declares no sources: postload transforms what is "
            "downstream of dbt sources (expected `sources:` in the project's .yml files)"
        )
    key, secret = env.get(FIVETRAN_API_KEY_ENV, ""), env.get(FIVETRAN_API_SECRET_ENV, "")
    lookup: Callable[[str], str] | None = None
    if key.strip() and secret.strip():

        def lookup(connector_id: str) -> str:
            return fivetran_connection_schema(connector_id, key, secret, base_url=fivetran_api_url)

    mapped = resolve_fivetran_mappings(mappings, sources, lookup)
    if not mapped:
        raise InitError(
            "no dbt source is mapped to a Fivetran connector, and postload.yaml needs at least "
            f"one source: give --fivetran CONNECTOR_ID=DBT_SOURCE (dbt sources: "
            f"{', '.join(sources)}). For files postload loads itself (COPY), write the sources "
            "by hand with raw_table and stage: docs/configuration.md"
        )
    unusable = [name for name in mapped if not _is_identifier(name)]
    if unusable:
        raise InitError(
            f"dbt source(s) {', '.join(map(repr, unusable))}: not plain identifiers, which "
            "postload needs for source names (letters, digits and underscores)"
        )
    dbt_project_env = _dbt_project_env(settings.project_dir, dbt_project)
    text = render_pipeline_config(
        sources,
        mapped,
        dbt_project=dbt_project_env or str(DEFAULT_DBT_PROJECT_DIR),
        dbt_project_env=dbt_project_env,
        root=str((manifest.get("metadata") or {}).get("project_name") or ""),
    )
    loaded: list[PipelineConfig] = []

    def validate(candidate: Path) -> None:
        try:
            pipeline = load_pipeline_config(candidate)
            source_tables(pipeline, manifest, path)
        except ConfigError as exc:
            raise InitError(
                f"the config written from the dbt project does not hold: {exc}"
            ) from None
        loaded.append(pipeline)

    write_new_file(path, text, validate)
    return InitResult(
        path=path,
        text=text,
        pipeline=loaded[0],
        sources=sources,
        mapped=mapped,
        dbt_project_env=dbt_project_env,
    )
