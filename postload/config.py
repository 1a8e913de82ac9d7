"""The one place that decides configuration.

Two inputs, nothing else:

* ``Settings`` — runtime choices (which warehouse, which dbt runner, paths, retry policy), read from
  ``POSTLOAD_*`` environment variables. The embedded default needs none of them.
* ``PipelineConfig`` — the checked-in ``postload.yaml`` that declares the sources, validated with
  pydantic; errors name the file, the key and the expected form.

Names that end up in SQL (schemas, tables, stages) are validated here as plain identifiers, so no
SQL anywhere is ever built from an unchecked config value.
"""

from __future__ import annotations

import os
import re
import sys
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, cast

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

# The Prefect Secret block the receiver reads the Fivetran webhook secret from when
# POSTLOAD_FIVETRAN_WEBHOOK_SECRET is not set (``postload blocks register`` creates it).
DEFAULT_FIVETRAN_WEBHOOK_SECRET_BLOCK = "postload-fivetran-webhook-secret"
FIVETRAN_WEBHOOK_SECRET_ENV = "POSTLOAD_FIVETRAN_WEBHOOK_SECRET"
FIVETRAN_WEBHOOK_SECRET_BLOCK_ENV = "POSTLOAD_FIVETRAN_WEBHOOK_SECRET_BLOCK"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
# dbt selection arguments travel as one argv element (never through a shell), but they still
# must be plain node-selection syntax: names, dots, colons, wildcards, graph operators, commas.
_DBT_SELECTION = re.compile(r"^[A-Za-z0-9_.:*+@/,\- ]{1,100000}$")


