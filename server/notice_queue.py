"""Where webhook deliveries stand (issue 22), off the writer's path.

The writer only ever inserts into the ``notices`` outbox, in the transaction of the entry
that causes each notice. A delivery thread (:mod:`.notice_delivery`) turns new notices into
one ``deliveries`` row per endpoint that wants the account, claims the due ones, posts them
and records the outcome here:

- SQLite: a sidecar file next to the journal (``<db>-deliveries``), so the delivery thread
  never takes the journal's write lock. New notices are read by ``rowid`` through a
  read-only connection: one writer commits them in rowid order, so a cursor misses none.
- PostgreSQL: ``notice_deliveries`` beside the outbox, shared by every node. New notices
  are taken with ``FOR UPDATE SKIP LOCKED`` and marked ``queued``; due deliveries are
  claimed the same way and stay locked while their POST is in flight, so one node at a
  time delivers a notice to an endpoint; a node that dies drops its locks with its
  connection, and another node delivers (at least once: the receiver deduplicates by id).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from ledger.store.queries import notice_filter

from .webhook import Endpoint

ENQUEUE_BATCH = 500  # notices turned into deliveries per pass
SIDECAR_SUFFIX = "-deliveries"

SIDECAR_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    outbox_rowid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS notice_deliveries (
    notice_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    account_id TEXT NOT NULL,
    at_us INTEGER NOT NULL,
    created_s REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at_s REAL NOT NULL,
    delivered_at_s REAL,
    failed INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (notice_id, endpoint)
);
CREATE INDEX IF NOT EXISTS notice_deliveries_due ON notice_deliveries (next_at_s)
    WHERE delivered_at_s IS NULL AND failed = 0;
CREATE INDEX IF NOT EXISTS notice_deliveries_by_time ON notice_deliveries (at_us, notice_id);
"""

_INSERT = ("INSERT INTO notice_deliveries (notice_id, endpoint, account_id, at_us, created_s,"
           " next_at_s) VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING")
_DUE = ("SELECT d.notice_id, d.endpoint, d.attempts, d.created_s, n.payload"
        " FROM notice_deliveries d JOIN notices n ON n.notice_id = d.notice_id"
        " WHERE d.delivered_at_s IS NULL AND d.failed = ? AND d.next_at_s <= ?"
        " ORDER BY d.next_at_s LIMIT ?")
_RECORD = ("UPDATE notice_deliveries SET attempts = ?, next_at_s = ?, delivered_at_s = ?,"
           " failed = ?, last_error = ? WHERE notice_id = ? AND endpoint = ?")


@dataclass(slots=True)
class Claim:
    notice_id: str
    endpoint: str
    attempts: int
    created_s: float
    payload: str
    # the outcome, set by the delivery thread before the claim is released
    delivered_at_s: float | None = None
    next_at_s: float = 0.0
    failed: bool = False
    error: str | None = None

    def row(self) -> tuple:
        return (self.attempts, self.next_at_s, self.delivered_at_s, self.failed, self.error,
                self.notice_id, self.endpoint)


def state_of(delivered_at_s: float | None, failed: Any) -> str:
    return "delivered" if delivered_at_s is not None else "failed" if failed else "pending"


