"""Loads of `make bench` beside the load generator's, and the check after each load.

- ``batch_load``: ConsumeBatch in either view (CONTRACT 2026-11-29: FULL or COMPACT) through
  a raw stub, closed loop, the load generator's request bytes and recorder: the same
  accounting as ``clients.loadgen`` (every request sent gets exactly one outcome).
- ``Units``: after every load on the ledger, the requests it acknowledged as billable and
  new must be exactly the units its journal recorded over that load (R11: nothing
  acknowledged before its commit; nothing recorded twice, R12), read from the database.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc
from quota_ledger.v1 import quota_ledger_pb2 as qpb

from clients.loadgen import (
    AccountPicker,
    LoadConfig,
    LoadResult,
    Recorder,
    RequestFactory,
    parse_skew,
)
from ledger.store import consume_entries

VIEWS = {"full": qpb.CONSUME_BATCH_VIEW_FULL, "compact": qpb.CONSUME_BATCH_VIEW_COMPACT}
BATCH_METHOD = "/quota_ledger.v1.QuotaLedger/ConsumeBatch"
CALLS_PER_CHANNEL = 2  # batch calls in flight per connection
CALL_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
MESSAGE_BYTES_MAX = 16 * 1024 * 1024
OK = grpc.StatusCode.OK.value[0]
_CODE_NAMES = {sc.value[0]: sc.name for sc in grpc.StatusCode}


def _count_full(resp: qpb.ConsumeBatchResponse) -> tuple[int, int, int, dict[str, int]]:
    """(acknowledged, billable, replayed, errors by code) of a FULL answer."""
    ok = billable = replayed = 0
    errors: dict[str, int] = {}
    for r in resp.results:
        if r.HasField("response"):
            ok += 1
            billable += r.response.billable
            replayed += r.response.replayed
        else:
            name = _CODE_NAMES.get(r.error.code, "UNKNOWN")
            errors[name] = errors.get(name, 0) + 1
    return ok, billable, replayed, errors


def _count_compact(resp: qpb.ConsumeBatchResponse) -> tuple[int, int, int, dict[str, int]]:
    c = resp.compact
    if len(c.billable) != len(c.codes) or len(c.replayed) != len(c.codes):
        raise AssertionError("COMPACT columns of different lengths")
    errors: dict[str, int] = {}
    for e in c.errors:
        name = _CODE_NAMES.get(e.error.code, "UNKNOWN")
        errors[name] = errors.get(name, 0) + 1
    return len(c.codes) - len(c.errors), sum(c.billable), sum(c.replayed), errors


async def batch_load(target: str, accounts: list[str], *, view: str, batch_size: int,
                     concurrency: int, seconds: float, requests_max: int) -> LoadResult:
    """``concurrency`` ConsumeBatch calls of ``batch_size`` in flight for ``seconds``."""
    cfg = LoadConfig(target=target, account_ids=accounts)
    wire = RequestFactory(cfg, accounts, AccountPicker(len(accounts), parse_skew("uniform"),
                                                       random.Random()))
    suffix = b"\x10" + bytes([VIEWS[view]])  # ConsumeBatchRequest.view (field 2, varint)
    count = _count_compact if view == "compact" else _count_full
    rec = Recorder()
    options = [("grpc.use_local_subchannel_pool", 1),
               ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX)]
    channels = [grpc.aio.insecure_channel(target, options=options)
                for _ in range(max(1, concurrency // CALLS_PER_CHANNEL))]
    await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)),
                           CONNECT_TIMEOUT_S)
    stubs = [c.unary_unary(BATCH_METHOD, request_serializer=None,
                           response_deserializer=qpb.ConsumeBatchResponse.FromString)
             for c in channels]
    end_at = 0.0

    async def worker(stub: Any) -> None:
        while time.perf_counter() < end_at and rec.sent + batch_size <= requests_max:
            body = wire.batch(batch_size) + suffix
            rec.on_sent(batch_size)
            rec.calls += 1
            t = time.perf_counter()
            try:
                resp = await stub(body, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                rec.record((time.perf_counter() - t) * 1e6, False, exc.code().name, batch_size)
                continue
            lat = (time.perf_counter() - t) * 1e6
            ok, billable, replayed, errors = count(resp)
            rec.record(lat, True, n=ok, billable=billable, replayed=replayed)
            for name, n in errors.items():
                rec.record(lat, False, name, n)
            if ok + sum(errors.values()) != batch_size:
                rec.record(lat, False, "SHORT_ANSWER", batch_size - ok - sum(errors.values()))

    try:
        rec.start()
        end_at = rec.t0 + seconds
        await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(concurrency)))
    finally:
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
    return rec.result(shape=f"batch-{view}", target=target, mode="closed")


class Units:
    """Units recorded in the ledger's journal since the last mark (a read-only connection)."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.seq = self._last_seq()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)

    def _last_seq(self) -> int:
        conn = self._connect()
        try:
            return conn.execute("SELECT coalesce(max(seq), 0) FROM journal").fetchone()[0]
        finally:
            conn.close()

    def since_mark(self) -> int:
        """Units of the consume entries after the mark, then move the mark to the end."""
        conn = self._connect()
        try:
            entries = list(consume_entries(conn, "AND seq > ?", (self.seq,)))
            top = max((e[0] for e in entries), default=self.seq)
            units = sum(e[4]["qty"] for e in entries)
        finally:
            conn.close()
        self.seq = max(top, self._last_seq())
        return units

    def check(self, result: LoadResult, label: str) -> dict[str, int]:
        """Acknowledged new billable requests (quantity 1 each) == units recorded meanwhile.
        An error leaves its requests' outcome unknown (a deadline may pass after the commit):
        then recorded may exceed acknowledged, never fall short of it nor exceed sent."""
        acked = result.billable - result.replayed
        recorded = self.since_mark()
        exact = not result.error_total
        if recorded < acked or recorded > result.sent or (exact and recorded != acked):
            raise AssertionError(f"{label}: acknowledged {acked:,} billable requests but the "
                                 f"journal recorded {recorded:,} units (sent {result.sent:,})")
        return {"acknowledged": acked, "recorded": recorded}
