"""The embedded warehouse: one DuckDB file, a stage that is a local folder of JSON-lines files.

It keeps Snowflake's ``COPY INTO … FILE_FORMAT=(TYPE='JSON') ON_ERROR='CONTINUE'`` contract:
per-file results, malformed lines skipped and counted with the first error, good lines loaded,
and a file that loaded before (same name, same content) is not loaded again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import duckdb

from postload.config import PipelineConfig, SourceConfig
from postload.warehouse._sql import (
    LOAD_LOG_COLUMNS,
    RUN_RESULT_COLUMNS,
    TRANSFORM_RUN_COLUMNS,
    TRANSFORM_TABLE_COLUMNS,
    insert_sql,
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
    StageNotFoundError,
    TransformRecord,
    WarehouseUnavailableError,
    Watermark,
    utcnow,
)

if TYPE_CHECKING:
    from postload.sources import SourceTable

# Split a file into lines inside DuckDB (no per-line Python): line numbers are needed for
# Snowflake-style first_error_line, and read_json's ignore_errors would drop bad lines silently.
_PARTS = "(select string_split(content, chr(10)) as parts from read_text($path))"
# A line trimmed of CR, space and tab. trim() reads every character of a line, so the lines that
# start with '{' and end with '}' (nearly all lines of a good file) skip it.
_LINE = (
    "case when starts_with(raw, '{') and ends_with(raw, '}') then raw "
    "else trim(raw, chr(13) || ' ' || chr(9)) end"
)
# The rows to insert, in one statement that parses each line once: a line loads when DuckDB's
# JSON cast accepts it and it is an object. DuckDB keeps this filter, which reads the JSON value
# back as text, above the cast; a `record is not null` filter would be pushed below it as a second
# try_cast, parsing every line twice (bench/load.py times both). No order by: the lines come from
# unnesting one row, so they arrive in file order.
_RECORDS = f"""
select record, $file, $loaded_at
from (select try_cast({_LINE} as json) as record from (select unnest(parts) as raw from {_PARTS}))
where starts_with(record, '{{')
"""


def _stats_sql(parts: str) -> str:
    """Only for a file where not every line loaded: its non-blank lines (blank ones are skipped,
    as Snowflake does) and, among lines 1 to $upto (all if null), the first that is not a JSON
    object. Counting needs no parsing, so only those lines are parsed (in a case: DuckDB
    evaluates an aggregate's filter clause on every row)."""
    return f"""
select count(*), min(
    case when ($upto is null or line_no <= $upto)
        and not (starts_with(line, '{{') and try_cast(line as json) is not null)
    then row(line_no, line) end
)
from (
    select line_no, {_LINE} as line
    from (select generate_subscripts(parts, 1) as line_no, unnest(parts) as raw from {parts})
)
where line <> ''
"""


# A file is read again for this only when its first bad line is not in its first 64 KiB, or it
# may have blank lines, which only a full read counts (file_statistics).
_STATS = _stats_sql(_PARTS)
# The same over the first whole lines of a file, handed over as text.
_HEAD_STATS = _stats_sql("(select string_split($text, chr(10)) as parts)")
_HEAD_BYTES = 64 << 10
# A newline followed by one of these may start a blank line (one trim() leaves empty).
_MAY_START_A_BLANK_LINE = re.compile(rb"\n[\n\r \t]")
_BLANK_LINE_STARTS = (b"\n", b"\r", b" ", b"\t")
_FIRST_LINES_CHECKED = 10_000
_CHECKPOINT_ROWS = 122_880 // 2  # half of a DuckDB row group: see _load_file


class DuckDBWarehouse:
    kind = "duckdb"

    def __init__(self, path: Path, stage_root: Path, pipeline: PipelineConfig) -> None:
        self.path = path
        self.stage_root = stage_root
        self.pipeline = pipeline
        self.location = str(path)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection: DuckDB allows one writing process per file, and dbt needs it next."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = duckdb.connect(str(self.path))
        except duckdb.IOException as exc:
            # "Could not set lock on file": another process is writing; the caller's retry waits.
            raise WarehouseUnavailableError(
                f"DuckDB file {self.path} is unavailable: {exc}"
            ) from exc
        try:
            yield con
        finally:
            con.close()

    def ensure_schema(self) -> None:
        raw = self.pipeline.raw_schema
        with self.connect() as con:
            con.execute(f"create schema if not exists {raw}")
            for source in self.pipeline.sources:
                if source.raw_table is None:
                    continue  # a dbt source's tables belong to whoever loads them (Fivetran)
                con.execute(
                    f"create table if not exists {raw}.{source.raw_table} "
                    "(record json, _file varchar, _loaded_at timestamp)"
                )
            for statement in ops_ddl(self.pipeline.ops_schema):
                con.execute(statement)

    def stage_dir(self, source: SourceConfig) -> Path:
        return self.stage_root / source.copy_target()[1]

    def stage_location(self, source: SourceConfig) -> str:
        return str(self.stage_dir(source))

    def staged_files(self, source: SourceConfig) -> list[Path]:
        stage = self.stage_dir(source)
        if not stage.is_dir():
            raise StageNotFoundError(
                f"stage folder for source {source.name!r} does not exist: {stage} "
                "(expected a folder of newline-delimited JSON files; set POSTLOAD_STAGE_ROOT "
                "or the source's 'stage' in the pipeline config)"
            )
        return sorted(
            p
            for p in stage.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(stage).parts)
        )

    def load(self, source: SourceConfig, flow_run_id: str | None) -> list[FileLoadResult]:
        files = self.staged_files(source)
        if not files:
            return []
        stage = self.stage_dir(source)
        table = f"{self.pipeline.raw_schema}.{source.copy_target()[0]}"
        log = f"{self.pipeline.ops_schema}.load_log"
        results: list[FileLoadResult] = []
        with self.connect() as con, ThreadPoolExecutor(1, "postload-read") as reader:
            # As in Snowflake, a file that loaded nothing (LOAD_FAILED) is not marked loaded:
            # the next COPY tries it again.
            already = set(
                con.execute(
                    f"select file, file_md5 from {log} where table_name = ? "
                    "and status in ('LOADED', 'PARTIALLY_LOADED')",
                    [table],
                ).fetchall()
            )
            loaded_names = {file for file, _ in already}
            # Reading a file for its md5 and line count is ~15% of a load's CPU: one thread does it
            # while DuckDB (which releases the GIL, as hashlib does) loads. A name never loaded
            # cannot be a reload, so its load starts without waiting for the md5.
            fingerprints = [reader.submit(_fingerprint, path) for path in files]
            try:
                # Each statement reads one file through one row, so more DuckDB threads only add
                # a parallel insert's merge, which copies every row once more (~12 ms per 100k
                # lines); the reader thread has the other core.
                with _setting(con, "threads", 1):
                    for path, fingerprint in zip(files, fingerprints, strict=True):
                        name = path.relative_to(stage).as_posix()
                        if name in loaded_names and (name, fingerprint.result().md5) in already:
                            continue
                        result = self._load_file(
                            con, source, table, path, name, fingerprint, flow_run_id
                        )
                        results.append(result)
            finally:
                for fingerprint in fingerprints:
                    fingerprint.cancel()
        return results

    def _load_file(
        self,
        con: duckdb.DuckDBPyConnection,
        source: SourceConfig,
        table: str,
        path: Path,
        name: str,
        fingerprint: Future[_Fingerprint],
        flow_run_id: str | None,
    ) -> FileLoadResult:
        loaded_at = utcnow()
        con.execute("begin transaction")
        try:
            (loaded,) = _single_row(
                con.execute(
                    f"insert into {table} (record, _file, _loaded_at) {_RECORDS}",
                    {"path": _glob_literal(path), "file": name, "loaded_at": loaded_at},
                )
            )
            md5, lines, blank_free = fingerprint.result()
            parsed, bad = file_statistics(con, path, loaded, lines, blank_free)
            first_bad, first_error = None, None
            if bad is not None:
                first_bad, bad_line = bad
                first_error = describe_json_error(bad_line)
            errors = parsed - loaded
            status = (
                LoadStatus.LOADED
                if errors == 0
                else LoadStatus.LOAD_FAILED
                if loaded == 0
                else LoadStatus.PARTIALLY_LOADED
            )
            result = FileLoadResult(
                file=name,
                status=status,
                rows_parsed=parsed,
                rows_loaded=loaded,
                errors_seen=errors,
                first_error=first_error,
                first_error_line=first_bad,
            )
            con.execute(
                insert_sql(f"{self.pipeline.ops_schema}.load_log", LOAD_LOG_COLUMNS),
                [
                    source.name,
                    table,
                    name,
                    md5,
                    status.value,
                    parsed,
                    loaded,
                    errors,
                    first_error,
                    first_bad,
                    loaded_at,
                    flow_run_id,
                ],
            )
            if loaded >= _CHECKPOINT_ROWS:
                # DuckDB writes an append smaller than a row group (122,880 rows) to the WAL in
                # full, then compresses it at a checkpoint: twice the writing, and the WAL is
                # fsynced. Checkpointing now instead (the commit skips the WAL) costs a rewrite of
                # the table's last, part-filled row group; from half a row group on, that is the
                # cheaper (~10% less time to load 12 MiB files). Smaller files keep the WAL:
                # checkpointing after each would rewrite that row group each time.
                with _setting(con, "checkpoint_threshold", "0b"):
                    con.execute("commit")
            else:
                con.execute("commit")
        except Exception:
            con.execute("rollback")
            raise
        return result

    def record_transform(self, record: TransformRecord) -> None:
        ops = self.pipeline.ops_schema
        run, nodes, tables = transform_rows(record)
        with self.connect() as con:
            con.execute("begin transaction")
            con.execute(insert_sql(f"{ops}.transform_runs", TRANSFORM_RUN_COLUMNS), list(run))
            if nodes:
                con.executemany(insert_sql(f"{ops}.dbt_run_results", RUN_RESULT_COLUMNS), nodes)
            if tables:
                con.executemany(
                    insert_sql(f"{ops}.transform_tables", TRANSFORM_TABLE_COLUMNS), tables
                )
            con.execute("commit")

    def pipeline_status(self) -> list[dict[str, Any]]:
        with self.connect() as con:
            cur = con.execute(f"select * from {self.pipeline.ops_schema}.pipeline_status")
            columns = [d[0] for d in cur.description]
            return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]

    def relations(self) -> set[tuple[str, str]]:
        """(schema, name) of every table and view, lower-cased."""
        with self.connect() as con:
            rows = con.execute(
                "select lower(table_schema), lower(table_name) from information_schema.tables"
            ).fetchall()
        return {(schema, name) for schema, name in rows}

    def watermarks(
        self, tables: list[SourceTable], *, selection: str | None = None
    ) -> dict[tuple[str, str], Watermark]:
        if not tables:
            return {}
        params = [selection, selection] if selection else []
        with self.connect() as con:
            return watermarks_skipping_missing(
                tables,
                fetch=lambda ts: con.execute(
                    self._watermarks_sql(ts, selection), params
                ).fetchall(),
                catalog=lambda: {
                    (schema, name)
                    for schema, name in con.execute(
                        "select lower(table_schema), lower(table_name) "
                        "from information_schema.tables"
                    ).fetchall()
                },
                is_missing=lambda exc: isinstance(exc, duckdb.CatalogException),
            )

    def _watermarks_sql(self, tables: list[SourceTable], selection: str | None) -> str:
        return watermarks_sql(
            self.pipeline.ops_schema,
            tables,
            epoch_us=lambda expr: f"epoch_us({expr})",
            selection_param="?" if selection else None,
        )

    def transform_history(self, limit: int = 30) -> list[dict[str, Any]]:
        with self.connect() as con:
            cur = con.execute(transform_history_sql(self.pipeline.ops_schema, limit))
            columns = [d[0] for d in cur.description]
            return [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]

    def last_build_at(self, selection: str) -> datetime | None:
        with self.connect() as con:
            (value,) = _single_row(
                con.execute(last_build_sql(self.pipeline.ops_schema, "?"), [selection])
            )
        return value

    def latest_load_at(self, source: SourceConfig) -> datetime | None:
        with self.connect() as con:
            (value,) = _single_row(
                con.execute(
                    f"select max(loaded_at) from {self.pipeline.ops_schema}.load_log "
                    "where source = ? and rows_loaded > 0 and status <> 'LOAD_FAILED'",
                    [source.name],
                )
            )
        return value