class _Reads:
    """The reads both queues answer alike (``ListNotices``, metrics)."""

    OUTBOX = "notices"
    UNQUEUED = "NOT queued"  # outbox rows not yet turned into deliveries

    def _rows(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        raise NotImplementedError

    def of_notices(self, ids: list[str]) -> dict[str, list[tuple]]:
        """Per notice: (endpoint, state, attempts, delivered_at_s, last_error) each."""
        out: dict[str, list[tuple]] = {}
        if not ids:
            return out
        marks = ",".join("?" * len(ids))
        for nid, ep, attempts, delivered, failed, err in self._rows(
                "SELECT notice_id, endpoint, attempts, delivered_at_s, failed, last_error"
                f" FROM notice_deliveries WHERE notice_id IN ({marks}) ORDER BY endpoint", ids):
            out.setdefault(nid, []).append((ep, state_of(delivered, failed), attempts,
                                            delivered, err))
        return out

    def undelivered(self, account_id: str | None, since_us: int,
                    after: tuple[int, str] | None, limit: int) -> list[str]:
        """Ids of notices some endpoint has not acknowledged, in (at_us, notice_id) order."""
        where, params = notice_filter(account_id, since_us, after)
        cond = " AND ".join(where)
        return [r[0] for r in self._rows(
            f"SELECT notice_id, at_us FROM notice_deliveries WHERE delivered_at_s IS NULL"
            f" AND {cond} UNION SELECT notice_id, at_us FROM {self.OUTBOX} WHERE"
            f" {self.UNQUEUED} AND {cond} ORDER BY at_us, notice_id LIMIT ?",
            (*params, *params, limit))]

    def stats(self) -> tuple[int, float | None]:
        """(deliveries pending, creation instant of the oldest pending one)."""
        n, oldest = self._rows("SELECT count(*), min(created_s) FROM notice_deliveries"
                               " WHERE delivered_at_s IS NULL AND failed = ?", (False,))[0]
        return int(n), oldest


class SqliteQueue(_Reads):
    OUTBOX = "ledger.notices"
    UNQUEUED = "rowid > (SELECT coalesce(max(outbox_rowid), 0) FROM cursor)"

    def __init__(self, db_path: str) -> None:
        self.side = sqlite3.connect(f"file:{quote(db_path + SIDECAR_SUFFIX)}", uri=True,
                                    isolation_level=None, check_same_thread=False)
        self.side.execute("PRAGMA journal_mode=WAL")
        self.side.execute("PRAGMA busy_timeout=5000")
        self.side.executescript(SIDECAR_SCHEMA)
        self.side.execute("ATTACH DATABASE ? AS ledger", (f"file:{quote(db_path)}?mode=ro",))
        self._lock = threading.Lock()  # the delivery thread, RPCs and metrics share it

    def _rows(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        with self._lock:
            return self.side.execute(sql, params).fetchall()

    def enqueue(self, endpoints: tuple[Endpoint, ...], now_s: float) -> int:
        with self._lock:
            row = self.side.execute("SELECT outbox_rowid FROM cursor").fetchone()
            cursor = row[0] if row else 0
            new = self.side.execute(
                "SELECT rowid, notice_id, account_id, at_us FROM ledger.notices"
                " WHERE rowid > ? ORDER BY rowid LIMIT ?", (cursor, ENQUEUE_BATCH)).fetchall()
            if not new:
                return 0
            self.side.execute("BEGIN IMMEDIATE")
            try:
                self.side.executemany(_INSERT, [(nid, e.name, acct, at, now_s, now_s)
                                                for _, nid, acct, at in new
                                                for e in endpoints if e.wants(acct)])
                self.side.execute("INSERT OR REPLACE INTO cursor VALUES (1, ?)", (new[-1][0],))
                self.side.execute("COMMIT")
            except BaseException:
                self.side.execute("ROLLBACK")
                raise
            return len(new)

    @contextmanager
    def claim(self, now_s: float, limit: int) -> Iterator[list[Claim]]:
        """The due deliveries; their outcomes are written when the block ends (one thread
        delivers on SQLite: nothing else claims them meanwhile)."""
        claims = [Claim(*r) for r in self._rows(_DUE.replace("JOIN notices", "JOIN ledger.notices"),
                                                (False, now_s, limit))]
        yield claims
        if not claims:  # an idle poll writes nothing
            return
        with self._lock:
            self.side.execute("BEGIN IMMEDIATE")
            self.side.executemany(_RECORD, [c.row() for c in claims])
            self.side.execute("COMMIT")

    def resend(self, notice_id: str, now_s: float) -> int:
        with self._lock:
            return self.side.execute(
                "UPDATE notice_deliveries SET delivered_at_s = NULL, failed = 0,"
                " next_at_s = ?, created_s = ? WHERE notice_id = ?",
                (now_s, now_s, notice_id)).rowcount

    def close(self) -> None:
        with self._lock:
            self.side.close()


class PgQueue(_Reads):
    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        from ledger.store.postgres import pg_sql
        self._sql = pg_sql
        self._errors = (psycopg.OperationalError, psycopg.InterfaceError)
        self.pool = ConnectionPool(url, min_size=1, max_size=2, open=True,
                                   kwargs={"autocommit": True})

    def _rows(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        with self.pool.connection() as conn:
            cur = conn.execute(self._sql(sql), params)
            return cur.fetchall() if cur.description else []

    def enqueue(self, endpoints: tuple[Endpoint, ...], now_s: float) -> int:
        with self.pool.connection() as conn, conn.transaction():
            new = conn.execute(
                "SELECT notice_id, account_id, at_us FROM notices WHERE NOT queued"
                " ORDER BY at_us LIMIT %s FOR UPDATE SKIP LOCKED", (ENQUEUE_BATCH,)).fetchall()
            if not new:
                return 0
            rows = [(nid, e.name, acct, at, now_s, now_s) for nid, acct, at in new
                    for e in endpoints if e.wants(acct)]
            if rows:
                conn.cursor().executemany(self._sql(_INSERT), rows)
            conn.execute("UPDATE notices SET queued = true WHERE notice_id = ANY(%s)",
                         ([r[0] for r in new],))
            return len(new)

    @contextmanager
    def claim(self, now_s: float, limit: int) -> Iterator[list[Claim]]:
        """The due deliveries, row-locked (SKIP LOCKED) for as long as the block runs: no
        other node posts them meanwhile."""
        with self.pool.connection() as conn, conn.transaction():
            claims = [Claim(*r) for r in conn.execute(
                self._sql(_DUE) + " FOR UPDATE OF d SKIP LOCKED", (False, now_s, limit))]
            yield claims
            if claims:
                conn.cursor().executemany(self._sql(_RECORD), [c.row() for c in claims])

    def resend(self, notice_id: str, now_s: float) -> int:
        with self.pool.connection() as conn:
            return conn.execute(
                "UPDATE notice_deliveries SET delivered_at_s = NULL, failed = false,"
                " next_at_s = %s, created_s = %s WHERE notice_id = %s",
                (now_s, now_s, notice_id)).rowcount

    def close(self) -> None:
        self.pool.close()


def open_queue(db: str) -> SqliteQueue | PgQueue:
    from ledger.store import is_pg_url
    return PgQueue(db) if is_pg_url(db) else SqliteQueue(db)
