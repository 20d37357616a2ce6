"""A floor for a lone Consume (issue 18), in the style of ``../shared/research/unary-floor/``.

    .venv/bin/python -m tests.floor_unary PORT DIR [essential|derived|bare|bare-thread]

(its database: DIR/floor.db, or DIR/floor-MODE.db)

A unary server on the project's protos that does only the essential work of a lone consume,
inside the handler on the event loop: the key checked in a dict, one unit taken in a dict,
the request packed as a one-item MessagePack block, SHA-256 chained, and committed as one
row (``BEGIN IMMEDIATE``, ``INSERT``, ``COMMIT``; WAL + synchronous=FULL), before the reply.
A replayed key commits nothing. No future, no callback, no thread: at 1 in flight nothing
cheaper keeps R11 (the reply after its fsync). The reply carries what the contract's
``ConsumeResponse`` must (``../shared/spec/CONTRACT.md``): the allocation (the account's
one plan), the billing day and the instant it was recorded at (R1: the clock read once per
request, the day cached as the engine caches it), the units left, and ``replayed`` for a
replay. (Until the fourteenth sitting the floor answered with four fields only, which no
client of the contract could use: at 1 in flight that cost it about 25 µs less than a
whole reply, docs/performance-thirteenth-and-fourteenth.md.) No validation, derived rows,
key index, metrics or grouping either, so under concurrency it commits once per call: it is a
floor for 1 in flight only. ``python -m tests.bench_designs`` runs it beside the ledger.
Every mode serves with the no-op's (and the ledger's) server options (since the fifteenth
sitting; grpc's defaults before, which differ only in message size limits).

``essential`` adds only what the project's standards require of every call, with the
ledger's own code: the request validated into its row (``server.convert.consume_row``: bad
input never writes), domain errors mapped to gRPC statuses and the call counted and timed
(``server.errors.rpc`` with ``server.metrics.Metrics``, authentication off as in the
benchmarks). Still no derived rows, no key index, no engine: the floor of any design that
validates and commits a lone call on the loop.

``derived`` is ``essential`` with one derived row written in the same transaction, as the
ledger writes its plan's row: an ``UPDATE`` of the account's row by rowid (an ``INSERT`` the
first time). What it costs over ``essential`` is what writing derived rows with each lone
commit costs, against deferring them.

``bare`` is less than any ledger could do: the no-op server (``tests/baseline_server.py``:
its server options, its handler and its reply) with ``make bench``'s one-row commit floor
(``tests/bench_sqlite.py``: one row, ``BEGIN IMMEDIATE``, ``INSERT``, ``COMMIT``) run inside
its handler before the reply. No key, no plan, no chain. Its p50 over the no-op's is what
one fsync on the loop costs a lone call, whatever the ledger does around it: when that is
more than the one-row commit's own p50 plus the 0.10 ms issue 18 allows, the target is out of
reach for any design that commits a lone call on the event loop before its reply.
``bare-thread`` is ``bare`` with the commit on a thread of its own (one worker, the handler
awaiting it: ``loop.run_in_executor``), the other place a design can put it.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import msgpack

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "protos"), str(ROOT)]  # run as a script: the protos, server/
from quota_ledger.v1 import quota_ledger_pb2 as qpb  # noqa: E402
from quota_ledger.v1 import quota_ledger_pb2_grpc as qg  # noqa: E402

from ledger import calendar as cal  # noqa: E402
from tests.baseline_server import SERVER_OPTIONS, _response  # noqa: E402

PLAN_UNITS = 10**9  # what every account holds: the floor never runs out
# The item's fields (the request's, then what the floor decided and when)
PLAN, QTY, LEFT, AT_US, DAY = range(6, 11)


def reply(request_id: str, item: tuple, replayed: bool) -> qpb.ConsumeResponse:
    """The contract's ConsumeResponse for an item, filled in place (as the ledger fills its
    own, ``server.convert.fill_group_response``)."""
    msg = qpb.ConsumeResponse()
    msg.request_id = request_id
    msg.billable = True
    a = msg.allocations.add()
    a.plan_id = item[PLAN]
    a.units = item[QTY]
    msg.billing_day = item[DAY]
    msg.recorded_at.seconds, micros = divmod(item[AT_US], 1_000_000)
    msg.recorded_at.nanos = micros * 1000
    msg.plan_units_remaining = item[LEFT]
    if replayed:
        msg.replayed = True
    return msg


class LeanConsume:
    """A floor's consume in dicts: the key, the account's one plan and its units left, the
    clock read once (R1: the day cached with its bounds, as the engine caches it). Shared
    with ``tests/floor_process.py``."""

    def __init__(self) -> None:
        self.keys: dict[tuple[str, str], tuple] = {}
        self.remaining: dict[str, int] = {}
        self._plans: dict[str, str] = {}  # an account's one plan
        self._day: tuple[int, int, str] = (0, 0, "")  # R1: the current day and its bounds

    def decide(self, acc: str, rid: str, region: int, ctype: int, arch: int, step: int,
               qty: int) -> tuple:
        """A new request's item (see ``PLAN``..``DAY``), its unit taken; not yet a key."""
        at_us = time.time_ns() // 1000
        start, end, day = self._day
        if not start <= at_us < end:
            day = cal.billing_day(at_us)
            self._day = (cal.day_start(day), cal.day_end(day), day)
        plan_id = self._plans.get(acc)
        if plan_id is None:
            plan_id = self._plans[acc] = f"plan-{len(self._plans) + 1}"
        left = self.remaining.get(acc, PLAN_UNITS) - qty
        self.remaining[acc] = left
        return (acc, rid, region, ctype, arch, step, plan_id, qty, left, at_us, day)