def check_identifier(value: str) -> str:
    """Accept only a plain SQL identifier (letters, digits, underscore; not starting with a digit)."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a plain identifier: expected letters, digits and underscores, "
            "starting with a letter or underscore (max 255 chars)"
        )
    return value


def check_dbt_selection(value: str) -> str:
    # No space-separated word may start with "-": the dbt Cloud runner sends the selection inside
    # the command string `dbt build --select <selection>`, where such a word is an option
    # (`source:events+ --full-refresh --target prod`). A blank selection selects nothing.
    if (
        not isinstance(value, str)
        or not _DBT_SELECTION.fullmatch(value)
        or not value.split()
        or any(word.startswith("-") for word in value.split())
    ):
        raise ValueError(
            f"{value!r} is not a dbt selection: expected node-selection syntax such as "
            "'source:events+', 'tag:hourly' or 'stg_orders+' (letters, digits and _ . : * + @ / , -)"
        )
    return value


Identifier = Annotated[str, AfterValidator(check_identifier)]
DbtSelectionArg = Annotated[str, AfterValidator(check_dbt_selection)]


class WarehouseKind(StrEnum):
    DUCKDB = "duckdb"
    SNOWFLAKE = "snowflake"


class DbtRunnerKind(StrEnum):
    CORE = "core"
    CLOUD = "cloud"


class NodeTaskMode(StrEnum):
    """Where dbt Core's per-node Prefect task runs are recorded from (see postload/dbt/_node_process.py)."""

    PROCESS = "process"  # a forked child: Prefect's per-task work stays off dbt's GIL
    THREAD = "thread"  # threads of the dbt process, as prefect-dbt does

    @classmethod
    def default(cls) -> NodeTaskMode:
        # fork() with threads running is only sound where Prefect resets its own threads in the
        # child (it does, via os.register_at_fork) and the C runtime allows it: Linux. macOS's
        # system frameworks are not fork-safe once threads exist.
        return (
            cls.PROCESS if hasattr(os, "fork") and sys.platform.startswith("linux") else cls.THREAD
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CopyLoader(_Strict):
    """Files staged by the user's own jobs and loaded by ``COPY INTO`` (or the DuckDB equivalent)."""

    type: Literal["copy"] = "copy"


class FivetranLoader(_Strict):
    """A Fivetran connector writes the raw table; postload only transforms after its syncs."""

    type: Literal["fivetran"]
    # The receiver's pattern (postload.fivetran.webhook.FivetranId): an id it refuses could never trigger
    # this source, and a leading "-" reads as an option on a command line.
    connector_id: Annotated[
        str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")
    ]


class Selection(_Strict):
    """How to select the dbt work downstream of a source: exactly one of the three forms."""

    select: DbtSelectionArg | None = None
    tag: Identifier | None = None
    selector: Identifier | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Selection:
        given = [k for k in ("select", "tag", "selector") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "expected exactly one of 'select' (e.g. 'source:events+'), 'tag' (e.g. 'events') "
                f"or 'selector' (a name in selectors.yml); got {given or 'none'}"
            )
        return self

    def cli_args(self) -> list[str]:
        """dbt CLI arguments that select this work (each its own argv element)."""
        if self.selector is not None:
            return ["--selector", self.selector]
        if self.tag is not None:
            return ["--select", f"tag:{self.tag}"]
        assert self.select is not None
        return ["--select", self.select]

    def describe(self) -> str:
        return " ".join(self.cli_args())


class SourceConfig(_Strict):
    """One source postload transforms after it loads.

    Two shapes. A *copy* source names its ``raw_table`` and ``stage``: postload loads the staged
    files into ``<raw_schema>.<raw_table>`` itself. A source without ``raw_table`` is the dbt
    source of that name as the dbt project declares it (``dbt_source``, default: the source's
    name): its schema, database and tables, each table's ``loaded_at_field`` and its freshness are
    read from the dbt manifest, the way a Fivetran connector's schema is described in dbt.
    """

    name: Identifier
    raw_table: Identifier | None = Field(
        default=None,
        description="copy sources: the table in raw_schema the staged files load into; "
        "without it, the source's tables are the dbt source's tables",
    )
    stage: Identifier | None = Field(
        default=None,
        description="copy sources: DuckDB: sub-folder of the stage root. Snowflake: the named "
        "stage in the raw schema.",
    )
    file_format: Literal["json"] = "json"
    loader: CopyLoader | FivetranLoader = Field(default_factory=CopyLoader, discriminator="type")
    dbt_source: Identifier | None = Field(
        default=None, description="dbt source name; defaults to the source name"
    )
    selection: Selection | None = Field(
        default=None,
        description="defaults to the changed tables' downstream work: "
        "'source:<dbt_source>.<table>+' for each (or 'source:<dbt_source>+' with a raw_table)",
    )
    dbt_cloud_job_id: int | None = Field(default=None, gt=0)
    loaded_at_field: Identifier = Field(
        default="_loaded_at",
        description="raw-table column with each row's load time (Fivetran: _fivetran_synced); "
        "its max is the source's freshness, the truth that decides what needs transforming. "
        "For a dbt-source-shaped source, each table's loaded_at_field in the dbt project wins.",
    )

    @model_validator(mode="after")
    def _copy_sources_name_table_and_stage(self) -> SourceConfig:
        if self.stage is not None and self.raw_table is None:
            raise ValueError(
                f"stage {self.stage!r} is set but raw_table is not: a stage's files load into "
                "raw_table; expected both (a copy source) or neither (a source whose tables the "
                "dbt project declares)"
            )
        if self.loader.type == "copy":
            missing = [key for key in ("raw_table", "stage") if getattr(self, key) is None]
            if missing:
                raise ValueError(
                    f"a copy source loads staged files into a table: expected {' and '.join(missing)} "
                    "(or `loader: {type: fivetran, connector_id: ...}` for a source whose tables "
                    "another tool writes)"
                )
        return self

    @property
    def dbt_source_name(self) -> str:
        return self.dbt_source or self.name

    def copy_target(self) -> tuple[str, str]:
        """``(raw_table, stage)``: where this source's staged files load; a clear error for a
        source without them (its tables are written by another tool, such as Fivetran)."""
        if self.raw_table is None or self.stage is None:
            raise NotACopySourceError(
                f"source {self.name!r} has no raw_table and stage, so there are no staged files "
                "to load: its tables are the dbt source's, written by its loader "
                f"({self.loader.type}); transform-on-sync builds them after each sync"
            )
        return self.raw_table, self.stage

    @property
    def tables_from_dbt(self) -> bool:
        """True when the source's tables are the dbt source's, read from the manifest."""
        return self.raw_table is None

    @property
    def effective_selection(self) -> Selection:
        return self.selection or Selection(select=f"source:{self.dbt_source_name}+")


_DURATION = re.compile(r"^\s*(\d+)\s*(m|min|h|d)\s*$")
_DURATION_UNITS = {"m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> timedelta:
    """``30m``, ``2h``, ``1d`` or a number of minutes."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        seconds = value * 60
    else:
        match = _DURATION.match(value) if isinstance(value, str) else None
        if match is None or int(match.group(1)) <= 0:
            raise ValueError(
                f"{value!r} is not a duration: expected a positive number of minutes or a string "
                "like '30m', '2h' or '1d'"
            )
        seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        # Not a ValueError, so pydantic would let it escape the loader instead of reporting it.
        raise ValueError(f"{value!r} is too long a duration (at most 999999999 days)") from None


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def check_cron(value: str) -> str:
    from cronsim import CronSim, CronSimError

    try:
        CronSim(value, datetime.now(UTC))
    except (CronSimError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{value!r} is not a cron expression ({exc}): expected five fields, e.g. '0 6 * * *'"
        ) from None
    return value


class FullRunConfig(_Strict):
    """The opt-in full build: what full-run-when-fresh waits for, and how often it may build.

    It builds only when every tracked source has loaded since the last full build and every one
    is fresh. Unset limits come from each dbt source's freshness block: ``warn_after`` is the
    allowed staleness, ``error_after`` the alert deadline.
    """

    sources: list[Identifier] | None = Field(
        default=None, description="tracked sources; defaults to every source"
    )
    stale_after: dict[Identifier, Duration] = Field(default_factory=dict)
    alert_after: dict[Identifier, Duration] = Field(default_factory=dict)
    min_interval: Duration | None = Field(
        default=None, description="at least this long between two full builds"
    )
    cron: Annotated[str, AfterValidator(check_cron)] | None = Field(
        default=None,
        description="at most one full build per period of this cron expression (UTC): after each "
        "tick, the first time the sources allow it",
    )
    dbt_cloud_job_id: int | None = Field(
        default=None, gt=0, description="dbt Cloud: the job that builds everything"
    )


class PipelineConfig(_Strict):
    version: Literal[1] = 1
    raw_schema: Identifier = "raw"
    ops_schema: Identifier = "ops"
    sources: list[SourceConfig] = Field(min_length=1)
    # Opt-in: without a `full_run:` key the full-run-when-fresh flow builds nothing.
    full_run: FullRunConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_full_run_opts_in(cls, data: object) -> object:
        # `full_run:` with nothing under it opts in with the defaults, as `full_run: {}` does.
        if isinstance(data, dict) and "full_run" in data and data["full_run"] is None:
            return {**data, "full_run": {}}
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> PipelineConfig:
        seen: set[str] = set()
        for s in self.sources:
            if s.name in seen:
                raise ValueError(f"source name {s.name!r} is declared twice")
            seen.add(s.name)
        known = ", ".join(self.source_names)
        for key in ("sources", "stale_after", "alert_after"):
            for name in getattr(self.full_run, key, None) or []:
                if name not in seen:
                    raise ValueError(
                        f"full_run.{key} names source {name!r}, which is not declared; "
                        f"expected one of: {known}"
                    )
        return self

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def connector_ids(self) -> list[str]:
        """The Fivetran connector ids of the sources, in order, without duplicates."""
        return list(
            dict.fromkeys(
                s.loader.connector_id for s in self.sources if isinstance(s.loader, FivetranLoader)
            )
        )

    def sources_for_connector(self, connector_id: str) -> list[SourceConfig]:
        return [
            s
            for s in self.sources
            if isinstance(s.loader, FivetranLoader) and s.loader.connector_id == connector_id
        ]

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise UnknownSourceError(name, self.source_names)


class NotACopySourceError(ValueError):
    """A load was asked of a source postload does not load (no raw_table and stage)."""


class UnknownSourceError(KeyError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown source {self.name!r}; known sources: {', '.join(self.known)}"


class ConfigError(ValueError):
    """A pipeline config that cannot be used; the message names the file, key and expected form."""


def load_pipeline_config(path: Path) -> PipelineConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline config not found (expected a YAML file)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (expected a UTF-8 YAML file): {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        # PyYAML composes nested collections recursively.
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except ValueError as exc:
        # PyYAML's constructors raise plain ValueErrors: an integer over Python's 4300-digit
        # limit, an impossible date such as 2024-13-45.
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'sources' list at the top level")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_explain(path, raw, exc)) from None


def _explain(path: Path, raw: dict, exc: ValidationError) -> str:
    lines = [f"{path}: invalid pipeline config ({exc.error_count()} problem(s))"]
    for err in exc.errors():
        lines.append(f"  - {_key_path(raw, err['loc'])}: {_expected(err)}")
    return "\n".join(lines)


def _key_path(raw: dict, loc: tuple) -> str:
    """Render a pydantic location as a YAML key path, naming sources by their name, not index."""
    parts: list[str] = []
    node: object = raw
    for item in loc:
        if isinstance(item, int):
            name = (
                node[item].get("name")
                if isinstance(node, list) and item < len(node) and isinstance(node[item], dict)
                else None
            )
            parts[-1:] = [
                f"{parts[-1] if parts else ''}[{item}]" + (f"(name={name})" if name else "")
            ]
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            # discriminated unions add the tag as a location part; it is not a YAML key
            if isinstance(node, dict) and item not in node and item in ("copy", "fivetran"):
                continue
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def _expected(err: ErrorDetails) -> str:
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key (check its spelling; see the documented keys in docs/configuration.md)"
    if kind == "missing":
        return "required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(got, dict | list):
        return msg
    return f"{msg} (got {got!r})"


class Settings(BaseSettings):
    """Runtime settings, from ``POSTLOAD_*`` environment variables (or a ``.env`` file)."""

    model_config = SettingsConfigDict(env_prefix="POSTLOAD_", env_file=".env", extra="ignore")

    project_dir: Path = Field(default_factory=Path.cwd, description="root of the postload checkout")
    pipeline_config: Path = Path("postload.yaml")
    home: Path = Field(Path(".postload"), description="local state: warehouse, stage (git-ignored)")
    warehouse: WarehouseKind = WarehouseKind.DUCKDB
    duckdb_path: Path | None = None
    stage_root: Path | None = None
    snowflake_block: str = "postload-snowflake"

    dbt_runner: DbtRunnerKind = DbtRunnerKind.CORE
    dbt_project_dir: Path = Path("dbt_project")
    dbt_cloud_credentials_block: str = "postload-dbt-cloud"
    dbt_cloud_job_id: int | None = None
    dbt_cloud_max_wait_seconds: int = Field(3600, gt=0)
    dbt_cloud_poll_seconds: float = Field(10.0, gt=0)

    warehouse_concurrency_limit: str = "postload-warehouse"
    # 1 s catches syncs whose webhooks arrive together (a burst posted at once lands well inside
    # it) at a fifth of the 5 s webhook-to-dbt budget; later ones get the one follow-up build.
    sync_debounce_seconds: float = Field(
        1.0, ge=0, le=600, description="wait before planning an event-triggered transform"
    )
    sync_max_rounds: int = Field(5, ge=1, le=50)

    # How often each flow run tells Prefect it is alive (Prefect's minimum is 30 s). A run silent
    # for 3 beats is marked Crashed by the postload-run-lost automation: its process is gone with
    # the runner or worker that would otherwise report it. prefect.yaml's job variables pass the
    # same value to worker-run flows (PREFECT_FLOWS_HEARTBEAT_FREQUENCY).
    run_heartbeat_seconds: int = Field(30, ge=30, le=3600)
    # The longest a flow run may take before Prefect ends it TimedOut (0: no limit). A hung dbt
    # build otherwise holds its deployment's only slot and the warehouse writer slot for ever,
    # kept alive by its heartbeats. Read when a flow's module is imported, i.e. in the process
    # that runs it (a worker's job environment, or `postload serve`'s), so a deployment's job
    # variables can set its own. Sized for a full dbt build; transform-on-sync may run up to
    # sync_max_rounds builds within it.
    flow_timeout_seconds: int = Field(7200, ge=0)

    retries: int = Field(3, ge=0, le=20)
    retry_backoff_seconds: float = Field(5.0, ge=0)
    retry_jitter_factor: float = Field(0.5, ge=0)
    # dbt node failures (Core): `dbt retry` attempts of the failed nodes and their children
    dbt_node_retries: int = Field(default=1, ge=0, le=10)
    dbt_node_tasks: NodeTaskMode = Field(default_factory=NodeTaskMode.default)

    receiver_host: str = Field("127.0.0.1", min_length=1, description="the receiver's bind address")
    receiver_port: int = Field(8787, ge=1, le=65535)
    receiver_outbox: Path | None = Field(
        default=None,
        description="the receiver's SQLite outbox; default .postload/receiver-outbox.sqlite3",
    )
    receiver_max_body_bytes: int = Field(1 << 20, gt=0, description="larger bodies get a 413")
    fivetran_webhook_secret: SecretStr | None = Field(
        default=None, description="signs Fivetran webhooks; when unset, read from the Secret block"
    )
    fivetran_webhook_secret_block: str = Field(DEFAULT_FIVETRAN_WEBHOOK_SECRET_BLOCK, min_length=1)

    def _abs(self, p: Path) -> Path:
        return p if p.is_absolute() else (self.project_dir / p)

    @cached_property
    def home_path(self) -> Path:
        return self._abs(self.home)

    @cached_property
    def duckdb_file(self) -> Path:
        return (
            self._abs(self.duckdb_path) if self.duckdb_path else self.home_path / "warehouse.duckdb"
        )

    @cached_property
    def stage_root_path(self) -> Path:
        return self._abs(self.stage_root) if self.stage_root else self.home_path / "stage"

    @cached_property
    def pipeline_config_path(self) -> Path:
        return self._abs(self.pipeline_config)

    @cached_property
    def dbt_project_path(self) -> Path:
        return self._abs(self.dbt_project_dir)

    @cached_property
    def receiver_outbox_path(self) -> Path:
        return (
            self._abs(self.receiver_outbox)
            if self.receiver_outbox
            else self.home_path / "receiver-outbox.sqlite3"
        )

    def resolve_fivetran_webhook_secret(self) -> tuple[str, str]:
        """The Fivetran webhook secret and where it came from (for logs: never the value).

        ``POSTLOAD_FIVETRAN_WEBHOOK_SECRET`` wins; otherwise the Prefect Secret block named by
        ``fivetran_webhook_secret_block`` is read from the current Prefect API. Raises
        ``ConfigError`` naming both places when neither holds a secret.
        """
        if self.fivetran_webhook_secret is not None:
            value = self.fivetran_webhook_secret.get_secret_value()
            # An empty variable is a forgotten one, not a secret: an empty HMAC key is forgeable.
            if value.strip():
                return value, FIVETRAN_WEBHOOK_SECRET_ENV
        name = self.fivetran_webhook_secret_block

        def missing(block_problem: str) -> ConfigError:
            return ConfigError(
                f"no Fivetran webhook secret: {FIVETRAN_WEBHOOK_SECRET_ENV} is not set (or empty) "
                f"and the Prefect Secret block {name!r} {block_problem}. Expected one of them: set "
                f"{FIVETRAN_WEBHOOK_SECRET_ENV}, or create the block with `postload blocks "
                f"register` while it is set ({FIVETRAN_WEBHOOK_SECRET_BLOCK_ENV} names another "
                "block)"
            )

        from prefect.blocks.system import Secret
        from prefect.exceptions import ObjectNotFound

        try:
            # `_sync` is async_dispatch's keyword, missing from its type: the block, not a coroutine.
            block = cast(Secret, Secret.load(name, _sync=True))  # type: ignore[call-arg]
        except ValueError as exc:
            if isinstance(exc.__cause__, ObjectNotFound):
                raise missing("does not exist") from None
            raise ConfigError(f"the Secret block {name!r} could not be read: {exc}") from None
        except Exception as exc:
            raise ConfigError(
                f"the Secret block {name!r} could not be read from the Prefect API "
                f"({type(exc).__name__}: {exc}); set {FIVETRAN_WEBHOOK_SECRET_ENV} or check "
                "PREFECT_API_URL"
            ) from None
        value = block.get()
        if not isinstance(value, str) or not value.strip():
            held = f"a {type(value).__name__}" if value else "an empty value"
            raise missing(f"holds {held}, not a non-empty string")
        return value, f"Secret block {name!r}"

    def load_pipeline(self) -> PipelineConfig:
        path = self.pipeline_config_path
        if not path.is_file() and "project_dir" not in self.model_fields_set:
            # The usual cause on a worker or in a container: a flow run started outside the
            # checkout (the working directory is the default project dir).
            raise ConfigError(
                f"{path}: pipeline config not found (expected a YAML file). POSTLOAD_PROJECT_DIR "
                f"is not set, so the postload checkout is taken to be the working directory "
                f"{self.project_dir}: run from the checkout, or set POSTLOAD_PROJECT_DIR to it"
            )
        return load_pipeline_config(path)
