"""The local spool: Consume requests kept on disk while the ledger cannot be reached (R26).

A CAPTCHA server must not fail because billing is down. With ``spool_path`` a client writes a
``consume()`` that could not reach the ledger to this SQLite file, durably (WAL,
``synchronous=FULL``, the caller's answer only after COMMIT), and answers ``provisional``.
A replayer sends the rows later under their original ``request_id`` and
``client_observed_at``, so a request that did reach the ledger is only replayed (R12).

- Bounded: ``rows_max``, ``bytes_max`` and ``age_max_s`` (:class:`SpoolLimits`). Past one,
  :meth:`Spool.add` raises ``LedgerError(RESOURCE_EXHAUSTED, SPOOL_FULL)``; nothing is
  dropped silently.
- Several processes may share one file (gunicorn workers): every write is ``BEGIN
  IMMEDIATE`` under ``busy_timeout``, and only the holder of the replay lease sends rows, so
  each account's rows reach the ledger in the order they were spooled. A lease held by a
  process that is gone (same host, pid dead) or past its time is taken over.
- A row leaves ``pending`` only once its outcome is known: recorded (deleted), or refused
  (moved to ``refused``: suspended or unknown account, key reused, malformed; or still
  failing after ``REPLAY_ATTEMPTS_MAX`` tries). Refused rows are reported, never retried.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import sqlite_utils
from quota_ledger.v1 import quota_ledger_pb2 as qpb

from clients.outcomes import Outcome
from clients.wire import LedgerError

SPOOL_ROWS_MAX = 100_000
SPOOL_BYTES_MAX = 64 * 1024 * 1024
SPOOL_AGE_MAX_S = 86_400.0  # an outage longer than a day stops fail-open: the caller decides
BUSY_TIMEOUT_MS = 10_000
WAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024
LEASE_S = 30.0  # a replayer that stops renewing loses the lease after this long
REPLAY_ATTEMPTS_MAX = 20  # item-level transient errors before a row is moved to refused
REFUSED_EXAMPLES_MAX = 20
# Item errors that say the ledger decided: moved to refused at once.
_FINAL = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED})


@dataclass(frozen=True)
class SpoolLimits:
    rows_max: int = SPOOL_ROWS_MAX
    bytes_max: int = SPOOL_BYTES_MAX
    age_max_s: float = SPOOL_AGE_MAX_S


@dataclass(frozen=True)
class SpoolRow:
    seq: int
    account_id: str
    request: qpb.ConsumeRequest
    attempts: int


@dataclass(frozen=True)
class SpoolStatus:
    pending: int
    refused: int
    bytes: int
    oldest_age_s: float | None
    # the circuit breaker of each client process using the file (issue 21): its last state
    breakers: tuple[dict[str, object], ...] = ()


@dataclass
class SettleReport:
    """What one replayed batch did: recorded (of which replayed: had already reached the
    ledger), refused (moved out), kept (a transient item error; tried again later)."""

    recorded: int = 0
    replayed: int = 0
    refused: int = 0
    kept: int = 0

    def add(self, other: SettleReport) -> None:
        for name in ("recorded", "replayed", "refused", "kept"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def spool_full(message: str) -> LedgerError:
    return LedgerError(grpc.StatusCode.RESOURCE_EXHAUSTED, "SPOOL_FULL", message)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spool:
    """One spool file, shared safely by threads (one lock) and processes (SQLite locks)."""

    def __init__(self, path: str | os.PathLike[str], limits: SpoolLimits | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.path, self.limits, self.clock = str(path), limits or SpoolLimits(), clock
        self.owner = uuid.uuid4().hex
        self._host, self._lock = socket.gethostname(), threading.Lock()
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")  # WAL shrinks back
        self.db = sqlite_utils.Database(conn)
        with self._write():
            self._create_tables()

    def _create_tables(self) -> None:
        columns = {"seq": int, "account_id": str, "request_id": str, "request": bytes,
                   "size_bytes": int, "spooled_at_us": int}
        self.db["pending"].create({**columns, "attempts": int, "last_error": str}, pk="seq",
                                  not_null=set(columns), defaults={"attempts": 0},
                                  if_not_exists=True)
        self.db["refused"].create({**columns, "refused_at_us": int, "code": str, "reason": str,
                                   "message": str}, pk="seq", if_not_exists=True)
        for table in ("pending", "refused"):
            self.db[table].create_index(["account_id", "request_id"], unique=True,
                                        if_not_exists=True)
        self.db["breakers"].create({"owner": str, "host": str, "pid": int, "state": str,
                                    "since_us": int}, pk="owner", if_not_exists=True)
        self.db["replay_lease"].create({"id": int, "owner": str, "host": str, "pid": int,
                                        "until_us": int}, pk="id", if_not_exists=True)
        # Counts kept by triggers, so a limit check costs the same with 100,000 rows as with 1.
        self.db["pending_totals"].create({"id": int, "rows": int, "bytes": int}, pk="id",
                                         if_not_exists=True)
        self.db.execute("INSERT OR IGNORE INTO pending_totals SELECT 1, count(*), "
                        "coalesce(sum(size_bytes), 0) FROM pending")
        self.db.execute("CREATE TRIGGER IF NOT EXISTS pending_in AFTER INSERT ON pending BEGIN "
                        "UPDATE pending_totals SET rows = rows + 1, bytes = bytes + "
                        "NEW.size_bytes WHERE id = 1; END")
        self.db.execute("CREATE TRIGGER IF NOT EXISTS pending_out AFTER DELETE ON pending BEGIN "
                        "UPDATE pending_totals SET rows = rows - 1, bytes = bytes - "
                        "OLD.size_bytes WHERE id = 1; END")

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction: BEGIN IMMEDIATE takes the write lock up front, so a busy
        file waits busy_timeout instead of failing on the first write (TRAPS)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _now_us(self) -> int:
        return int(self.clock() * 1_000_000)

    # ------------------------------------------------------------------ spooling
    def add(self, request: qpb.ConsumeRequest) -> qpb.ConsumeResponse:
        """Keep ``request`` durably and answer it as provisional; SPOOL_FULL past a limit."""
        blob = request.SerializeToString()
        now_us = self._now_us()
        with self._write():
            rows, size, oldest = self._totals()
            self._check_limits(rows, size + len(blob), oldest, now_us)
            self.db["pending"].insert(
                {"account_id": request.account_id, "request_id": request.request_id,
                 "request": blob, "size_bytes": len(blob), "spooled_at_us": now_us},
                ignore=True)  # the same request spooled again: kept once
        return qpb.ConsumeResponse(request_id=request.request_id, provisional=True)

    def _totals(self) -> tuple[int, int, int | None]:
        """Pending rows, their bytes, and the oldest one's instant (seq order is spool
        order)."""
        rows, size = self.db.execute("SELECT rows, bytes FROM pending_totals").fetchone()
        oldest = self.db.execute("SELECT spooled_at_us FROM pending ORDER BY seq LIMIT 1"
                                 ).fetchone()
        return rows, size, oldest[0] if oldest else None

    def _check_limits(self, rows: int, size: int, oldest_us: int | None, now_us: int) -> None:
        lim = self.limits
        if rows + 1 > lim.rows_max:
            raise spool_full(f"the spool {self.path} holds {rows:,} requests "
                             f"(rows_max {lim.rows_max:,}); the ledger has been unreachable")
        if size > lim.bytes_max:
            raise spool_full(f"the spool {self.path} would pass bytes_max "
                             f"{lim.bytes_max:,} bytes")
        if oldest_us is not None and now_us - oldest_us > lim.age_max_s * 1_000_000:
            raise spool_full(f"the spool {self.path} has held a request for more than "
                             f"age_max_s {lim.age_max_s:g} s; the ledger has been unreachable")

    # ------------------------------------------------------------------ replay
    def take(self, limit: int) -> list[SpoolRow] | None:
        """The oldest ``limit`` pending rows, and the replay lease with them; None while
        another live process holds the lease (it is replaying, in order)."""
        now_us = self._now_us()
        with self._write():
            lease = self.db.execute("SELECT owner, host, pid, until_us FROM replay_lease "
                                    "WHERE id = 1").fetchone()
            if lease is not None and not self._lease_free(lease, now_us):
                return None
            self.db["replay_lease"].upsert(
                {"id": 1, "owner": self.owner, "host": self._host, "pid": os.getpid(),
                 "until_us": now_us + int(LEASE_S * 1_000_000)}, pk="id")
            cursor = self.db.execute("SELECT seq, account_id, request, attempts FROM pending "
                                     "ORDER BY seq LIMIT ?", [limit])
            return [SpoolRow(seq, account, qpb.ConsumeRequest.FromString(blob), attempts)
                    for seq, account, blob, attempts in cursor.fetchall()]

    def _lease_free(self, lease: tuple[str, str, int, int], now_us: int) -> bool:
        owner, host, pid, until_us = lease
        if owner == self.owner or until_us < now_us:
            return True
        return host == self._host and pid != os.getpid() and not _pid_alive(pid)

    def release(self) -> None:
        """Give up the replay lease (at close), so another process may replay at once."""
        with self._write():
            self.db.execute("DELETE FROM replay_lease WHERE owner = ?", [self.owner])

    def settle(self, rows: Sequence[SpoolRow], outcomes: Sequence[Outcome]) -> SettleReport:
        """Remove what the ledger decided; count a transient failure on the rest."""
        report = SettleReport()
        now_us = self._now_us()
        with self._write():
            for row, outcome in zip(rows, outcomes, strict=True):
                if isinstance(outcome, qpb.ConsumeResponse):
                    report.recorded += 1
                    report.replayed += outcome.replayed
                elif outcome.code in _FINAL or row.attempts + 1 >= REPLAY_ATTEMPTS_MAX:
                    self._refuse(row, outcome, now_us)
                    report.refused += 1
                else:
                    self.db.execute("UPDATE pending SET attempts = attempts + 1, last_error = ?"
                                    " WHERE seq = ?", [str(outcome), row.seq])
                    report.kept += 1
                    continue
                self.db.execute("DELETE FROM pending WHERE seq = ?", [row.seq])
        return report

    def _refuse(self, row: SpoolRow, error: LedgerError, now_us: int) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO refused (account_id, request_id, request, size_bytes, "
            "spooled_at_us, refused_at_us, code, reason, message) SELECT account_id, "
            "request_id, request, size_bytes, spooled_at_us, ?, ?, ?, ? FROM pending "
            "WHERE seq = ?", [now_us, error.code.name, error.reason, error.message, row.seq])

    def note_breaker(self, state: str) -> None:
        """Keep this client's breaker state where ``ledgerctl spool status`` reads it; a
        process that is gone leaves its row, shown as not alive. Written by a thread of its
        own, in order: a caller (or an event loop) never waits for this fsync."""
        if self._notes is None:
            self._notes = ThreadPoolExecutor(1, thread_name_prefix="ledger-spool-note")
        self._notes.submit(self._note_breaker, state, self._now_us())

    _notes: ThreadPoolExecutor | None = None

    def _note_breaker(self, state: str, at_us: int) -> None:
        with self._write():
            self.db["breakers"].upsert({"owner": self.owner, "host": self._host,
                                        "pid": os.getpid(), "state": state,
                                        "since_us": at_us}, pk="owner")

    # ------------------------------------------------------------------ reporting
    def status(self) -> SpoolStatus:
        with self._lock:
            pending, size, oldest_us = self._totals()
            refused = self.db.execute("SELECT count(*) FROM refused").fetchone()[0]
            breakers = list(self.db.query("SELECT host, pid, state, since_us FROM breakers "
                                          "ORDER BY since_us DESC"))
        now = self.clock()
        age = None if oldest_us is None else max(0.0, now - oldest_us / 1_000_000)
        for b in breakers:
            b["alive"] = b["host"] != self._host or _pid_alive(b["pid"])
            b["for_s"] = round(max(0.0, now - b.pop("since_us") / 1_000_000), 3)
        return SpoolStatus(pending=pending, refused=refused, bytes=size, oldest_age_s=age,
                           breakers=tuple(breakers))

    def refused_examples(self, limit: int = REFUSED_EXAMPLES_MAX) -> list[dict[str, str]]:
        with self._lock:
            return list(self.db.query(
                "SELECT account_id, request_id, code, reason, message FROM refused "
                "ORDER BY seq LIMIT ?", [limit]))

    def close(self) -> None:
        if self._notes is not None:
            self._notes.shutdown(wait=True)
        with self._lock:
            self.db.conn.close()
