"""The Snowflake warehouse: ``COPY INTO … ON_ERROR='CONTINUE'`` through a prefect-snowflake block.

Same contract as the DuckDB warehouse: one result per staged file processed, files loaded before
are skipped (Snowflake's own load metadata), every load is recorded in ``<ops>.load_log`` in the
same transaction as the COPY, and every dbt result in ``<ops>.dbt_run_results``.

Each operation uses a fresh ``SnowflakeConnector``: the block's ``fetch_*`` methods cache cursors
by SQL text, so a COPY re-issued on the same instance (a task retry) would page through the old
result instead of running again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NoReturn

import snowflake.connector.errors as sf_errors
from pydantic import SecretBytes, SecretStr
from snowflake.connector import DictCursor

from postload.config import PipelineConfig, SourceConfig, check_identifier
from postload.warehouse._sql import (
    LOAD_LOG_COLUMNS,
    RUN_RESULT_COLUMNS,
    TRANSFORM_RUN_COLUMNS,
    TRANSFORM_TABLE_COLUMNS,
    last_build_sql,
    ops_ddl,
    transform_history_sql,
    transform_rows,
    watermarks_skipping_missing,
    watermarks_sql,
)
from postload.warehouse._types import (
    FileLoadResult,
    LoadStatus,
    TransformRecord,
    WarehouseUnavailableError,
    Watermark,
    utcnow,
)

if TYPE_CHECKING:
    from prefect_snowflake import SnowflakeConnector

    from postload.sources import SourceTable

ConnectorFactory = Callable[[], "SnowflakeConnector"]

RAW_COLUMNS = "(record VARIANT, _file VARCHAR, _loaded_at TIMESTAMP_NTZ)"

# Snowflake's reply when a COPY finds no new files (load metadata skips those loaded before).
_NO_FILES_PREFIX = "copy executed with 0 files processed"
# fakesnow reports files it skipped as rows with this status; real Snowflake leaves them out.
_SKIPPED = "LOAD_SKIPPED"

# Driver errors that mean "could not reach / lost Snowflake": retrying may succeed.
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    sf_errors.InterfaceError,
    sf_errors.OperationalError,
    sf_errors.InternalServerError,
    sf_errors.ServiceUnavailableError,
    sf_errors.GatewayTimeoutError,
    sf_errors.RequestTimeoutError,
    sf_errors.BadGatewayError,
    sf_errors.TooManyRequests,
    sf_errors.OtherHTTPRetryableError,
    sf_errors.RequestExceedMaxRetryError,
)
# Errors that a retry cannot fix: bad SQL, bad data, rejected credentials, refused TLS.
_PERMANENT_TYPES: tuple[type[BaseException], ...] = (
    sf_errors.ProgrammingError,
    sf_errors.IntegrityError,
    sf_errors.DataError,
    sf_errors.NotSupportedError,
    sf_errors.NonRetryableTlsError,
    sf_errors.ForbiddenError,
    sf_errors.BadRequest,
    sf_errors.MethodNotAllowed,
    sf_errors.MissingDependencyError,
)
# Server codes for rejected credentials (newer drivers also give them SQLSTATE 28000; older ones
# used 08001, which would otherwise read as a connection failure).
_CREDENTIAL_REJECTED = frozenset({390100, 390144, *range(394300, 394307)})


def is_transient(exc: BaseException) -> bool:
    """True for connection/network failures a task retry may get past; never for SQL errors."""
    if isinstance(exc, WarehouseUnavailableError):
        return True
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    if isinstance(exc, sf_errors.Error):
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        if sqlstate.startswith("28") or getattr(exc, "errno", None) in _CREDENTIAL_REJECTED:
            return False
        if isinstance(exc, _TRANSIENT_TYPES):
            return True
        # SQLSTATE class 08 is "connection exception" (08001 not established, 08003 not open...).
        return sqlstate.startswith("08")
    return isinstance(exc, ConnectionError | TimeoutError)


def copy_sql(raw_schema: str, table: str, stage: str) -> str:
    """The COPY for one source: each JSON line into ``record``, with its file and the load time.

    ``%(loaded_at)s`` is bound by the connector (pyformat); names are validated identifiers.
    """
    raw_schema, table, stage = (check_identifier(n) for n in (raw_schema, table, stage))
    return (
        f"COPY INTO {raw_schema}.{table} (record, _file, _loaded_at) "
        "FROM (SELECT $1, METADATA$FILENAME, %(loaded_at)s::TIMESTAMP_NTZ "
        f"FROM @{raw_schema}.{stage}/) "
        "FILE_FORMAT = (TYPE = 'JSON') ON_ERROR = 'CONTINUE'"
    )


def insert_named_sql(table: str, columns: Sequence[str]) -> str:
    """An INSERT with pyformat placeholders (``%(column)s``), the connector's default paramstyle."""
    return (
        f"insert into {table} ({', '.join(columns)}) "
        f"values ({', '.join(f'%({c})s' for c in columns)})"
    )


