"""A Fivetran sync, simulated in a DuckDB file: what a connector leaves in the destination.

For tests and demos that need a warehouse shaped like a real Fivetran destination, not like
postload's own COPY loads. A sync of a connection writes, as Fivetran does:

* into the connection's **own schema** (one per connection: ``salesforce``, ``stripe``, ...),
  created when missing;
* one table per synced source table, **created on first sync** with typed columns (inferred from
  the rows, or given), its primary key ``id``; a column first seen in a later sync is added
  (Fivetran's schema-drift handling);
* rows **upserted by primary key** ``id`` (a row synced again replaces the earlier version);
* Fivetran's system columns on every row it writes: ``_fivetran_synced`` (Fivetran's INSTANT, so
  ``TIMESTAMP WITH TIME ZONE``: timezone-aware, the sync's time) and ``_fivetran_deleted``
  (``boolean``, false; true for rows the source deleted, which are kept: soft delete).

And nothing else: no ``ops.load_log`` row, nothing in postload's raw schema. What changed is
only visible as each table's ``max(_fivetran_synced)``, which is how postload has to find it.

DuckDB allows one writing process per file: a sync opens the file, writes in one transaction and
closes it, waiting (up to ``lock_timeout``) while another process holds the file.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from datetime import time as time_of_day
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from postload.config import check_identifier

__all__ = [
    "DELETED_COLUMN",
    "PRIMARY_KEY",
    "SYNCED_COLUMN",
    "SimulatedSync",
    "infer_column_type",
    "simulate_sync",
]

PRIMARY_KEY = "id"
SYNCED_COLUMN = "_fivetran_synced"
DELETED_COLUMN = "_fivetran_deleted"
_SYSTEM_COLUMNS = {SYNCED_COLUMN: "TIMESTAMP WITH TIME ZONE", DELETED_COLUMN: "BOOLEAN"}

# A DuckDB type as a caller may give it: a name of words, optionally with (precision[, scale]).
_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_ ]{0,60}(\(\s*\d{1,3}\s*(,\s*\d{1,3}\s*)?\))?(\[\])?$")
_ROWS_PER_STATEMENT = 500


@dataclass(frozen=True)
class SimulatedSync:
    """What one simulated sync wrote."""

    schema: str
    synced_at: datetime  # aware UTC: every row this sync wrote has it as _fivetran_synced
    upserted: dict[str, int] = field(default_factory=dict)  # table -> rows written
    deleted: dict[str, int] = field(default_factory=dict)  # table -> rows soft-deleted
    created: list[str] = field(default_factory=list)  # tables this sync created

    @property
    def tables(self) -> list[str]:
        """The tables this sync changed (wrote or soft-deleted rows in), sorted."""
        return sorted(
            {t for t, n in self.upserted.items() if n} | {t for t, n in self.deleted.items() if n}
        )


def infer_column_type(values: Iterable[Any]) -> str:
    """The DuckDB type Fivetran would give a column holding ``values`` (None values ignored).

    ``bool`` → BOOLEAN, ``int`` → BIGINT, ``float`` (or ints and floats) → DOUBLE, ``Decimal`` →
    DECIMAL(38, 9), ``str`` → VARCHAR, aware ``datetime`` → TIMESTAMP WITH TIME ZONE, naive
    ``datetime`` → TIMESTAMP, ``date`` → DATE, ``time`` → TIME, ``dict``/``list`` → JSON,
    ``bytes`` → BLOB; a column of nulls only is VARCHAR. Raises TypeError for mixed kinds.
    """
    kinds = {_kind(v) for v in values if v is not None}
    if not kinds:
        return "VARCHAR"
    if kinds == {"BIGINT", "DOUBLE"}:
        return "DOUBLE"
    if len(kinds) > 1:
        raise TypeError(
            f"values of mixed types {sorted(kinds)}: give the column's type in column_types"
        )
    return kinds.pop()


def _kind(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "BOOLEAN"
    if isinstance(value, int):
        return "BIGINT"
    if isinstance(value, float):
        return "DOUBLE"
    if isinstance(value, Decimal):
        return "DECIMAL(38, 9)"
    if isinstance(value, str):
        return "VARCHAR"
    if isinstance(value, datetime):  # before date: a datetime is a date
        return "TIMESTAMP" if value.tzinfo is None else "TIMESTAMP WITH TIME ZONE"
    if isinstance(value, date):
        return "DATE"
    if isinstance(value, time_of_day):
        return "TIME"
    if isinstance(value, dict | list):
        return "JSON"
    if isinstance(value, bytes | bytearray):
        return "BLOB"
    raise TypeError(f"no Fivetran column type for a {type(value).__name__} value")


def simulate_sync(
    duckdb_path: str | os.PathLike[str],
    schema: str,
    tables: Mapping[str, Sequence[Mapping[str, Any]]],
    synced_at: datetime | None = None,
    *,
    column_types: Mapping[str, Mapping[str, str]] | None = None,
    deleted: Mapping[str, Iterable[Any]] | None = None,
    lock_timeout: float = 60.0,
) -> SimulatedSync:
    """Write one Fivetran sync of a connection into the DuckDB file at ``duckdb_path``.

    ``schema``: the connection's destination schema. ``tables``: per table, the rows the sync
    delivers (each a mapping of column to value with a non-null ``id``); a table with no rows is
    still created. ``synced_at``: the sync's time (aware; naive is taken as UTC), now by default.
    ``column_types``: per table, DuckDB types for some columns instead of inferred ones (they
    apply when a column is created). ``deleted``: per table, ids the source deleted: those rows
    get ``_fivetran_deleted = true`` and this sync's ``_fivetran_synced``.

    Everything is written in one transaction on a connection opened for the sync and closed
    after it. Names must be plain identifiers; rows must not carry Fivetran's system columns.
    """
    schema = check_identifier(schema)
    moment = datetime.now(UTC) if synced_at is None else _aware_utc(synced_at)
    column_types = column_types or {}
    deletions = {check_identifier(t): list(ids) for t, ids in (deleted or {}).items()}
    batches = {check_identifier(t): _dedupe(t, rows) for t, rows in tables.items()}
    for table in column_types:
        if table not in batches:
            raise ValueError(f"column_types names table {table!r}, which this sync does not write")

    result = SimulatedSync(schema=schema, synced_at=moment)
    with _connect(Path(duckdb_path), lock_timeout) as con:
        con.execute("begin transaction")
        try:
            con.execute(f"create schema if not exists {_q(schema)}")
            existing = _existing_columns(con, schema)
            for table, rows in batches.items():
                columns = _table_columns(table, rows, column_types.get(table, {}))
                if table in existing:
                    _add_new_columns(con, schema, table, columns, existing[table])
                else:
                    _create_table(con, schema, table, columns)
                    result.created.append(table)
                result.upserted[table] = _upsert(con, schema, table, list(columns), rows, moment)
            for table, ids in deletions.items():
                if table not in existing and table not in batches:
                    raise ValueError(
                        f"cannot soft-delete rows of {schema}.{table}: the table was never synced"
                    )
                result.deleted[table] = _soft_delete(con, schema, table, ids, moment)
            con.execute("commit")
        except BaseException:
            con.execute("rollback")
            raise
    return result


def _aware_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _dedupe(table: str, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rows by id, the last delivered version of each (one upsert per key)."""
    by_id: dict[Any, dict[str, Any]] = {}
    for row in rows:
        if row.get(PRIMARY_KEY) is None:
            raise ValueError(f"table {table!r}: every row needs a non-null {PRIMARY_KEY!r}")
        system = sorted(set(row) & set(_SYSTEM_COLUMNS))
        if system:
            raise ValueError(f"table {table!r}: {system} are Fivetran's to set, not the rows'")
        for column in row:
            check_identifier(column)
        by_id.pop(row[PRIMARY_KEY], None)  # a later version moves to the end
        by_id[row[PRIMARY_KEY]] = dict(row)
    return list(by_id.values())


