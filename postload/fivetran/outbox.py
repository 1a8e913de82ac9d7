"""The receiver's outbox: a durable SQLite queue of Prefect events keyed by event id.

The receiver commits each verified delivery here before answering 202, and its forwarder drains
the rows to Prefect's ``/events``; a row is marked forwarded only on a 2xx.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["Outbox", "OutboxCounts"]


def _utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class OutboxCounts:
    pending: int
    forwarded: int
    rejected: int
    oldest_pending_received_at: str | None


class Outbox:
    """A SQLite table of Prefect events keyed by event id: the receiver's durable queue.

    WAL with ``synchronous=NORMAL``: a committed row survives a crash of this process (not
    necessarily a power loss), and a commit costs no fsync, which keeps the ack path fast.
    Not thread-safe: ``Receiver`` uses it from its event loop only.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, so each statement is its own durable transaction
        # and multi-statement ones are explicit.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=normal")
        # Only this process writes; a lock held elsewhere (an operator's shell) must not stall the
        # event loop for long: fail the request (Fivetran retries) rather than hang it.
        self._db.execute("pragma busy_timeout=1000")
        self._db.executescript(
            """
            create table if not exists outbox (
                id text primary key,            -- the Prefect event id (deterministic)
                event text not null,            -- the Prefect event, JSON
                received_at text not null,      -- UTC ISO-8601
                forwarded_at text,              -- set on a 2xx from POST /events
                attempts integer not null default 0,
                last_error text,
                rejected_at text                -- set when the API refused the event itself (4xx)
            );
            create index if not exists outbox_pending on outbox (received_at)
                where forwarded_at is null and rejected_at is null;
            -- The receiver's own state that must survive a restart: api_unreachable_since, the
            -- start of the current outage of the Prefect API (what the catch-up event is keyed on).
            create table if not exists receiver_state (
                key text primary key,
                value text not null
            );
            """
        )

    def record(self, event_id: str, event_json: str) -> bool:
        """Store an event; False if that id is already stored (a redelivery)."""
        return self.record_many([(event_id, event_json)])[0]

    def record_many(self, events: list[tuple[str, str]]) -> list[bool]:
        """Store ``(id, event_json)`` pairs in one transaction; per pair, False if a duplicate.

        One commit for many rows is the group commit that keeps the ack path fast under load: a
        commit costs far more than an insert.
        """
        now = _utcnow()
        inserted = []
        self._db.execute("begin immediate")
        try:
            for event_id, event_json in events:
                cur = self._db.execute(
                    "insert or ignore into outbox (id, event, received_at) values (?, ?, ?)",
                    (event_id, event_json, now),
                )
                inserted.append(cur.rowcount == 1)
            # Inside the try: a commit refused by a full disk leaves the transaction open, and
            # every later "begin" would fail until it is rolled back.
            self._db.execute("commit")
        except BaseException:
            self._rollback()
            raise
        return inserted

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("rollback")

    def pending(self, limit: int) -> list[tuple[str, str]]:
        """The oldest events not yet forwarded (nor rejected): ``(id, event_json)``."""
        return self._db.execute(
            "select id, event from outbox where forwarded_at is null and rejected_at is null "
            "order by received_at, id limit ?",
            (limit,),
        ).fetchall()

    def _update_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self._db.execute("begin")
        try:
            self._db.executemany(sql, rows)
            self._db.execute("commit")
        except BaseException:
            self._rollback()
            raise

    def mark_forwarded(self, ids: list[str]) -> None:
        now = _utcnow()
        self._update_many(
            "update outbox set forwarded_at = ?, attempts = attempts + 1, last_error = null "
            "where id = ?",
            [(now, i) for i in ids],
        )

    def mark_failed(self, ids: list[str], error: str) -> None:
        self._update_many(
            "update outbox set attempts = attempts + 1, last_error = ? where id = ?",
            [(error, i) for i in ids],
        )

    def mark_rejected(self, event_id: str, error: str) -> None:
        self._update_many(
            "update outbox set rejected_at = ?, attempts = attempts + 1, last_error = ? "
            "where id = ?",
            [(_utcnow(), error, event_id)],
        )

    def api_unreachable_since(self) -> str | None:
        """When the current outage of the Prefect API began (UTC ISO-8601), or None."""
        row = self._db.execute(
            "select value from receiver_state where key = 'api_unreachable_since'"
        ).fetchone()
        return row[0] if row else None

    def mark_api_unreachable(self, since: str) -> str:
        """Remember that the API is unreachable since ``since``, unless an outage is already
        recorded (its start is kept); returns the start of the recorded outage."""
        self._db.execute(
            "insert or ignore into receiver_state (key, value) values ('api_unreachable_since', ?)",
            (since,),
        )
        recorded = self.api_unreachable_since()
        assert recorded is not None
        return recorded

    def forwarded_since(self, since: str) -> list[str]:
        """Ids of the events forwarded at or after ``since`` (UTC ISO-8601)."""
        rows = self._db.execute(
            "select id from outbox where forwarded_at >= ? and rejected_at is null", (since,)
        ).fetchall()
        return [row[0] for row in rows]

    def end_outage(
        self, event_id: str, event_json: str, *, resend: list[str] | None = None
    ) -> tuple[bool, int]:
        """Queue the outage's catch-up event and forget the outage, in one transaction; the
        forwarded events ``resend`` are made pending again.

        Returns whether the catch-up event was queued (False when that id is already stored: an
        outage ended twice) and how many forwarded events are pending again.
        """
        self._db.execute("begin immediate")
        try:
            resent = 0
            for resend_id in resend or []:
                resent += self._db.execute(
                    "update outbox set forwarded_at = null where id = ? and rejected_at is null",
                    (resend_id,),
                ).rowcount
            cur = self._db.execute(
                "insert or ignore into outbox (id, event, received_at) values (?, ?, ?)",
                (event_id, event_json, _utcnow()),
            )
            self._db.execute("delete from receiver_state where key = 'api_unreachable_since'")
            self._db.execute("commit")
        except BaseException:
            self._rollback()
            raise
        return cur.rowcount == 1, resent

    def counts(self) -> OutboxCounts:
        pending, forwarded, rejected, oldest = self._db.execute(
            """
            select count(*) filter (where forwarded_at is null and rejected_at is null),
                   count(forwarded_at),
                   count(rejected_at),
                   min(received_at) filter (where forwarded_at is null and rejected_at is null)
            from outbox
            """
        ).fetchone()
        return OutboxCounts(pending, forwarded, rejected, oldest)

    def prune(self, forwarded_before: datetime) -> int:
        """Delete rows forwarded before ``forwarded_before``; pending and rejected rows stay."""
        cur = self._db.execute(
            "delete from outbox where forwarded_at is not null and forwarded_at < ?",
            (forwarded_before.astimezone(UTC).isoformat(timespec="microseconds"),),
        )
        return cur.rowcount

    def close(self) -> None:
        self._db.close()