class Floor(LeanConsume, qg.QuotaLedgerServicer):
    SERVICE = "QuotaLedger"  # the rpc wrapper's method names (essential mode)

    def __init__(self, db: sqlite3.Connection, plan_rows: bool = False) -> None:
        super().__init__()
        self.db = db
        self.last = b"\0" * 32
        self.plan_rows = plan_rows  # mode ``derived``: the account's row in the transaction
        self._rowids: dict[str, int] = {}

    async def Consume(self, req, ctx):  # noqa: N802
        rid = req.request_id
        return reply(rid, *self.take(req.account_id, rid, req.region, req.captcha_type,
                                     req.architecture, req.step, 1))

    def take(self, acc: str, rid: str, region: int, ctype: int, arch: int, step: int,
             qty: int) -> tuple[tuple, bool]:
        """The lean consume, committed before it returns: (its item, whether it was a
        replay: a replayed key commits nothing)."""
        item = self.keys.get((acc, rid))
        if item is not None:
            return item, True
        item = self.decide(acc, rid, region, ctype, arch, step, qty)
        blob = msgpack.packb([item])
        self.last = hashlib.sha256(self.last + blob).digest()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO journal (payload, hash) VALUES (?, ?)", (blob, self.last))
        if self.plan_rows:
            self.write_plan(acc, item[LEFT])
        db.execute("COMMIT")
        self.keys[(acc, rid)] = item
        return item, False

    def write_plan(self, acc: str, left: int) -> None:
        rowid = self._rowids.get(acc)
        if rowid is None:
            rowid = self.db.execute("INSERT INTO plans (account_id, units_remaining) VALUES"
                                    " (?, ?)", (acc, left)).lastrowid
            self._rowids[acc] = rowid
        else:
            self.db.execute("UPDATE plans SET units_remaining = ? WHERE rowid = ?",
                            (left, rowid))


def essential_context() -> SimpleNamespace:
    """What the ledger's ``rpc`` wrapper reads of its servicer (``self.ctx``): the ledger's
    own metrics, not draining, authentication off (as in every benchmark). Shared with
    ``tests/floor_process.py``."""
    from server.auth import Authorizer
    from server.metrics import Metrics

    return SimpleNamespace(metrics=Metrics(), draining=False, auth=Authorizer(None))


def essential(db: sqlite3.Connection, plan_rows: bool = False) -> Floor:
    """The floor with validation, status mapping and per-call metrics (the ledger's own)."""
    from server.convert import consume_row
    from server.errors import rpc

    class Essential(Floor):
        @rpc
        async def Consume(self, req, ctx):  # noqa: N802
            row = consume_row(req)
            return reply(row[1], *self.take(*row[:6], row[7]))

    floor = Essential(db, plan_rows)
    floor.ctx = essential_context()
    return floor


class Bare(qg.QuotaLedgerServicer):
    """The no-op's Consume with one row committed before its reply (mode ``bare``)."""

    ROW = b"x" * 200  # the one-row commit floor's row size

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    async def Consume(self, req, ctx):  # noqa: N802
        self.commit()
        return _response(req)

    def commit(self) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO journal (payload, hash) VALUES (?, ?)", (self.ROW, b""))
        db.execute("COMMIT")


class BareThread(Bare):
    """Mode ``bare-thread``: the commit on one worker thread, awaited."""

    def __init__(self, db: sqlite3.Connection) -> None:
        super().__init__(db)
        self.pool = ThreadPoolExecutor(1)

    async def Consume(self, req, ctx):  # noqa: N802
        await asyncio.get_running_loop().run_in_executor(self.pool, self.commit)
        return _response(req)


async def serve(port: int, directory: Path, mode: str = "") -> None:
    db = sqlite3.connect(directory / f"floor{'-' + mode if mode else ''}.db", isolation_level=None,
                         check_same_thread=False)  # bare-thread commits on its worker
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, payload BLOB,"
               " hash BLOB)")
    db.execute("CREATE TABLE IF NOT EXISTS plans (account_id TEXT, units_remaining INTEGER)")
    floor = (Bare(db) if mode == "bare" else BareThread(db) if mode == "bare-thread"
             else essential(db, mode == "derived")
             if mode in ("essential", "derived") else Floor(db))
    server = grpc.aio.server(options=SERVER_OPTIONS)  # the no-op's (and the ledger's)
    qg.add_QuotaLedgerServicer_to_server(floor, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4]))