def _table_columns(
    table: str, rows: list[dict[str, Any]], given: Mapping[str, str]
) -> dict[str, str]:
    """The columns the rows carry, in first-seen order, with their types (``id`` first)."""
    names = list(dict.fromkeys([PRIMARY_KEY, *(c for row in rows for c in row), *given]))
    columns = {}
    for name in names:
        check_identifier(name)
        if name in given:
            if not _TYPE.fullmatch(given[name]):
                raise ValueError(f"{table}.{name}: {given[name]!r} is not a DuckDB type name")
            columns[name] = given[name]
        else:
            try:
                columns[name] = infer_column_type(row.get(name) for row in rows)
            except TypeError as exc:
                raise TypeError(f"{table}.{name}: {exc}") from None
    return columns


def _existing_columns(con: duckdb.DuckDBPyConnection, schema: str) -> dict[str, set[str]]:
    rows = con.execute(
        "select lower(table_name), lower(column_name) from information_schema.columns "
        "where table_catalog = current_database() and lower(table_schema) = lower(?)",
        [schema],
    ).fetchall()
    existing: dict[str, set[str]] = {}
    for table, column in rows:
        existing.setdefault(table, set()).add(column)
    return existing


def _create_table(
    con: duckdb.DuckDBPyConnection, schema: str, table: str, columns: dict[str, str]
) -> None:
    body = [f"{_q(PRIMARY_KEY)} {columns[PRIMARY_KEY]} primary key"]
    body += [f"{_q(name)} {kind}" for name, kind in columns.items() if name != PRIMARY_KEY]
    body += [f"{_q(name)} {kind}" for name, kind in _SYSTEM_COLUMNS.items()]
    con.execute(f"create table {_q(schema, table)} ({', '.join(body)})")


