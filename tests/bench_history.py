"""`make bench-history`: the cost of a request must not grow with history.

    python -m tests.bench_history [--rows 10000000] [--runs 3] [--seconds 8] [--verify]

Issue targets: Consume throughput on a journal of 10 million rows within 20% of that on an
empty database; the server starts on a 10-million-row journal in seconds, with no full replay
(by design it re-hashes a bounded tail of the journal at start: ledger/verify.py check_tail).

What it does, in one run:
1. Builds two databases with the same accounts and plans (1,000 accounts with a year-100m
   plan, 100 pay-as-you-go; created, topped up and bought through the engine): "empty" (no
   consumes) and "history" (``--rows`` consume entries over the days before today, UTC+8,
   at most 1,000,000 per day, each day settled by the engine as the server would). Both are
   settled through yesterday, so a server on either finds nothing due at start.
   The consumes are written as the engine writes them: journal blocks of 1,000 items
   (``tests.bench_sqlite.write_consumes``, items checked against the engine's own) with random UUID
   request_ids, the derived rows (plans, offsets_daily, usage_daily) the engine would write,
   through ``Store.commit`` of a ``UnitOfWork``, 100,000 requests per transaction, which
   also indexes their keys (memtable, runs, filter) exactly as a server does. Through the
   engine or the server a request costs tens of microseconds of Python more, which for 10
   million requests alone would take longer than this whole bench. After building, cheap
   SQL checks (gap-free seq, units conserved between the journal and the derived tables);
   ``--verify`` adds the full ``quota-ledger verify`` (a whole replay, streamed).
2. Per run: starts `python -m server serve` (system clock, WAL + synchronous=FULL) on each
   database and times process spawn -> health check SERVING; warms both up; drives the same
   ``clients.loadgen.run_load`` loads at each, alternating which goes first: unary Consume at
   64 in flight and ConsumeBatch x1,000 at 4 calls in flight. Medians over ``--runs``.

Runtime, measured on a busy 2-core machine: building writes about 43,000 consume entries
per second (23 s per million rows), and each run takes about 45 s with the default 8-second
loads. The default 10,000,000 rows took 6 minutes in all (4 to build, 2 to measure);
``--rows 1000000`` took 2.5 minutes. The databases live in a temporary directory
(``--tmpdir``; 10 million rows take 2.9 GiB) that is removed at the end. The page cache is
warm after building, so the start times are warm starts.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from clients.client import LedgerClient
from clients.loadgen import LoadResult
from ledger import calendar as cal
from ledger import catalog
from ledger import model as m
from ledger.clock import TestClock
from ledger.engine import Engine
from ledger.money import Region
from ledger.store import Store, consume_entries
from ledger.verify import TAIL_CHECK_ENTRIES
from ledger.verify import verify as verify_db

from .bench import (
    MEASURES,
    closing_lines,
    drive,
    machine,
    median,
    ratio,
)
from .bench_servers import Proc
from .bench_sqlite import check_items, run_group, write_consumes

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROWS = 10_000_000
PLAN_ACCOUNTS = 1_000
PAYG_ACCOUNTS = 100
PLAN_SPEC = "year-100m"  # 100 million units: no account runs out, whatever --rows
PLAN_TOP_UP_MICROS = 10_000_000  # on top of the plan's price
PAYG_TOP_UP_MICROS = 1_000_000_000  # USD 1,000: pays every pay-as-you-go bill of 10M rows
ENGINE_CONSUMES = 20  # consumes written by the engine itself: ConsumeRows.check's reference
ROWS_PER_DAY_MAX = 1_000_000
BUILD_TXN_ROWS = 100_000  # consume entries per transaction while building
BUILD_BLOCK_ITEMS = 1_000  # consumes per journal block (one commit group of a busy server)
BUILD_CACHE_KIB = 512 * 1024  # the builder's own page cache (not the server's)
START_TIMEOUT_S = 120.0
HEALTH_TIMEOUT_S = 10.0
WARMUP_S = 1.5
START_SECONDS_MAX = 10.0  # "server start ... in seconds"
THROUGHPUT_RATIO_MIN = 0.8  # "within 20% of that on an empty database"
HISTORY_MEASURES = tuple(x for x in MEASURES if x.key in ("unary64", "batch"))


# --------------------------------------------------------------------------- building

@dataclass
class Build:
    rows: int
    days: list[str]
    base_s: float = 0.0
    rows_s: float = 0.0
    settle_s: float = 0.0
    checks_s: float = 0.0
    entries: int = 0
    size_bytes: int = 0


def account_ids() -> tuple[list[str], list[str]]:
    return ([f"hist-plan-{i:04d}" for i in range(PLAN_ACCOUNTS)],
            [f"hist-payg-{i:03d}" for i in range(PAYG_ACCOUNTS)])


def history_days(rows: int, now_us: int) -> list[str]:
    """The days the history covers: enough for ROWS_PER_DAY_MAX each, ending yesterday."""
    n = max(1, math.ceil(rows / ROWS_PER_DAY_MAX))
    last = cal.billing_day(cal.day_start(cal.billing_day(now_us)) - 1)
    first = cal.billing_day(cal.day_start(last) - (n - 1) * cal.US_PER_DAY)
    return cal.days_between(first, last)


def build_base(path: Path, t_us: int) -> None:
    """Accounts, top-ups and plan purchases through the engine, at t_us."""
    store = Store(path)
    try:
        engine = Engine(store, TestClock(t_us), catalog.builtin())
        plan_ids, payg_ids = account_ids()
        price = catalog.builtin()[PLAN_SPEC].price_micros
        run_group(engine, [m.CreateAccount(a, "bench history") for a in plan_ids + payg_ids])
        run_group(engine, [m.TopUp(a, "history-top-up", m.FundsKind.CASH,
                                   price + PLAN_TOP_UP_MICROS) for a in plan_ids]
                  + [m.TopUp(a, "history-top-up", m.FundsKind.CASH, PAYG_TOP_UP_MICROS)
                     for a in payg_ids])
        run_group(engine, [m.PurchasePlan(a, "history-plan", PLAN_SPEC) for a in plan_ids])
    finally:
        store.close()


def settle_through(engine: Engine, clock: TestClock, day: str) -> None:
    """The engine settles every unsettled day up to ``day``, one second after it ends."""
    engine.reload()  # rows were written behind its back: forget what it held
    clock.set(max(clock.now_us(), cal.day_end(day) + cal.US_PER_SECOND))
    engine.begin()
    engine.execute(m.SettleDay(day))
    engine.commit()


def write_day(store: Store, ids: list[str], day: str, n: int, offset: int,
              remaining: dict[str, int], plan_of: dict[str, Any]) -> None:
    """n consumes on ``day`` (01:00 to 23:00 UTC+8) with random UUID request_ids, as journal
    blocks of BUILD_BLOCK_ITEMS (what a busy server's commit groups write), BUILD_TXN_ROWS
    per transaction. ``offset`` continues the round robin over accounts."""
    write_consumes(store, ids, day, n, offset=offset, plans=plan_of, remaining=remaining,
                   t0_us=cal.day_start(day) + cal.US_PER_HOUR, span_us=22 * cal.US_PER_HOUR,
                   txn_items=BUILD_TXN_ROWS, block_items=BUILD_BLOCK_ITEMS)


def build_history(path: Path, days: list[str], rows: int, build: Build,
                  console: Console) -> None:
    """Append ``rows`` consume entries over ``days`` to a copy of the base, settling each
    day through the engine."""
    store = Store(path)
    try:
        store.conn.execute(f"PRAGMA cache_size = -{BUILD_CACHE_KIB}")
        clock = TestClock(cal.day_start(days[0]) + 30 * 60 * cal.US_PER_SECOND)
        engine = Engine(store, clock, catalog.builtin())
        plan_ids, payg_ids = account_ids()
        ids = plan_ids + payg_ids
        # A few consumes through the engine itself: the reference for ConsumeRows.check.
        run_group(engine, [m.Consume(a, f"engine-{a}", Region(1 + k % 2), m.CaptchaType.SLIDER,
                                     m.Architecture.V2, m.Step.STEP_3)
                           for k, a in enumerate(ids[:ENGINE_CONSUMES])])
        assert check_items(store) == ENGINE_CONSUMES
        plan_of = {p.account_id: p for p in store.load_plans("WHERE units_remaining > 0")}
        remaining = {a: p.units_remaining for a, p in plan_of.items()}
        bulk = rows - ENGINE_CONSUMES
        per_day = [bulk // len(days) + (i < bulk % len(days)) for i in range(len(days))]
        done = 0
        for day, n in zip(days, per_day, strict=True):
            t0 = time.perf_counter()
            write_day(store, ids, day, n, done, remaining, plan_of)
            t1 = time.perf_counter()
            settle_through(engine, clock, day)
            t2 = time.perf_counter()
            build.rows_s += t1 - t0
            build.settle_s += t2 - t1
            done += n
            console.print(f"  {day}: {n:,} consume entries in {t1 - t0:.1f} s "
                          f"({n / max(t1 - t0, 1e-9):,.0f}/s), settled in {t2 - t1:.2f} s; "
                          f"{done + ENGINE_CONSUMES:,} of {rows:,}")
    finally:
        store.close()


def build_empty(path: Path, last_day: str) -> None:
    store = Store(path)
    try:
        clock = TestClock(0)
        engine = Engine(store, clock, catalog.builtin())
        settle_through(engine, clock, last_day)
    finally:
        store.close()


def check_built(path: Path, consumes_expected: int) -> int:
    """Cheap SQL checks of a built database; returns its journal entries."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        count, max_seq = conn.execute("SELECT count(*), max(seq) FROM journal").fetchone()
        assert count == max_seq, f"journal seq has gaps: {count} entries, max seq {max_seq}"
        consumes = sum(1 for _ in consume_entries(conn))
        assert consumes == consumes_expected, (consumes, consumes_expected)
        offsets = conn.execute("SELECT coalesce(sum(units), 0) FROM offsets_daily").fetchone()[0]
        payg = conn.execute(
            "SELECT coalesce(sum(payg_units), 0) FROM usage_daily").fetchone()[0]
        assert offsets + payg == consumes, ("units not conserved", offsets, payg, consumes)
        bad = conn.execute(
            "SELECT p.plan_id FROM plans p LEFT JOIN (SELECT plan_id, sum(units) AS u FROM"
            " offsets_daily GROUP BY plan_id) o USING (plan_id)"
            " WHERE p.units_total - p.units_remaining != coalesce(o.u, 0) LIMIT 1").fetchone()
        assert bad is None, f"plan {bad[0]}: units used differ from its offsets"
        settled = conn.execute("SELECT value FROM meta WHERE key = 'settled_through'").fetchone()
        assert settled is not None, "not settled"
        return count
    finally:
        conn.close()


def build_all(tmp: Path, rows: int, console: Console) -> tuple[Path, Path, Build]:
    days = history_days(rows, time.time_ns() // 1_000)
    build = Build(rows=rows, days=days)
    base, empty, history = tmp / "base.db", tmp / "empty.db", tmp / "history.db"
    t0 = time.perf_counter()
    build_base(base, cal.day_start(days[0]) - 2 * cal.US_PER_HOUR)
    shutil.copyfile(base, empty)
    shutil.copyfile(base, history)
    base.unlink()
    build_empty(empty, days[-1])
    build.base_s = time.perf_counter() - t0
    console.print(f"accounts: {PLAN_ACCOUNTS:,} with a {PLAN_SPEC} plan + {PAYG_ACCOUNTS:,} "
                  f"pay-as-you-go, in both databases, built in {build.base_s:.1f} s")
    console.print(f"history: {rows:,} consume entries over {len(days)} day(s), "
                  f"{days[0]} .. {days[-1]} (UTC+8), each day settled")
    build_history(history, days, rows, build, console)
    t0 = time.perf_counter()
    build.entries = check_built(history, rows)
    empty_entries = check_built(empty, 0)
    build.checks_s = time.perf_counter() - t0
    build.size_bytes = history.stat().st_size
    console.print(f"built: history {build.entries:,} journal entries, "
                  f"{build.size_bytes / 2**30:.2f} GiB ({build.size_bytes / rows:,.0f} bytes "
                  f"per request); empty {empty_entries:,} entries; "
                  f"consume entries written at {rows / max(build.rows_s, 1e-9):,.0f}/s; checks "
                  f"(gap-free seq, units conserved) ok in {build.checks_s:.1f} s")
    return empty, history, build


# --------------------------------------------------------------------------- the server

class Server(Proc):
    """`python -m server serve` on one database; start() returns spawn -> SERVING seconds."""

    def __init__(self, name: str, db: Path, tmp: Path) -> None:
        port_file = tmp / f"{name}.json"
        super().__init__(name, [sys.executable, "-m", "server", "serve", "--listen",
                                "127.0.0.1:0", "--db", str(db), "--port-file", str(port_file),
                                "--log-level", "warning"], port_file, tmp / f"{name}.log")

    def start(self) -> float:  # type: ignore[override]
        self.port_file.unlink(missing_ok=True)
        t0 = time.perf_counter()
        super().start()
        return time.perf_counter() - t0

    def ready(self) -> None:
        with grpc.insecure_channel(self.target) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S, wait_for_ready=True)
        if status.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{self.name} server is not SERVING: {status}")


# --------------------------------------------------------------------------- measuring

async def warm(target: str, accounts: list[str]) -> None:
    """Connections, code paths, the engine's account cache."""
    await drive(target, accounts, {"shape": "batch", "batch_size": 1_000, "concurrency": 2},
                WARMUP_S)
    await drive(target, accounts, {"shape": "unary", "concurrency": 16}, WARMUP_S)


def one_run(run: int, dbs: dict[str, Path], tmp: Path, accounts: list[str], seconds: float,
            console: Console) -> dict[str, Any]:
    names = ["history", "empty"] if run % 2 == 0 else ["empty", "history"]
    servers = {name: Server(name, dbs[name], tmp) for name in names}
    out: dict[str, Any] = {"start_s": {}, "loads": {}}
    try:
        for name in names:
            out["start_s"][name] = servers[name].start()
        with LedgerClient(servers["history"].target) as c:
            out["history_seq"] = c.consume(accounts[0]).journal_seq
        console.print(f"  run {run + 1} server start: history {out['start_s']['history']:.2f} s,"
                      f" empty {out['start_s']['empty']:.2f} s (spawn -> SERVING); the history "
                      f"server continues the journal at entry {out['history_seq']:,}")

        async def loads() -> None:
            for name in names:
                await warm(servers[name].target, accounts)
            for measure in HISTORY_MEASURES:
                got: dict[str, LoadResult] = {}
                for name in names:
                    got[name] = await drive(servers[name].target, accounts, measure.load,
                                            seconds)
                    if got[name].error_total:
                        raise AssertionError(f"{name} {measure.label}: {got[name].errors}")
                out["loads"][measure.key] = {n: measure.value(r) for n, r in got.items()}
                h, e = out["loads"][measure.key]["history"], out["loads"][measure.key]["empty"]
                console.print(f"  run {run + 1} {measure.label}: history {h:,.0f} / empty "
                              f"{e:,.0f} {measure.unit} ({ratio(h, e):.3f}x)")

        asyncio.run(loads())
    finally:
        for server in servers.values():
            server.stop()
    return out


def report(runs: list[dict[str, Any]], build: Build, console: Console) -> list[dict[str, Any]]:
    table = Table(title=f"cost with history: {build.entries:,} journal entries against an "
                        "empty database (same accounts and plans); median of runs")
    for col, just in (("measure", "left"), ("figure", "left"), ("history", "right"),
                      ("empty", "right"), ("ratio", "right"), ("target", "left"),
                      ("verdict", "left"), ("per run (history)", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    rows: list[dict[str, Any]] = []

    def add(label: str, figure: str, hv: list[float], ev: list[float], fmt: str, target: str,
            met: bool) -> None:
        mh, me = median(hv), median(ev)
        q = median([ratio(a, b) for a, b in zip(hv, ev, strict=True)])
        table.add_row(label, figure, fmt.format(mh), fmt.format(me), f"{q:.3f}x", target,
                      "[green]MET[/]" if met else "[red]MISSED[/]",
                      ", ".join(fmt.format(x) for x in hv))
        rows.append({"measure": label, "figure": figure, "history": mh, "empty": me,
                     "ratio": q, "target": target, "met": met, "per_run_history": hv,
                     "per_run_empty": ev})

    hs = [r["start_s"]["history"] for r in runs]
    es = [r["start_s"]["empty"] for r in runs]
    add("server start, spawn -> health SERVING", "seconds", hs, es, "{:.2f}",
        f"history <= {START_SECONDS_MAX:g} s", median(hs) <= START_SECONDS_MAX)
    for measure in HISTORY_MEASURES:
        hv = [r["loads"][measure.key]["history"] for r in runs]
        ev = [r["loads"][measure.key]["empty"] for r in runs]
        q = median([ratio(a, b) for a, b in zip(hv, ev, strict=True)])
        add(measure.label, measure.unit, hv, ev, "{:,.0f}",
            f">= {THROUGHPUT_RATIO_MIN:.2f}x (within 20%)", q >= THROUGHPUT_RATIO_MIN)
    console.print(table)
    console.print(f"History: {build.rows:,} consume entries over {len(build.days)} day(s), "
                  f"built in {build.base_s + build.rows_s + build.settle_s:.1f} s (accounts "
                  f"{build.base_s:.1f} s, entries {build.rows_s:.1f} s, settlement "
                  f"{build.settle_s:.1f} s) + checks {build.checks_s:.1f} s. At start the "
                  f"server re-hashes a bounded tail (at most {TAIL_CHECK_ENTRIES:,} rows, "
                  "check_tail, by design) and loads live plans and overdue accounts; it "
                  "replays nothing. "
                  "Start times are warm-cache starts (the files were just written).")
    return rows


# --------------------------------------------------------------------------- main

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--rows", default=DEFAULT_ROWS, show_default=True, type=click.IntRange(1_000),
              help="Consume entries in the history database's journal.")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1),
              help="Repeat every measurement; the table shows the median.")