class _Fingerprint(NamedTuple):
    """What one read of a staged file tells before DuckDB loads it."""

    md5: str
    # As string_split cuts the file, without the empty piece after a final newline: when every
    # one of them loaded, the file had no blank or bad line.
    lines: int
    # No line can be blank (no line starts with a newline, CR, space or tab): then the lines
    # that did not load are all bad ones, and there is no need to count the blank ones.
    blank_free: bool


def _fingerprint(path: Path) -> _Fingerprint:
    digest = hashlib.md5(usedforsecurity=False)
    newlines, last, blank_free = 0, b"\n", True  # the file's start is a line start
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            newlines += chunk.count(b"\n")
            if blank_free and (
                (last == b"\n" and chunk[:1] in _BLANK_LINE_STARTS)
                or _MAY_START_A_BLANK_LINE.search(chunk)
            ):
                blank_free = False
            last = chunk[-1:]
    return _Fingerprint(digest.hexdigest(), newlines + (last != b"\n"), blank_free)


def file_statistics(
    con: duckdb.DuckDBPyConnection, path: Path, loaded: int, lines: int, blank_free: bool
) -> tuple[int, tuple[int, str] | None]:
    """The file's non-blank lines and its first bad one (line number, text), given what loaded.

    Reads the file again only when a blank or bad line is there, and then as little as it can.
    """
    if loaded == lines:  # every line loaded: none was blank or bad
        return loaded, None
    if blank_free and (bad := _first_bad_line_in_head(con, path)) is not None:
        # Every line is non-blank, so the count is known, and a bad line is there: usually
        # early on, found without reading the whole file again.
        return lines, bad
    params = {"path": _glob_literal(path), "upto": _FIRST_LINES_CHECKED}
    parsed, bad = _single_row(con.execute(_STATS, params))
    if bad is None and parsed != loaded:
        parsed, bad = _single_row(con.execute(_STATS, {**params, "upto": None}))
    return parsed, bad


