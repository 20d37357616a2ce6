"""The real ledger for the settlement property tests: the engine in process, as the server runs it.

Each hypothesis example opens a fresh ledger and drives the engine in process through the single
writer (``writer.call`` + ``unwrap``), exactly as the server does; :class:`Live` also reads the
database back for the checks. Both backends (issue 11): the tests take ``module_db`` (hypothesis
refuses function-scoped fixtures), and :func:`fresh_db` gives each example a new SQLite file in a
temporary directory, or the module's PostgreSQL database emptied (``empty_pg_ledger``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ledger.catalog import builtin
from ledger.clock import TestClock
from ledger.engine import Engine
from ledger.errors import LedgerError
from ledger.model import Architecture, CaptchaType, Consume, Step
from ledger.money import Region
from ledger.store import is_pg_url, open_store
from ledger.writer import Writer, unwrap

from .conftest import empty_pg_ledger
from .settlement_model import BillTuple


def bill_tuple(b: Any) -> BillTuple:
    return (b.account_id, b.billing_day, b.bill_date,
            tuple((ln.item, ln.region, ln.quantity, ln.unit_price_micros, ln.amount_micros)
                  for ln in b.lines),
            tuple((p, n) for p, n in b.plan_offsets), b.total_micros, b.amount_due_micros,
            b.paid_voucher_micros, b.paid_cash_micros, b.outstanding_micros, b.issued_at_us)


# ---------------------------------------------------------------------------- the real ledger


class Live:
    """One store, test clock, engine and writer on one database (an SQLite path or a
    PostgreSQL URL)."""

    def __init__(self, db: str, start_us: int) -> None:
        self.db, self.start_us = db, start_us
        self.reads = Reader(db)
        self._open()

    def _open(self) -> None:
        self.store = open_store(self.db)
        self.clock = TestClock(self.start_us)  # the engine floors it to the saved clock
        self.engine = Engine(self.store, self.clock, builtin())
        self.writer = Writer(self.engine)
        self.writer.start()

    def close(self) -> None:
        self.writer.stop()
        self.store.close()
        self.reads.close()

    def restart(self) -> None:
        """Stop and reopen the same database (state is reloaded, not replayed)."""
        self.close()
        self._open()

    def call(self, cmd: Any) -> Any:
        return unwrap(self.writer.call(cmd))

    def attempt(self, cmd: Any) -> tuple[Any, str | None]:
        """(result, None) or (None, the refusal's reason); a refusal writes nothing."""
        before = self.snapshot()
        try:
            return self.call(cmd), None
        except LedgerError as exc:
            assert self.snapshot() == before, f"{cmd} was refused but changed state"
            return None, exc.reason

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self.reads.query(sql, params)

    def account_rows(self) -> dict[str, tuple[Any, ...]]:
        return {r[0]: (r[1], r[2], r[3], r[4], r[5], r[6], sorted(json.loads(r[7])), r[8])
                for r in self.query(
                    "SELECT account_id, status, cash_micros, voucher_micros, outstanding_micros,"
                    " overdue_since_us, suspended_at_us, scenario_ids, custom_policy"
                    " FROM accounts")}

    def snapshot(self) -> tuple[Any, ...]:
        """What settling an already settled day again must leave alone."""
        return (self.query("SELECT count(*) FROM journal")[0][0], self.account_rows(),
                self.query("SELECT count(*) FROM bills")[0][0])


class Reader:
    """Reads of a ledger's database with sqlite3's face (``?`` parameters) on either backend:
    SQLite read-only, a connection per read; PostgreSQL through :class:`PgConn` on one
    autocommit connection kept until :meth:`close` (a connect costs more than the query)."""

    def __init__(self, db: str) -> None:
        self.db = db
        self._raw: Any = None

    @contextmanager
    def connection(self) -> Iterator[Any]:
        if is_pg_url(self.db):
            import psycopg

            from ledger.store.postgres import PgConn
            if self._raw is None:
                self._raw = psycopg.connect(self.db, autocommit=True)
            yield PgConn(self._raw)
            return
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            yield conn
        finally:
            conn.close()

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.connection() as conn:
            return conn.execute(sql, params).fetchall()

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None


@contextmanager
def fresh_db(backend_db: str, tmp_dir: str | None = None) -> Iterator[str]:
    """Where one hypothesis example keeps a new, empty ledger (pytest's fixtures are per
    test or module, not per example): a new SQLite file in a temporary directory (under
    ``tmp_dir``), or ``backend_db``, a PostgreSQL database, emptied. No store may be open on
    it."""
    if is_pg_url(backend_db):
        empty_pg_ledger(backend_db)
        yield backend_db
        return
    with tempfile.TemporaryDirectory(dir=tmp_dir) as d:
        yield str(Path(d) / "l.db")


@contextmanager
def ledger_at(backend_db: str, start_us: int) -> Iterator[Live]:
    """A fresh ledger per hypothesis example on ``backend_db``'s backend (:func:`fresh_db`)."""
    with fresh_db(backend_db, RAM_DIR) as db:
        live = Live(db, start_us)
        try:
            yield live
        finally:
            live.close()


# Durability is not what these tests check: a RAM disk keeps each fsync (and shrinking) cheap.
RAM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def consume_cmd(account_id: str, request_id: str, qty: int, region: int) -> Consume:
    return Consume(account_id, request_id, Region(region), CaptchaType.SLIDER, Architecture.V2,
                   Step.STEP_3, quantity=qty)