# Snowflake's "Object ... does not exist or not authorized" (SQL compilation error).
_OBJECT_DOES_NOT_EXIST = 2003


class CopyResultError(ValueError):
    """A COPY INTO result row this code does not understand (never silently dropped)."""


def parse_copy_result(rows: Sequence[Mapping[str, Any]]) -> list[FileLoadResult]:
    """Snowflake's per-file COPY INTO rows (from a ``DictCursor``) as ``FileLoadResult``s.

    Keys may be upper- or lower-case. The single-row "Copy executed with 0 files processed." reply
    yields no results, and so do ``LOAD_SKIPPED`` rows (files loaded before; fakesnow reports them).
    """
    results: list[FileLoadResult] = []
    for raw in rows:
        row = {str(k).lower(): v for k, v in raw.items()}
        status = str(row.get("status") or "").strip()
        if row.get("file") is None:
            if status.lower().startswith(_NO_FILES_PREFIX):
                continue
            raise CopyResultError(f"COPY INTO returned a row without a file: {_describe_row(row)}")
        if status.upper() == _SKIPPED:
            continue
        try:
            load_status = LoadStatus(status.upper())
        except ValueError:
            raise CopyResultError(
                f"COPY INTO returned status {status!r} for file {row['file']!r}; expected one of "
                f"{', '.join(s.value for s in LoadStatus)} or {_SKIPPED}"
            ) from None
        rows_parsed = _int(row.get("rows_parsed"))
        rows_loaded = _int(row.get("rows_loaded"))
        errors_seen = row.get("errors_seen")
        first_error, first_error_line = row.get("first_error"), row.get("first_error_line")
        results.append(
            FileLoadResult(
                file=str(row["file"]),
                status=load_status,
                rows_parsed=rows_parsed,
                rows_loaded=rows_loaded,
                errors_seen=rows_parsed - rows_loaded if errors_seen is None else _int(errors_seen),
                first_error=None if first_error is None else str(first_error),
                first_error_line=None if first_error_line is None else _int(first_error_line),
            )
        )
    return results


def _int(value: Any) -> int:
    return 0 if value is None else int(value)


def _describe_row(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in row.items())


def _plain(value: Any) -> Any:
    """Snowflake returns NUMBER with a scale as Decimal; DuckDB's view gives floats."""
    return float(value) if isinstance(value, Decimal) else value


class SnowflakeBlockError(ValueError):
    """The Snowflake connector block could not be loaded; the message says which and how to fix."""


def load_connector_block(block_name: str) -> SnowflakeConnector:
    """The saved ``SnowflakeConnector`` block: the warehouse, dbt's profile and the parse-only
    profile all read their connection from it."""
    from prefect_snowflake import SnowflakeConnector

    try:
        # _sync: a plain (not awaitable) load even when called from inside an async flow
        return SnowflakeConnector.load(block_name, _sync=True)
    except Exception as exc:
        raise SnowflakeBlockError(
            f"the Snowflake connector block {block_name!r} (POSTLOAD_SNOWFLAKE_BLOCK) could not "
            f"be loaded: {type(exc).__name__}: {exc}. Expected a saved snowflake-connector block "
            "of that name: set SNOWFLAKE_* and run `postload blocks register`"
        ) from exc