def _add_new_columns(
    con: duckdb.DuckDBPyConnection,
    schema: str,
    table: str,
    columns: dict[str, str],
    existing: set[str],
) -> None:
    for name, kind in columns.items():
        if name.lower() not in existing:
            con.execute(f"alter table {_q(schema, table)} add column {_q(name)} {kind}")


def _upsert(
    con: duckdb.DuckDBPyConnection,
    schema: str,
    table: str,
    columns: list[str],
    rows: list[dict[str, Any]],
    synced_at: datetime,
) -> int:
    if not rows:
        return 0
    names = [*columns, SYNCED_COLUMN, DELETED_COLUMN]
    updates = ", ".join(f"{_q(c)} = excluded.{_q(c)}" for c in names if c != PRIMARY_KEY)
    one_row = f"({', '.join('?' for _ in names)})"
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        params = [
            value
            for row in chunk
            for value in (*(_param(row.get(c)) for c in columns), synced_at, False)
        ]
        con.execute(
            f"insert into {_q(schema, table)} ({', '.join(map(_q, names))}) "
            f"values {', '.join([one_row] * len(chunk))} "
            f"on conflict ({_q(PRIMARY_KEY)}) do update set {updates}",
            params,
        )
    return len(rows)


def _soft_delete(
    con: duckdb.DuckDBPyConnection, schema: str, table: str, ids: list[Any], synced_at: datetime
) -> int:
    if not ids:
        return 0
    (count,) = con.execute(
        f"update {_q(schema, table)} set {_q(DELETED_COLUMN)} = true, {_q(SYNCED_COLUMN)} = ? "
        f"where {_q(PRIMARY_KEY)} in ({', '.join('?' for _ in ids)})",
        [synced_at, *ids],
    ).fetchone() or (0,)
    return int(count)


def _q(*names: str) -> str:
    """Quoted (checked) identifiers, dotted: source tables are often SQL keywords (Shopify's
    ``order``, Salesforce's and Zendesk's ``user``)."""
    return ".".join(f'"{check_identifier(name)}"' for name in names)


def _param(value: Any) -> Any:
    # JSON columns take the document as text; DuckDB would bind a dict as a STRUCT.
    return json.dumps(value) if isinstance(value, dict | list) else value


@contextmanager
def _connect(path: Path, lock_timeout: float) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the file for one sync, closed after it; waits while another process
    holds the file (DuckDB's one-writer rule), up to ``lock_timeout`` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + lock_timeout
    pause = 0.05
    while True:
        try:
            con = duckdb.connect(str(path))
            break
        except duckdb.IOException as exc:
            # "Could not set lock on file": another process (dbt, a flow run) is writing.
            if "lock" not in str(exc).lower() or time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
    try:
        yield con
    finally:
        con.close()
