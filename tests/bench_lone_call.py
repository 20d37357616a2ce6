"""A lone Consume's CPU in process, against a bare one-row commit (issue 18).

    python -m tests.bench_lone_call [--calls 3000] [--profile]

Issue 18 asks a single call at 1 in flight to cost the server no more than the no-op
server, plus one one-row commit, plus 50 µs of CPU. This splits the ledger's share from the
transport's: the ledger's own work for a lone consume, done as the inline path does it
(``Writer._process`` of a group of one, on the calling thread: the engine, the block, the
derived rows, the commit and its fsync, the key index), over 1,000 accounts that each hold
a plan, timed with ``time.process_time``; then, in the same process and directory, the
floor: a bare one-row commit (WAL, ``synchronous=FULL``) of a 200-byte row. What the first
costs above the second is the ledger's; what the server costs above both (``make bench``)
is gRPC's and asyncio's. ``--profile`` prints cProfile's top functions of a second pass.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import click

from ledger.catalog import builtin
from ledger.clock import SystemClock
from ledger.engine import Engine
from ledger.store import Store
from ledger.writer import Writer, _Item

from .bench_writer import recorded_units, setup
from .yardstick import describe, group_floor_us

ACCOUNTS = 1_000
WARMUP_CALLS = 200
BARE_ROW_BYTES = 200


class _Answer:
    """A future that takes its answer and keeps nothing (the reply is not built here)."""

    def done(self) -> bool:
        return False

    def set_result(self, value: Any) -> None:
        pass


def lone_calls(writer: Writer, rows: list[tuple]) -> None:
    for row in rows:
        writer._process([_Item(row, _Answer(), 1)], direct=True)


def per_call_us(fn: Any, n: int) -> tuple[float, float]:
    """(CPU µs, wall µs) a call of fn(), which makes n calls."""
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return (time.process_time() - c0) / n * 1e6, (time.perf_counter() - w0) / n * 1e6


def bare_commits(path: Path, n: int) -> None:
    c = sqlite3.connect(path, isolation_level=None)
    try:
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        c.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b BLOB)")
        for i in range(n):
            c.execute("BEGIN IMMEDIATE")
            c.execute("INSERT INTO t VALUES (?, ?)", (i, b"x" * BARE_ROW_BYTES))
            c.execute("COMMIT")
    finally:
        c.close()


@click.command()
@click.option("--calls", default=3_000, show_default=True, type=click.IntRange(100, 100_000))
@click.option("--profile", is_flag=True, help="cProfile a second pass of the lone calls")
def main(calls: int, profile: bool) -> None:
    """CPU of a lone consume in process, against a bare one-row commit (issue 18)."""
    print(f"load average {os.getloadavg()[0]:.2f} at the start; machine: "
          f"{describe(group_floor_us())}")
    with tempfile.TemporaryDirectory(prefix="bench-lone-") as d:
        store = Store(Path(d) / "ledger.db")
        writer = Writer(Engine(store, SystemClock(), builtin()))
        writer.start()
        ids = setup(writer, ACCOUNTS, plans_every=1)
        writer.stop()
        # billable (R3: a v2 slider's step 3), one unit each, round the accounts
        rows = [(ids[i % ACCOUNTS], str(uuid.uuid4()), 1, 1, 1, 1, None, 1, False, None)
                for i in range(WARMUP_CALLS + 2 * calls)]
        lone_calls(writer, rows[:WARMUP_CALLS])
        timed = rows[WARMUP_CALLS:WARMUP_CALLS + calls]
        ledger_cpu, ledger_wall = per_call_us(lambda: lone_calls(writer, timed), calls)
        bare_cpu, bare_wall = per_call_us(lambda: bare_commits(Path(d) / "bare.db", calls),
                                          calls)
        print(f"ledger, a lone consume: {ledger_cpu:.0f} µs CPU, {ledger_wall:.0f} µs wall")
        print(f"bare one-row commit:    {bare_cpu:.0f} µs CPU, {bare_wall:.0f} µs wall")
        print(f"the ledger's own work:  +{ledger_cpu - bare_cpu:.0f} µs CPU, "
              f"+{ledger_wall - bare_wall:.0f} µs wall a call")
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            lone_calls(writer, rows[WARMUP_CALLS + calls:])
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        made = WARMUP_CALLS + calls * (2 if profile else 1)
        store.close()
        recorded = recorded_units(Path(d) / "ledger.db")
        print(f"units: consumed {made:,} = recorded {recorded:,}")
        if recorded != made:
            raise SystemExit("the derived tables do not hold every lone consume")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