class SnowflakeWarehouse:
    kind = "snowflake"

    def __init__(
        self,
        connector_factory: ConnectorFactory,
        pipeline: PipelineConfig,
        *,
        location: str | None = None,
    ) -> None:
        """``connector_factory`` returns a fresh, unconnected ``SnowflakeConnector`` per call."""
        self._connector_factory = connector_factory
        self.pipeline = pipeline
        self.location = location or _location(connector_factory())

    @classmethod
    def from_block(cls, block_name: str, pipeline: PipelineConfig) -> SnowflakeWarehouse:
        """Use the saved ``SnowflakeConnector`` block; each operation gets its own copy of it."""
        template = load_connector_block(block_name)

        def fresh() -> SnowflakeConnector:
            # model_copy shares private attributes; start each copy unconnected with no cursors.
            connector = template.model_copy()
            connector._connection = None
            connector._unique_cursors = None
            return connector

        return cls(fresh, pipeline, location=_location(template))

    # -- connections -------------------------------------------------------------------------

    @contextmanager
    def _session(self, operation: str) -> Iterator[SnowflakeConnector]:
        """A fresh connector for one operation, closed afterwards; transient failures translated."""
        connector = self._connector_factory()
        try:
            with connector:
                yield connector
        except Exception as exc:
            secrets = _secrets(connector)
            scrub(exc, secrets)
            if isinstance(exc, WarehouseUnavailableError) or not is_transient(exc):
                raise
            raise_unavailable(exc, f"{operation} on {self.location}", secrets)

    @contextmanager
    def _transaction(self, connector: SnowflakeConnector) -> Iterator[None]:
        connector.fetch_all("begin transaction")
        try:
            yield
        except BaseException:
            # the original error matters more than a failed rollback; the session ends anyway
            with suppress(Exception):
                connector.fetch_all("rollback")
            raise
        connector.fetch_all("commit")

    # -- the Warehouse protocol --------------------------------------------------------------

    def ensure_schema(self) -> None:
        raw = self.pipeline.raw_schema
        statements = [f"create schema if not exists {raw}"]
        for source in self.pipeline.sources:
            if source.loader.type != "copy":
                continue  # a Fivetran connector owns its raw table and needs no stage
            statements.append(f"create table if not exists {raw}.{source.raw_table} {RAW_COLUMNS}")
            statements.append(
                f"create stage if not exists {raw}.{source.stage} file_format = (type = 'JSON')"
            )
        statements.extend(ops_ddl(self.pipeline.ops_schema, timestamp_type="timestamp_ntz"))
        with self._session("ensure_schema") as connector:
            # fetch_all runs each (distinct) statement synchronously; dict.fromkeys drops repeats,
            # which the connector's cursor cache would not re-run anyway.
            for statement in dict.fromkeys(statements):
                connector.fetch_all(statement)

    def stage_location(self, source: SourceConfig) -> str:
        return f"@{self.pipeline.raw_schema}.{source.copy_target()[1]}"

    def load(self, source: SourceConfig, flow_run_id: str | None) -> list[FileLoadResult]:
        raw = self.pipeline.raw_schema
        raw_table, stage = source.copy_target()
        table = f"{raw}.{raw_table}"
        loaded_at = utcnow()
        with self._session(f"load {source.name}") as connector, self._transaction(connector):
            rows = connector.fetch_all(
                copy_sql(raw, raw_table, stage),
                {"loaded_at": loaded_at},
                cursor_type=DictCursor,
            )
            results = parse_copy_result(rows)
            if results:
                connector.execute_many(
                    insert_named_sql(f"{self.pipeline.ops_schema}.load_log", LOAD_LOG_COLUMNS),
                    [
                        {
                            "source": source.name,
                            "table_name": table,
                            "file": r.file,
                            "file_md5": None,  # COPY does not report it; load metadata dedupes
                            "status": r.status.value,
                            "rows_parsed": r.rows_parsed,
                            "rows_loaded": r.rows_loaded,
                            "errors_seen": r.errors_seen,
                            "first_error": r.first_error,
                            "first_error_line": r.first_error_line,
                            "loaded_at": loaded_at,
                            "flow_run_id": flow_run_id,
                        }
                        for r in results
                    ],
                )
        return results

    def record_transform(self, record: TransformRecord) -> None:
        ops = self.pipeline.ops_schema
        run, nodes, tables = transform_rows(record)
        with self._session("record_transform") as connector, self._transaction(connector):
            connector.execute_many(
                insert_named_sql(f"{ops}.transform_runs", TRANSFORM_RUN_COLUMNS),
                [dict(zip(TRANSFORM_RUN_COLUMNS, run, strict=True))],
            )
            if nodes:
                connector.execute_many(
                    insert_named_sql(f"{ops}.dbt_run_results", RUN_RESULT_COLUMNS),
                    [dict(zip(RUN_RESULT_COLUMNS, node, strict=True)) for node in nodes],
                )
            if tables:
                connector.execute_many(
                    insert_named_sql(f"{ops}.transform_tables", TRANSFORM_TABLE_COLUMNS),
                    [dict(zip(TRANSFORM_TABLE_COLUMNS, row, strict=True)) for row in tables],
                )

    def pipeline_status(self) -> list[dict[str, Any]]:
        with self._session("pipeline_status") as connector:
            rows = connector.fetch_all(
                f"select * from {self.pipeline.ops_schema}.pipeline_status order by source",
                cursor_type=DictCursor,
            )
        return [{str(k).lower(): _plain(v) for k, v in row.items()} for row in rows]

    def relations(self) -> set[tuple[str, str]]:
        """(schema, name) of every table and view in the connector's database, lower-cased."""
        with self._session("relations") as connector:
            rows = connector.fetch_all(
                "select lower(table_schema), lower(table_name) from information_schema.tables"
            )
        return {(schema, name) for schema, name in rows}

    def watermarks(
        self, tables: list[SourceTable], *, selection: str | None = None
    ) -> dict[tuple[str, str], Watermark]:
        if not tables:
            return {}
        params = {"selection": selection} if selection else None
        with self._session("watermarks") as connector:
            return watermarks_skipping_missing(
                tables,
                fetch=lambda ts: connector.fetch_all(self._watermarks_sql(ts, selection), params),
                catalog=lambda: {
                    (schema, name)
                    for schema, name in connector.fetch_all(
                        "select lower(table_schema), lower(table_name) from information_schema.tables"
                    )
                },
                is_missing=lambda exc: (
                    isinstance(exc, sf_errors.ProgrammingError)
                    and exc.errno == _OBJECT_DOES_NOT_EXIST
                ),
            )

    def _watermarks_sql(self, tables: list[SourceTable], selection: str | None) -> str:
        return watermarks_sql(
            self.pipeline.ops_schema,
            tables,
            epoch_us=lambda expr: f"date_part(epoch_microsecond, {expr})",
            selection_param="%(selection)s" if selection else None,
        )

    def transform_history(self, limit: int = 30) -> list[dict[str, Any]]:
        with self._session("transform_history") as connector:
            rows = connector.fetch_all(
                transform_history_sql(self.pipeline.ops_schema, limit), cursor_type=DictCursor
            )
        return [{k.lower(): _plain(v) for k, v in row.items()} for row in rows]

    def last_build_at(self, selection: str) -> datetime | None:
        with self._session("last_build_at") as connector:
            rows = connector.fetch_all(
                last_build_sql(self.pipeline.ops_schema, "%(selection)s"), {"selection": selection}
            )
        return _plain(rows[0][0]) if rows else None

    def latest_load_at(self, source: SourceConfig) -> datetime | None:
        with self._session(f"latest_load_at {source.name}") as connector:
            rows = connector.fetch_all(
                f"select max(loaded_at) as latest from {self.pipeline.ops_schema}.load_log "
                "where source = %(source)s and rows_loaded > 0 and status <> 'LOAD_FAILED'",
                {"source": source.name},
                cursor_type=DictCursor,
            )
        if not rows:
            return None
        (value,) = rows[0].values()
        return value