def _first_bad_line_in_head(con: duckdb.DuckDBPyConnection, path: Path) -> tuple[int, str] | None:
    """The first line that is not a JSON object among the file's whole lines in its first 64 KiB.

    A malformed file usually shows a bad line early: parsing its first few hundred lines again
    costs a fraction of reading the whole file again (docs/performance.md). None when
    there is none there.
    """
    with path.open("rb") as fh:
        head = fh.read(_HEAD_BYTES + 1)
    if len(head) > _HEAD_BYTES:  # whole lines only: cut after the head's last newline
        head = head[: head.rfind(b"\n", 0, _HEAD_BYTES) + 1]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:  # read_text's own error, if any, comes from the full read
        return None
    if not text:
        return None
    _, bad = _single_row(con.execute(_HEAD_STATS, {"text": text, "upto": None}))
    return bad


def _single_row(cur: duckdb.DuckDBPyConnection) -> tuple[Any, ...]:
    """The row of a statement that returns exactly one: an aggregate without group by, an
    insert's count, a setting."""
    row = cur.fetchone()
    assert row is not None  # DuckDB's fetchone() is typed for any statement
    return row


@contextmanager
def _setting(con: duckdb.DuckDBPyConnection, name: str, value: object) -> Iterator[None]:
    """A DuckDB setting for a while: settings are the database's, not the connection's."""
    (before,) = _single_row(con.execute(f"select current_setting('{name}')"))
    con.execute(f"set {name} = '{value}'")
    try:
        yield
    finally:
        con.execute(f"set {name} = '{before}'")


def _glob_literal(path: Path) -> str:
    """The path as a pattern for read_text, which globs: ``a[1].jsonl`` must not read ``a1.jsonl``."""
    return re.sub(r"([\[*?])", r"[\1]", str(path))


def describe_json_error(line: str) -> str:
    """A parser message for a rejected line, in the spirit of Snowflake's FIRST_ERROR.

    The message says what is wrong and where, never the line's content (it may hold personal data).
    """
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"Error parsing JSON: {exc.msg} at column {exc.colno}"
    except ValueError as exc:  # e.g. unpaired surrogates
        return f"Error parsing JSON: {exc.__class__.__name__}"
    if isinstance(value, dict):
        return "Error parsing JSON: rejected by the warehouse's JSON parser"
    kind = type(value).__name__
    return f"Expected a JSON object per line, got {'an' if kind[0] in 'aeiou' else 'a'} {kind}"