@click.option("--seconds", default=8.0, show_default=True, type=click.FloatRange(0.5),
              help="Duration of each load measurement.")
@click.option("--tmpdir", default=None, metavar="DIR",
              help="Where to build the databases (default: the system's temporary directory).")
@click.option("--verify", "full_verify", is_flag=True,
              help="Also run the full `quota-ledger verify` on the history (a whole replay, "
                   "streamed: memory does not grow with the journal).")
@click.option("--json-out", default=None, metavar="FILE", help="Write every figure as JSON.")
def main(rows: int, runs: int, seconds: float, tmpdir: str | None, full_verify: bool,
         json_out: str | None) -> None:
    """Throughput and start time on a long journal against an empty one; MET / MISSED."""
    console = Console() if sys.stdout.isatty() else Console(width=160)
    info = machine()
    console.print(f"machine: nproc {info['nproc']}, python {info['python']}, sqlite "
                  f"{info['sqlite']}, grpcio {info['grpcio']}, load average "
                  f"{info['loadavg_start'][0]:.2f}")
    console.print(f"settings: {rows:,} history rows, runs {runs}, {seconds:g} s per load")
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ledger-history-", dir=tmpdir) as tmp_name:
        tmp = Path(tmp_name)
        empty, history, build = build_all(tmp, rows, console)
        if full_verify:
            t0 = time.perf_counter()
            result = verify_db(str(history))
            assert result.ok, result.problems
            console.print(f"verify: ok, {result.entries:,} entries replayed in "
                          f"{time.perf_counter() - t0:.1f} s")
        plan_ids, payg_ids = account_ids()
        collected = [one_run(run, {"history": history, "empty": empty}, tmp,
                             plan_ids + payg_ids, seconds, console) for run in range(runs)]
        summary = report(collected, build, console)
    elapsed = closing_lines(console, info, t_all)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"machine": info, "rows": rows, "runs": runs, "seconds": seconds,
                       "build": build.__dict__, "per_run": collected, "rows_table": summary,
                       "elapsed_s": elapsed}, f, indent=2)
        console.print(f"figures written to {json_out}")


if __name__ == "__main__":
    main()