# What the checked-in profiles.yml's snowflake target reads. Secrets carry dbt's DBT_ENV_SECRET_
# prefix: dbt scrubs those values from its logs and events and refuses them outside profiles.yml.
PROFILE_ACCOUNT_ENV = "POSTLOAD_SNOWFLAKE_ACCOUNT"
PROFILE_USER_ENV = "POSTLOAD_SNOWFLAKE_USER"
PROFILE_PASSWORD_ENV = "DBT_ENV_SECRET_POSTLOAD_SNOWFLAKE_PASSWORD"
PROFILE_PRIVATE_KEY_ENV = "DBT_ENV_SECRET_POSTLOAD_SNOWFLAKE_PRIVATE_KEY"
PROFILE_PRIVATE_KEY_PATH_ENV = "POSTLOAD_SNOWFLAKE_PRIVATE_KEY_PATH"
PROFILE_PRIVATE_KEY_PASSPHRASE_ENV = "DBT_ENV_SECRET_POSTLOAD_SNOWFLAKE_PRIVATE_KEY_PASSPHRASE"
PROFILE_AUTHENTICATOR_ENV = "POSTLOAD_SNOWFLAKE_AUTHENTICATOR"
PROFILE_TOKEN_ENV = "DBT_ENV_SECRET_POSTLOAD_SNOWFLAKE_TOKEN"
PROFILE_ROLE_ENV = "POSTLOAD_SNOWFLAKE_ROLE"
PROFILE_WAREHOUSE_ENV = "POSTLOAD_SNOWFLAKE_WAREHOUSE"
PROFILE_DATABASE_ENV = "POSTLOAD_SNOWFLAKE_DATABASE"
PROFILE_SCHEMA_ENV = "POSTLOAD_SNOWFLAKE_SCHEMA"
PROFILE_ENV_NAMES = (
    PROFILE_ACCOUNT_ENV,
    PROFILE_USER_ENV,
    PROFILE_PASSWORD_ENV,
    PROFILE_PRIVATE_KEY_ENV,
    PROFILE_PRIVATE_KEY_PATH_ENV,
    PROFILE_PRIVATE_KEY_PASSPHRASE_ENV,
    PROFILE_AUTHENTICATOR_ENV,
    PROFILE_TOKEN_ENV,
    PROFILE_ROLE_ENV,
    PROFILE_WAREHOUSE_ENV,
    PROFILE_DATABASE_ENV,
    PROFILE_SCHEMA_ENV,
)
# The block's authenticators dbt-snowflake takes as they are (its own names for them); the
# default "snowflake" (password) and "snowflake_jwt" (key pair) need none: dbt picks them from
# the password or key it is given.
_DBT_AUTHENTICATORS = {"externalbrowser", "oauth", "username_password_mfa"}


