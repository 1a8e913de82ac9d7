"""Deterministic sample files for the demo stage.

The demo and the tests need stage files that look like what real upstream jobs drop: one
newline-delimited JSON file per batch and source, with a few broken lines mixed in (the loader
must skip them, not fail). Everything is derived from ``(source, batch, seed)`` and a fixed base
date, never from the clock or global randomness, so the same call always writes the same bytes
and test expectations stay stable.

Ids are offset by batch so that loading several batches never produces duplicate keys, and an
orders batch only refers to customers of the customers batch with the same number and
arguments, so the ``relationships`` test holds once both are loaded.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

DEMO_SOURCES: tuple[str, ...] = ("customers", "orders", "events")

# Fixed so output never depends on when it is generated; batch N starts N hours later.
BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)
# Integer ids of batch N are N * ID_STRIDE + 1 ... so batches never collide.
ID_STRIDE = 1_000_000

EVENT_TYPES: tuple[str, ...] = ("page_view", "add_to_cart", "checkout")
ORDER_STATUSES: tuple[str, ...] = ("placed", "shipped", "returned")
_EVENT_WEIGHTS = (70, 20, 10)
_STATUS_WEIGHTS = (50, 40, 10)
_FIRST_NAMES = ("Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "Ken")
_LAST_NAMES = ("Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson")
# A word that is not JSON (unlike true/false/null, which are valid JSON values).
_BARE_WORD = "oops"
_ID_KEYS = {"customers": "customer_id", "orders": "order_id", "events": "event_id"}

Record = dict[str, Any]


def _timestamp(moment: datetime) -> str:
    """ISO-8601 UTC with a ``Z`` suffix: casts cleanly to TIMESTAMP on DuckDB and Snowflake."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_source(source: str) -> None:
    if source not in DEMO_SOURCES:
        raise ValueError(f"unknown source {source!r}: expected one of {', '.join(DEMO_SOURCES)}")


def _customer(rng: random.Random, customer_id: int, at: datetime) -> Record:
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    return {
        "customer_id": customer_id,
        "name": f"{first} {last}",
        "email": f"{first}.{last}.{customer_id}@example.com".lower(),
        "created_at": _timestamp(at),
    }


def _order(rng: random.Random, order_id: int, customer_id: int, at: datetime) -> Record:
    return {
        "order_id": order_id,
        "customer_id": customer_id,
        "amount": rng.randint(500, 50_000) / 100,  # whole cents: at most 2 decimals
        "status": rng.choices(ORDER_STATUSES, _STATUS_WEIGHTS)[0],
        "ordered_at": _timestamp(at),
    }


def _event(rng: random.Random, event_id: str, customer_id: int, at: datetime) -> Record:
    return {
        "event_id": event_id,
        "customer_id": customer_id,
        "event_type": rng.choices(EVENT_TYPES, _EVENT_WEIGHTS)[0],
        "occurred_at": _timestamp(at),
    }


def _batch_records(
    source: str, batch: int, count: int, customers: int, rng: random.Random
) -> Iterator[Record]:
    """``count`` valid records of batch ``batch``; customer refs stay within ``customers``."""
    start = BASE_TIME + timedelta(hours=batch)
    id_base = batch * ID_STRIDE
    for n in range(1, count + 1):
        at = start + timedelta(seconds=n * 30)
        customer_id = id_base + rng.randint(1, max(customers, 1))
        if source == "customers":
            yield _customer(rng, id_base + n, at)
        elif source == "orders":
            yield _order(rng, id_base + n, customer_id, at)
        else:
            yield _event(rng, f"evt-{batch:04d}-{n:06d}", customer_id, at)


def demo_records(source: str, batch: int, *, rows: int = 48, seed: int = 0) -> list[Record]:
    """The valid records of batch ``batch`` (what a connector would deliver: no malformed ones).

    Ids as in ``write_demo_batch`` with ``rows`` valid lines: orders of batch N refer to customers
    of batch N.
    """
    _check_source(source)
    rng = random.Random(f"{source}:{batch}:{seed}")
    return list(_batch_records(source, batch, rows, rows, rng))


