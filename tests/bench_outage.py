"""`make bench-outage`: what a CAPTCHA server feels while the ledger dies, hangs and returns
(issue 21).

    python -m tests.bench_outage [--phase-seconds 10] [--rate 200] [--json-out FILE]

A real server on a fixed loopback port (SQLite, the durable default) and two CAPTCHA-like
client processes, each with its own spool: one drives ``LedgerClient`` from a pool of
threads, the other ``AsyncLedgerClient(batching=True)``; each sends --rate ``consume()``
calls per second on an open-loop schedule, over 10 accounts, for five phases of
--phase-seconds each:

1. up; 2. killed (SIGKILL); 3. restarted; 4. hung (SIGSTOP); 5. resumed (SIGCONT).

Per phase and client it reports p50, p99 and max of ``consume()``, the share answered
``provisional``, and how long the breaker took to open after the kill or the stop and to
close after the restart or the resume. At the end every request a client sent (acknowledged
or provisional) must be in the journal exactly once, the spools empty, and ``quota-ledger
verify`` clean. Each target of issue 21 is marked MET or MISSED from this run. Bounded:
5 x --phase-seconds of load, then at most DRAIN_WAIT_S for the spools.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from clients.client import AsyncLedgerClient, LedgerClient
from clients.spool import Spool

PHASES = ("up", "killed", "restarted", "hung", "resumed")
ACCOUNTS = [f"outage-{i}" for i in range(10)]
SYNC_WORKERS = 64  # the sync client's thread pool: a CAPTCHA server's request threads
DRAIN_WAIT_S = 30.0
OPEN_WITHIN_S = 1.0
CLOSE_WITHIN_S = 3.0
OPEN_P99_MS, OPEN_MAX_MS = 5.0, 20.0
OVER_BUDGET_MS = 50.0


# ---------------------------------------------------------------- the client processes
class Log:
    """Every call (wall start, latency, provisional, error, request_id) and every breaker
    transition (wall, old, new), written as JSON when the run ends."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float, bool, str | None, str]] = []
        self.moves: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()

    def move(self, old: str, new: str) -> None:
        with self.lock:
            self.moves.append((time.time(), old, new))

    def call(self, started: float, t0: float, answer: Any, error: str | None, rid: str) -> None:
        latency = time.perf_counter() - t0
        with self.lock:
            self.calls.append((started, latency, bool(answer and answer.provisional), error, rid))


def _drive_sync(target: str, spool: str, rate: float, seconds: float, log: Log) -> None:
    with LedgerClient(target, spool_path=spool, on_state_change=log.move) as c, \
            ThreadPoolExecutor(SYNC_WORKERS) as pool:
        def one(i: int) -> None:
            rid, started, t0 = f"sync-{i}", time.time(), time.perf_counter()
            try:
                answer, error = c.consume(ACCOUNTS[i % len(ACCOUNTS)], request_id=rid), None
            except Exception as exc:  # noqa: BLE001 (counted: a caller saw it)
                answer, error = None, repr(exc)
            log.call(started, t0, answer, error, rid)

        _schedule(rate, seconds, lambda i: pool.submit(one, i))


def _schedule(rate: float, seconds: float, fire: Any) -> None:
    start, i = time.monotonic(), 0
    while (due := start + i / rate) < start + seconds:
        time.sleep(max(0.0, due - time.monotonic()))
        fire(i)
        i += 1


