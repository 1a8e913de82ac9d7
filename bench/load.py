"""Load benchmark: ``DuckDBWarehouse.load()`` against a bare DuckDB insert, side by side.

Generates newline-delimited JSON for the ``events`` source (``write_bulk_file``), then times, in
the same run and alternating the order:

* **loader** — ``DuckDBWarehouse.load()`` into a fresh DuckDB file (``ensure_schema`` first, not
  timed): per-file md5 and line count, one transaction per file, lines numbered for the first
  error, load log; Snowflake's COPY contract.
* **bare** — one ``insert into raw.events … select … from read_json_objects([...files])`` into a
  fresh DuckDB file: the same rows land, without the contract.

Both timings include opening and closing the DuckDB file (the loader does both inside ``load()``).
Reported: median wall seconds and process CPU seconds, MiB/s, rows, ratio loader/bare (goal <= 1.2),
for clean files and for files with 1% malformed lines (the bare insert then needs
``ignore_errors=true``, which turns a bad line into a NULL object, so it also filters
``where json is not null``). When a ratio misses the goal (or with ``--profile``), the loader's
steps are timed one by one on the same files, with alternatives for the biggest ones. postload code
is never modified.

    .venv/bin/python bench/load.py [--quick] [--mb 100] [--files 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb

from postload.config import PipelineConfig, load_pipeline_config
from postload.local.demo_data import write_bulk_file
from postload.warehouse._duckdb import (
    _CHECKPOINT_ROWS,
    _RECORDS,
    DuckDBWarehouse,
    _fingerprint,
    _glob_literal,
    _setting,
    describe_json_error,
    file_statistics,
    utcnow,
)
from postload.warehouse._sql import LOAD_LOG_COLUMNS, insert_sql

ROOT = Path(__file__).resolve().parent.parent
WORK_ROOT = ROOT / "bench" / ".work"
MIB = 1 << 20
GOAL = 1.2
SOURCE = "events"
MALFORMED_EVERY = 100  # 1% of lines

BARE_SQL = """
insert into raw.events (record, _file, _loaded_at)
select json, filename, now()
from read_json_objects(?, format='newline_delimited', filename=true{options})
{where}
"""

BARE_CLEAN_SQL = BARE_SQL.format(options="", where="")
# The loader's insert with a `record is not null` filter as well: DuckDB pushes that one below the
# cast, so every line is parsed twice (what the shipped filter avoids).
_SHIPPED_FILTER = "where starts_with(record, '{')"
assert _SHIPPED_FILTER in _RECORDS
RECORDS_NOT_NULL = _RECORDS.replace(_SHIPPED_FILTER, f"{_SHIPPED_FILTER} and record is not null")


@dataclass
class Timing:
    seconds: list[float]
    cpu: list[float]  # process CPU (all threads): on a shared box it moves less than wall time
    rows: int


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fresh(path: Path) -> Path:
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)
    return path


def generate(stage_root: Path, total_bytes: int, files: int, malformed_every: int) -> list[Path]:
    paths = []
    per_file = max(1, total_bytes // files)
    for i in range(files):
        path = stage_root / SOURCE / f"{SOURCE}_{i:04d}.jsonl"
        write_bulk_file(path, SOURCE, per_file, malformed_every=malformed_every)
        paths.append(path)
    return paths


Measured = tuple[float, float, int]  # wall seconds, CPU seconds, rows


def run_loader(pipeline: PipelineConfig, stage_root: Path, db: Path) -> Measured:
    warehouse = DuckDBWarehouse(fresh(db), stage_root, pipeline)
    warehouse.ensure_schema()  # not timed
    source = pipeline.source(SOURCE)
    started, cpu = time.perf_counter(), time.process_time()
    results = warehouse.load(source, None)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    fresh(db)
    return elapsed, cpu, sum(r.rows_loaded for r in results)


def run_bare(files: list[Path], db: Path, *, malformed: bool) -> Measured:
    with duckdb.connect(str(fresh(db))) as con:  # not timed, like ensure_schema
        con.execute("create schema raw")
        con.execute("create table raw.events (record json, _file varchar, _loaded_at timestamp)")
    sql = BARE_SQL.format(
        options=", ignore_errors=true" if malformed else "",
        where="where json is not null" if malformed else "",
    )
    started, cpu = time.perf_counter(), time.process_time()
    con = duckdb.connect(str(db))
    (rows,) = con.execute(sql, [[str(f) for f in files]]).fetchone()
    con.close()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    fresh(db)
    return elapsed, cpu, rows


def side_by_side(runs: dict[str, Callable[[], Measured]], repeats: int) -> dict[str, Timing]:
    """Run each callable ``repeats`` times, rotating which goes first."""
    timings = {name: Timing([], [], -1) for name in runs}
    for rep in range(repeats):
        for name in rotate(list(runs), rep):
            seconds, cpu, rows = runs[name]()
            timing = timings[name]
            if timing.rows not in (-1, rows):
                raise RuntimeError(
                    f"{name}: row count changed between repeats ({timing.rows}, {rows})"
                )
            timing.seconds.append(seconds)
            timing.cpu.append(cpu)
            timing.rows = rows
    return timings


def median(values: list[float]) -> float:
    return statistics.median(values)


def profile_steps(pipeline: PipelineConfig, stage_root: Path, db: Path) -> dict[str, float]:
    """The loader's per-file steps timed one by one (same SQL, same order, fresh DuckDB file).

    As in ``load()``, DuckDB runs on one thread and a file of at least ``_CHECKPOINT_ROWS`` lines
    is checkpointed at commit; the md5 read runs inline here, where ``load()`` gives it a thread of
    its own that overlaps DuckDB's work.
    """
    warehouse = DuckDBWarehouse(fresh(db), stage_root, pipeline)
    warehouse.ensure_schema()
    source = pipeline.source(SOURCE)
    table = f"{pipeline.raw_schema}.{source.raw_table}"
    log_sql = insert_sql(f"{pipeline.ops_schema}.load_log", LOAD_LOG_COLUMNS)
    steps: dict[str, float] = {}

    @contextmanager
    def step(name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        steps[name] = steps.get(name, 0.0) + time.perf_counter() - started

    with step("open"):
        con = duckdb.connect(str(db))
        con.execute("set threads = 1")
    for path in warehouse.staged_files(source):
        with step("md5, line count, blank-line scan (Python; own thread in load())"):
            md5, lines, blank_free = _fingerprint(path)
        con.execute("begin transaction")
        with step("insert: read_text, split, trim, try_cast, append"):
            (loaded,) = con.execute(
                f"insert into {table} (record, _file, _loaded_at) {_RECORDS}",
                {"path": _glob_literal(path), "file": path.name, "loaded_at": utcnow()},
            ).fetchone()
        with step("statistics + first error (files with a blank or bad line)"):
            parsed, bad = file_statistics(con, path, loaded, lines, blank_free)
            if bad is not None:
                describe_json_error(bad[1])
        with step("load_log row"):
            row = [SOURCE, table, path.name, md5, "LOADED", parsed, loaded, parsed - loaded]
            con.execute(log_sql, [*row, None, None, utcnow(), None])
        with step("commit (checkpoint of a big file, else WAL)"):
            commit(con, checkpoint=loaded >= _CHECKPOINT_ROWS)
    with step("close (checkpoint)"):
        con.close()
    fresh(db)
    return steps


def commit(con: duckdb.DuckDBPyConnection, *, checkpoint: bool) -> None:
    if checkpoint:
        with _setting(con, "checkpoint_threshold", "0b"):
            con.execute("commit")
    else:
        con.execute("commit")


def what_if(files: list[Path], db: Path, rounds: int) -> dict[str, float]:
    """Whole loads by other means on the same files: open, one insert + commit per file, close.

    Median of rounds, rotating the order. The bare inserts show what DuckDB alone costs with one
    transaction per file (the contract) against one statement; the loader's insert (no md5, no
    statistics, no load log) is shown as shipped and with each of its choices undone.
    """
    loader_sql = f"insert into raw.events (record, _file, _loaded_at) {_RECORDS}"
    not_null_sql = f"insert into raw.events (record, _file, _loaded_at) {RECORDS_NOT_NULL}"

    def per_file(
        sql: str, *, loader: bool = True, threads: int | None = 1, checkpoint: bool = True
    ) -> Callable[[], None]:
        def load() -> None:
            con = duckdb.connect(str(db))
            if threads:
                con.execute(f"set threads = {threads}")
            for path in files:
                con.execute("begin transaction")
                if loader:
                    params = {"path": _glob_literal(path), "file": path.name, "loaded_at": utcnow()}
                    (loaded,) = con.execute(sql, params).fetchone()
                else:
                    (loaded,) = con.execute(sql, [str(path)]).fetchone()
                commit(con, checkpoint=checkpoint and loaded >= _CHECKPOINT_ROWS)
            con.close()

        return load

    def one_statement() -> None:
        con = duckdb.connect(str(db))
        con.execute(BARE_CLEAN_SQL, [[str(f) for f in files]])
        con.close()

    alternatives: dict[str, Callable[[], None]] = {
        "bare insert, one statement (the baseline)": one_statement,
        "bare insert, one transaction per file": per_file(
            BARE_CLEAN_SQL, loader=False, threads=None, checkpoint=False
        ),
        "loader's insert per file, as shipped": per_file(loader_sql),
        "  ... committed through the WAL (DuckDB's default)": per_file(
            loader_sql, checkpoint=False
        ),
        "  ... on DuckDB's default threads": per_file(loader_sql, threads=None),
        "  ... + `record is not null` (parses each line twice)": per_file(not_null_sql),
    }
    seconds: dict[str, list[float]] = {label: [] for label in alternatives}
    for r in range(rounds):
        for label in rotate(list(alternatives), r):
            with duckdb.connect(str(fresh(db))) as con:
                con.execute("create schema raw")
                con.execute(
                    "create table raw.events (record json, _file varchar, _loaded_at timestamp)"
                )
            started = time.perf_counter()
            alternatives[label]()
            seconds[label].append(time.perf_counter() - started)
    fresh(db)
    return {label: median(values) for label, values in seconds.items()}


def rotate(items: list[str], n: int) -> list[str]:
    n %= len(items)
    return items[n:] + items[:n]


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(
        c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(fmt_row(header, widths))
    print(fmt_row(["-" * w for w in widths], widths))
    for row in rows:
        print(fmt_row(row, widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: 8 MiB, 1 repeat")
    parser.add_argument("--mb", type=float, default=None, help="MiB of JSON lines (default 100)")
    parser.add_argument("--files", type=int, default=4, help="number of stage files (default 4)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per method (default 3)")
    parser.add_argument(
        "--profile",
        choices=["auto", "always", "never"],
        default="auto",
        help="step breakdown: when a ratio misses the goal (auto), always, or never",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    mb = args.mb if args.mb is not None else (8 if args.quick else 100)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if mb <= 0 or args.files < 1 or repeats < 1:
        parser.error("--mb, --files and --repeats must be positive")
    total_bytes = int(mb * MIB)

    WORK_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="load-", dir=WORK_ROOT))
    try:
        return run(args, work, total_bytes, repeats)
    finally:
        if args.keep:
            print(f"\nwork directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, total_bytes: int, repeats: int) -> int:
    pipeline = load_pipeline_config(ROOT / "postload.yaml")
    print(
        f"load benchmark: {total_bytes / MIB:.0f} MiB of {SOURCE} JSON lines "
        f"in {args.files} files, {repeats} repeat(s) per method, "
        f"duckdb {duckdb.__version__}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    variants = {"clean": 0, "1% malformed": MALFORMED_EVERY}
    stages: dict[str, Path] = {}
    staged: dict[str, list[Path]] = {}
    for label, every in variants.items():
        started = time.perf_counter()
        stages[label] = work / f"stage-{every}"
        staged[label] = generate(stages[label], total_bytes, args.files, every)
        size = sum(p.stat().st_size for p in staged[label])
        lines = sum(1 for p in staged[label] for _ in p.open("rb"))
        print(
            f"  generated {label:13s} {size / MIB:7.1f} MiB, {lines:,} lines "
            f"in {time.perf_counter() - started:.1f}s"
        )
    print()

    results: dict[str, dict[str, Timing]] = {}
    for label in variants:
        malformed = variants[label] > 0
        results[label] = side_by_side(
            {
                "loader": lambda label=label: run_loader(
                    pipeline, stages[label], work / "loader.duckdb"
                ),
                "bare": lambda label=label, m=malformed: run_bare(
                    staged[label], work / "bare.duckdb", malformed=m
                ),
            },
            repeats,
        )

    rows = []
    missed = []
    for label, timing in results.items():
        size = sum(p.stat().st_size for p in staged[label]) / MIB
        loader, bare = median(timing["loader"].seconds), median(timing["bare"].seconds)
        ratio = loader / bare
        if timing["loader"].rows != timing["bare"].rows:
            raise RuntimeError(
                f"{label}: loader loaded {timing['loader'].rows} rows, bare {timing['bare'].rows}"
            )
        if ratio > GOAL:
            missed.append(label)
        best_ratio = min(timing["loader"].seconds) / min(timing["bare"].seconds)
        cpu_ratio = median(timing["loader"].cpu) / median(timing["bare"].cpu)
        for name, secs in [("loader", loader), ("bare", bare)]:
            first = name == "loader"
            rows.append(
                [
                    label,
                    name,
                    f"{secs:.2f}",
                    f"{min(timing[name].seconds):.2f}",
                    " ".join(f"{s:.2f}" for s in timing[name].seconds),
                    f"{median(timing[name].cpu):.2f}",
                    f"{size / secs:.1f}",
                    f"{timing[name].rows:,}",
                    f"{ratio:.2f}" if first else "",
                    f"{best_ratio:.2f}" if first else "",
                    f"{cpu_ratio:.2f}" if first else "",
                    ("ok" if ratio <= GOAL else "MISSED") if first else "",
                ]
            )
    print_table(
        [
            "variant",
            "method",
            "median s",
            "best s",
            "runs s",
            "cpu s",
            "MiB/s",
            "rows",
            "ratio",
            "ratio of bests",
            "cpu ratio",
            f"goal <= {GOAL}",
        ],
        rows,
    )
    print(
        "ratio = loader median / bare median (wall); MiB/s from the medians; cpu s = median\n"
        "process CPU time of a run, all threads (the loader hashes on a second thread)"
    )
    print(f"\npeak RSS of the process: {peak_rss_mib():.0f} MiB")

    if args.profile == "always" or (args.profile == "auto" and missed):
        profile(pipeline, work, stages, staged, variants, results, repeats)
    elif missed:
        print("ratio above the goal: rerun with --profile always for the step breakdown")
    print(
        f"peak RSS of the process (final): {peak_rss_mib():.0f} MiB; "
        f"load average now: {os.getloadavg()[0]:.1f}"
    )
    return 0


def profile(
    pipeline: PipelineConfig,
    work: Path,
    stages: dict[str, Path],
    staged: dict[str, list[Path]],
    variants: dict[str, int],
    results: dict[str, dict[str, Timing]],
    repeats: int,
) -> None:
    print("\n== where the loader's time goes (steps timed one by one, summed over the files) ==")
    for label in variants:
        steps = profile_steps(pipeline, stages[label], work / "profile.duckdb")
        total = sum(steps.values())
        loader = median(results[label]["loader"].seconds)
        bare = median(results[label]["bare"].seconds)
        print(
            f"\n{label}: steps sum {total:.2f}s "
            f"(loader median {loader:.2f}s, bare median {bare:.2f}s)"
        )
        print_table(
            ["step", "s", "% of steps"],
            [[name, f"{s:.3f}", f"{100 * s / total:.0f}%"] for name, s in steps.items()],
        )
    print(
        "(one thread, one step at a time: load() overlaps the md5 read with DuckDB's work, so it\n"
        "takes less wall time than the steps sum when a second core is free)"
    )

    print("\n== whole loads by other means (clean files, open + insert per file + close) ==")
    alt = what_if(staged["clean"], work / "whatif.duckdb", max(repeats, 2))
    print_table(["method", "median s"], [[k, f"{v:.3f}"] for k, v in alt.items()])


if __name__ == "__main__":
    sys.exit(main())