def write_demo_batch(
    stage_root: Path,
    source: str,
    batch: int,
    *,
    rows: int = 50,
    malformed: int = 2,
    seed: int = 0,
) -> Path:
    """Write ``stage_root/<source>/<source>_<batch:04d>.jsonl`` and return its path.

    The file has ``rows`` lines, exactly ``malformed`` of which are not JSON (alternately a
    truncated object and a bare word) at positions fixed by ``(source, batch, seed)``. Malformed
    lines use no id, so the valid records of batch N have ids ``N * ID_STRIDE + 1`` up to
    ``N * ID_STRIDE + rows - malformed``; orders and events pick their ``customer_id`` from that
    range, which therefore exists once customers batch N (same ``rows``/``malformed``) is loaded.
    """
    _check_source(source)
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if not 1 <= rows < ID_STRIDE:
        raise ValueError(f"rows must be between 1 and {ID_STRIDE - 1}, got {rows}")
    if not 0 <= malformed <= rows:
        raise ValueError(f"malformed must be between 0 and rows ({rows}), got {malformed}")

    rng = random.Random(f"{source}:{batch}:{seed}")  # str seeds are stable across processes
    valid = rows - malformed
    records = [json.dumps(r) for r in _batch_records(source, batch, valid, valid, rng)]
    bad_positions = sorted(rng.sample(range(rows), malformed))
    for k, position in enumerate(bad_positions):
        if k % 2 == 0:
            # Any proper prefix of a JSON object is invalid: the closing brace is missing.
            broken = f'{{"{_ID_KEYS[source]}": "{source[0]}-{batch:04d}-{position}'
        else:
            broken = _BARE_WORD
        records.insert(position, broken)

    path = stage_root / source / f"{source}_{batch:04d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in records), encoding="utf-8")
    return path


def _bulk_line(source: str) -> Callable[[int], str]:
    """A fast formatter for line ``i`` of a bulk file (plain f-strings: json.dumps is too slow)."""

    # Lookup tables instead of per-line date arithmetic: line i happens i seconds into 2024
    # (336 days of 28-day months, then it wraps), and amounts cycle through whole cents.
    days = [f"2024-{1 + d // 28:02d}-{1 + d % 28:02d}T" for d in range(336)]
    times = [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}Z" for s in range(86_400)]
    cents = [f"{c // 100}.{c % 100:02d}" for c in range(500, 50_500)]

    def stamp(i: int) -> str:
        return days[i // 86_400 % 336] + times[i % 86_400]

    def amount(i: int) -> str:
        return cents[i * 37 % 50_000]

    if source == "customers":
        return lambda i: (
            f'{{"customer_id": {i}, "name": "Customer {i}", '
            f'"email": "customer.{i}@example.com", "created_at": "{stamp(i)}"}}'
        )
    if source == "orders":
        return lambda i: (
            f'{{"order_id": {i}, "customer_id": {1 + i * 7919 % 100_000}, '
            f'"amount": {amount(i)}, '
            f'"status": "{ORDER_STATUSES[i % 3]}", "ordered_at": "{stamp(i)}"}}'
        )
    return lambda i: (
        f'{{"event_id": "bulk-{i:010d}", "customer_id": {1 + i * 7919 % 100_000}, '
        f'"event_type": "{EVENT_TYPES[i % 3]}", "occurred_at": "{stamp(i)}"}}'
    )


def write_bulk_file(path: Path, source: str, target_bytes: int, *, malformed_every: int = 0) -> int:
    """Write about ``target_bytes`` of newline-delimited records of ``source`` to ``path``.

    For load benchmarks: records are valid (ids 1, 2, ... unique within the file) except every
    ``malformed_every``-th line, which is a bare word when ``malformed_every > 0``. Lines are
    built with f-strings and written in chunks, so ~100 MB takes a few seconds. Stops at the
    first line that reaches ``target_bytes`` and returns the number of lines written.
    """
    _check_source(source)
    if target_bytes < 1:
        raise ValueError(f"target_bytes must be >= 1, got {target_bytes}")
    if malformed_every < 0:
        raise ValueError(f"malformed_every must be >= 0, got {malformed_every}")

    line = _bulk_line(source)
    chunk_lines = 20_000
    written = lines = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    # Everything is ASCII, so len() of the text is its size in bytes.
    with path.open("w", encoding="ascii", newline="\n") as out:
        while written < target_bytes:
            chunk = [
                _BARE_WORD if malformed_every and i % malformed_every == 0 else line(i)
                for i in range(lines + 1, lines + chunk_lines + 1)
            ]
            text = "\n".join(chunk) + "\n"
            if written + len(text) > target_bytes:
                # Last chunk: keep lines only until the target is reached.
                kept = []
                for item in chunk:
                    kept.append(item)
                    written += len(item) + 1
                    if written >= target_bytes:
                        break
                out.write("\n".join(kept) + "\n")
                lines += len(kept)
                break
            out.write(text)
            written += len(text)
            lines += chunk_lines
    return lines
