"""A floor for issue 18's design 3 with the commit in a process of its own (the next step).

    .venv/bin/python -m tests.floor_process PORT DIR [essential]

(its database: DIR/proc.db, or DIR/proc-essential.db)

Issue 18's design 3 runs the engine on the event loop and only the commit on a thread. In
the ledger that thread costs the loop and itself a GIL handoff at every SQLite statement
and queue wait (about 35 voluntary context switches a group of 10-12 at 64 in flight,
against 3 in process; docs/performance.md, twelfth sitting). Here the commit runs in a
child process instead, which has a GIL of its own:

- the loop does a lean consume (a dict for the key and the units), and queues the request;
- when no commit is in flight, the queued requests go at once as one group: one
  MessagePack block, SHA-256 chained, written down a pipe;
- the child commits it as one row (``BEGIN IMMEDIATE``, ``INSERT``, ``COMMIT``; WAL +
  synchronous=FULL) and answers one byte down another pipe;
- the loop, woken by that pipe, answers the group (R11: after its commit) and sends the
  requests that queued meanwhile (pipelined, like design 3).

The consume and the reply are ``tests/floor_unary.py``'s (``LeanConsume``, ``reply``): the
account's one plan, the clock read once, the contract's whole ``ConsumeResponse``. (Until the
fifteenth sitting this floor answered with four fields, which no client of the contract could
use; its twelfth-sitting figures are of that reply.)

``essential`` adds what the project's standards require of every call, with the ledger's
own code, as in ``tests/floor_unary.py``: validation, status mapping, per-call metrics. No
derived rows, no key index, no engine. ``python -m tests.bench_designs`` runs it; its CPU
counts the child's (``tests/bench_cpu.py`` adds a server's child processes).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import struct
import sys
from pathlib import Path
from typing import Any

import grpc
import msgpack

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "protos"), str(ROOT)]  # run as a script: the protos, server/
from quota_ledger.v1 import quota_ledger_pb2_grpc as qg  # noqa: E402

from tests.floor_unary import LeanConsume, reply  # noqa: E402

HEADER = struct.Struct("<I")  # a group's length in bytes, then its block and its hash
HASH_BYTES = 32


def _read_exactly(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        got = os.read(fd, n)
        if not got:
            raise EOFError
        chunks.append(got)
        n -= len(got)
    return b"".join(chunks)


def committer(path: Path, rfd: int, wfd: int) -> None:
    """The child: commit each group as it comes, answer one byte each."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, payload BLOB,"
               " hash BLOB)")
    try:
        while True:
            (n,) = HEADER.unpack(_read_exactly(rfd, HEADER.size))
            body = _read_exactly(rfd, n)
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO journal (payload, hash) VALUES (?, ?)",
                       (body[:-HASH_BYTES], body[-HASH_BYTES:]))
            db.execute("COMMIT")
            os.write(wfd, b"\x01")
    except EOFError:  # the server is gone
        pass


class Floor(LeanConsume, qg.QuotaLedgerServicer):
    SERVICE = "QuotaLedger"  # the rpc wrapper's method names (essential mode)

    def __init__(self, wfd: int, rfd: int) -> None:
        super().__init__()
        self.wfd, self.rfd = wfd, rfd
        self.last = b"\0" * HASH_BYTES
        self.pending: list[tuple[tuple, asyncio.Future[Any]]] = []
        self.sent: list[tuple[tuple, asyncio.Future[Any]]] | None = None  # in flight

    def take(self, acc: str, rid: str, region: int, ctype: int, arch: int, step: int,
             qty: int) -> asyncio.Future[Any]:
        """The lean consume; the future is answered after the commit of its group, with
        the item and whether it was a replay."""
        fut = asyncio.get_running_loop().create_future()
        item = self.keys.get((acc, rid))
        replayed = item is not None
        if replayed and self.sent is None:  # nothing in flight: its request is committed
            fut.set_result((item, True))
            return fut
        if item is None:
            item = self.keys[(acc, rid)] = self.decide(acc, rid, region, ctype, arch, step, qty)
        self.pending.append(((item, replayed), fut))
        if self.sent is None:
            self._send()
        return fut

    def _send(self) -> None:
        group, self.pending = self.pending, []
        # A replay commits nothing (R12); it waits for a group only when the request it
        # replays may be in the one in flight.
        blob = msgpack.packb([item for (item, replayed), _ in group if not replayed])
        self.last = hashlib.sha256(self.last + blob).digest()
        os.write(self.wfd, HEADER.pack(len(blob) + HASH_BYTES) + blob + self.last)
        self.sent = group

    def acked(self) -> None:
        """The child committed the group in flight: answer it, send what queued meanwhile."""
        os.read(self.rfd, 1)
        group, self.sent = self.sent or [], None
        for item, fut in group:
            if not fut.done():
                fut.set_result(item)
        if self.pending:
            self._send()

    async def Consume(self, req, ctx):  # noqa: N802
        rid = req.request_id
        return reply(rid, *await self.take(req.account_id, rid, req.region, req.captcha_type,
                                           req.architecture, req.step, 1))


def essential(wfd: int, rfd: int) -> Floor:
    """The floor with validation, status mapping and per-call metrics (the ledger's own)."""
    from server.convert import consume_row
    from server.errors import rpc
    from tests.floor_unary import essential_context

    class Essential(Floor):
        @rpc
        async def Consume(self, req, ctx):  # noqa: N802
            row = consume_row(req)
            return reply(row[1], *await self.take(*row[:6], row[7]))

    floor = Essential(wfd, rfd)
    floor.ctx = essential_context()
    return floor


async def serve(port: int, floor: Floor) -> None:
    asyncio.get_running_loop().add_reader(floor.rfd, floor.acked)
    server = grpc.aio.server()
    qg.add_QuotaLedgerServicer_to_server(floor, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main(port: int, directory: Path, mode: str = "") -> None:
    to_child_r, to_child_w = os.pipe()
    to_loop_r, to_loop_w = os.pipe()
    if os.fork() == 0:  # before gRPC starts a thread
        os.close(to_child_w)
        os.close(to_loop_r)
        committer(directory / f"proc{'-' + mode if mode else ''}.db", to_child_r, to_loop_w)
        os._exit(0)
    os.close(to_child_r)
    os.close(to_loop_w)
    floor = (essential if mode == "essential" else Floor)(to_child_w, to_loop_r)
    asyncio.run(serve(port, floor))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4])