class UnsupportedProfileCredentialsError(ValueError):
    """The block authenticates in a way the dbt profile cannot be given."""


def dbt_profile_env(connector: SnowflakeConnector) -> dict[str, str]:
    """The variables the checked-in profile's snowflake target reads, from the connector block.

    Every name in ``PROFILE_ENV_NAMES`` is in the result; those the block has no value for are
    empty (the profile reads an empty one as unset), so a value left in the environment by
    someone else never mixes with the block's.
    """
    credentials = connector.credentials
    values = dict.fromkeys(PROFILE_ENV_NAMES, "")

    def secret(value: Any) -> str:
        plain = value.get_secret_value() if value is not None else ""
        return plain.decode("utf-8") if isinstance(plain, bytes) else plain

    authenticator = str(credentials.authenticator or "snowflake")
    if authenticator == "okta_endpoint":
        # dbt-snowflake (and the connector) take the Okta URL itself as the authenticator
        authenticator = str(credentials.endpoint or "")
    elif authenticator in ("snowflake", "snowflake_jwt"):
        authenticator = ""
    elif authenticator not in _DBT_AUTHENTICATORS:
        raise UnsupportedProfileCredentialsError(
            f"the Snowflake block authenticates with {authenticator!r}, which postload cannot "
            "pass to the dbt profile; expected a password, a private key (or its path), "
            "oauth, externalbrowser, username_password_mfa or okta_endpoint"
        )
    values.update(
        {
            PROFILE_ACCOUNT_ENV: credentials.account,
            PROFILE_USER_ENV: credentials.user or "",
            PROFILE_PASSWORD_ENV: secret(credentials.password),
            PROFILE_PRIVATE_KEY_ENV: secret(credentials.private_key),
            PROFILE_PRIVATE_KEY_PATH_ENV: str(credentials.private_key_path or ""),
            PROFILE_PRIVATE_KEY_PASSPHRASE_ENV: secret(credentials.private_key_passphrase),
            PROFILE_AUTHENTICATOR_ENV: authenticator,
            PROFILE_TOKEN_ENV: secret(credentials.token),
            PROFILE_ROLE_ENV: credentials.role or "",
            PROFILE_WAREHOUSE_ENV: connector.warehouse,
            PROFILE_DATABASE_ENV: connector.database,
            PROFILE_SCHEMA_ENV: connector.schema_,
        }
    )
    return values