async def _drive_async(target: str, spool: str, rate: float, seconds: float, log: Log) -> None:
    async with AsyncLedgerClient(target, spool_path=spool, batching=True,
                                 on_state_change=log.move) as c:
        async def one(i: int) -> None:
            rid, started, t0 = f"async-{i}", time.time(), time.perf_counter()
            try:
                answer, error = await c.consume(ACCOUNTS[i % len(ACCOUNTS)], request_id=rid), None
            except Exception as exc:  # noqa: BLE001
                answer, error = None, repr(exc)
            log.call(started, t0, answer, error, rid)

        # Finished tasks are let go at once: a harness that kept 10,000 of them would make
        # the process's own garbage collections (and so its pauses) grow with the run.
        tasks: set[asyncio.Task[None]] = set()
        start, i = time.monotonic(), 0
        while (due := start + i / rate) < start + seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        while tasks:
            await asyncio.gather(*list(tasks))
        # keep the client (its replayer) alive until its spool is empty, bounded
        deadline = time.monotonic() + DRAIN_WAIT_S
        while Spool(spool).status().pending and time.monotonic() < deadline:
            await asyncio.sleep(0.1)


def drive(kind: str, target: str, spool: str, rate: float, seconds: float, out: str) -> None:
    log = Log()
    if kind == "sync":
        _drive_sync(target, spool, rate, seconds, log)
        deadline = time.monotonic() + DRAIN_WAIT_S  # the replayer stops with the client
        with LedgerClient(target, spool_path=spool) as c:
            while c.spool is not None and c.spool.status().pending and \
                    time.monotonic() < deadline:
                time.sleep(0.1)
    else:
        asyncio.run(_drive_async(target, spool, rate, seconds, log))
    Path(out).write_text(json.dumps({"calls": log.calls, "moves": log.moves}))


# ---------------------------------------------------------------- the conductor
def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def phase_stats(calls: list[list[Any]], marks: list[float]) -> list[dict[str, Any]]:
    out = []
    for n, name in enumerate(PHASES):
        lo, hi = marks[n], marks[n + 1]
        mine = [c for c in calls if lo <= c[0] < hi]
        lat = [c[1] * 1000 for c in mine]
        out.append({"phase": name, "calls": len(mine),
                    "p50_ms": _pct(lat, 0.50), "p99_ms": _pct(lat, 0.99),
                    "max_ms": max(lat, default=float("nan")),
                    "provisional": sum(1 for c in mine if c[2]) / max(1, len(mine)),
                    "errors": sum(1 for c in mine if c[3])})
    return out


def first_move_after(moves: list[list[Any]], at: float, state: str) -> float | None:
    later = [m[0] for m in moves if m[0] >= at and m[2] == state]
    return (min(later) - at) if later else None


def open_calls(calls: list[list[Any]], moves: list[list[Any]]) -> list[float]:
    """Latencies (ms) of the calls that started while the breaker was open."""
    spans, opened = [], None
    for at, _old, new in sorted(moves):
        if new == "open" and opened is None:
            opened = at
        elif new != "open" and opened is not None:
            spans.append((opened, at))
            opened = None
    if opened is not None:
        spans.append((opened, float("inf")))
    return [c[1] * 1000 for c in calls if any(a <= c[0] < b for a, b in spans)]


@click.command()
@click.option("--phase-seconds", default=10.0, show_default=True, type=click.FloatRange(2, 60))
@click.option("--rate", default=200.0, show_default=True, type=click.FloatRange(1, 2000),
              help="consume() calls per second from each client.")
@click.option("--json-out", default=None, metavar="FILE")
@click.option("--drive", "kind", type=click.Choice(["sync", "async"]), hidden=True)
@click.option("--target", hidden=True)
@click.option("--spool", hidden=True)
@click.option("--seconds", type=float, hidden=True)
@click.option("--out", hidden=True)
def main(phase_seconds: float, rate: float, json_out: str | None, kind: str | None,
         target: str | None, spool: str | None, seconds: float | None, out: str | None) -> None:
    """The ledger killed, restarted, hung and resumed under CAPTCHA-like load (issue 21)."""
    if kind is not None:
        assert target and spool and seconds and out
        drive(kind, target, spool, rate, seconds, out)
        return
    from .outage_conductor import conduct
    conduct(phase_seconds, rate, json_out)


if __name__ == "__main__":
    main()