def profile_secrets(values: Mapping[str, str]) -> list[str]:
    """The credential values among ``dbt_profile_env``'s (to keep out of messages)."""
    return [v for k, v in values.items() if k.startswith("DBT_ENV_SECRET_") and v]


def _location(connector: SnowflakeConnector) -> str:
    """Where the data lives, for messages and logs: account and database, never a credential."""
    return f"snowflake://{connector.credentials.account}/{connector.database}"


def _secrets(connector: SnowflakeConnector) -> list[str]:
    """The credential values that must never appear in a message."""
    found: list[str] = []
    credentials = getattr(connector, "credentials", None)
    for name in type(credentials).model_fields if credentials is not None else ():
        value = getattr(credentials, name, None)
        if isinstance(value, SecretStr | SecretBytes):
            secret = value.get_secret_value()
            if isinstance(secret, bytes):
                secret = secret.decode("utf-8", errors="ignore")
            if secret:
                found.append(secret)
    return found


def redact(text: str, secrets: Sequence[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def scrub(exc: BaseException, secrets: Sequence[str]) -> None:
    """Redact secrets in place from an exception and everything chained to it."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        node.args = tuple(redact(a, secrets) if isinstance(a, str) else a for a in node.args)
        for attr in ("msg", "raw_msg", "query"):
            value = getattr(node, attr, None)
            if isinstance(value, str):
                with suppress(AttributeError, TypeError):  # a read-only attribute: leave it
                    setattr(node, attr, redact(value, secrets))
        stack += [node.__cause__, node.__context__]


def raise_unavailable(exc: BaseException, what: str, secrets: Sequence[str]) -> NoReturn:
    """Raise ``WarehouseUnavailableError`` chained to a transient driver error, without any secret.

    Drivers do not normally echo credentials, but the chain is scrubbed in place anyway so that no
    message or traceback of this failure can print one.
    """
    scrub(exc, secrets)
    raise WarehouseUnavailableError(
        f"Snowflake is unavailable ({what}): {type(exc).__name__}: {redact(str(exc), secrets)}"
    ) from exc
