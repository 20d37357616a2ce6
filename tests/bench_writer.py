"""The writer's own capacity, with no gRPC at all (issue 9, acceptance point 2).

    python -m tests.bench_writer [--accounts 1000] [--requests 200000] [--batch 1000]
                                 [--in-flight 4] [--rounds 3] [--seconds 20] [--front-us US]

A fresh SQLite ledger in a temporary directory (ledger.store.Store, the durable default:
WAL with synchronous=FULL), the engine and the writer built as server/app.py builds them (a
SystemClock, or --test-clock), accounts set up through ``writer.call``: every other account
(--plans-every N: every Nth; 1 is bench-batches' spread) holds a year-1m plan, the rest pay
as they go. Each round then drives, from one submitting thread, (a) consume groups
(``ConsumeRows``, as ConsumeBatch submits them) of --batch consumes, --in-flight of them
outstanding, and (b) single consumes (a row tuple each, as the unary Consume submits them),
64 outstanding, all through ``writer.submit``. Every command (random UUID4 request_ids,
uniform over the accounts, billable: slider/v2/step 3) is built before its phase is timed.
The engine's time per group (begin to commit) and the commit's (the writer's on_commit) are
summed; the wall time left over is the queue hop, answering, and the submitting thread (one
process: it shares the GIL with the writer). Both are also split into phases
(``tests/bench_phases.py``: validation, key lookups, engine, block, rows, keys, commit),
each in µs per request.

After every round the billable, new requests acknowledged so far must equal the units the
derived tables record (offsets_daily + usage_daily, read-only), or the bench fails.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ledger import catalog
from ledger import model as m
from ledger.clock import SystemClock, TestClock
from ledger.consume_group import ConsumeRows, GroupResult, row_of
from ledger.engine import Engine
from ledger.money import Region
from ledger.store import open_store
from ledger.writer import Batch, Writer, tune_gc

from .bench_phases import PHASES, Phases, validation_us
from .bench_postgres import Units

UNARY_IN_FLIGHT = 64
SETUP_BATCH = 1_000  # administrative commands per Batch during set-up
PLAN_SPEC = "year-1m"
PLAN_TOP_UP_MICROS = 600_000_000  # pays the year-1m plan (USD 500) with cash left over
PAYG_TOP_UP_MICROS = 100_000_000
WARMUP_REQUESTS = 5_000


class Timing:
    """Engine and commit seconds of each group, from the writer's own thread: ``begin`` to
    ``commit`` is the engine (due work, key prefetch, every command), ``on_commit`` gives the
    commit (Store.commit: block encoding, hash chain, SQL, fsync, key index)."""

    def __init__(self, engine: Engine) -> None:
        self.engine_s = self.commit_s = 0.0
        self._t_begin = 0.0
        begin, commit = engine.begin, engine.commit

        def timed_begin() -> Any:
            self._t_begin = time.perf_counter()
            return begin()

        def timed_commit() -> None:
            self.engine_s += time.perf_counter() - self._t_begin
            commit()

        engine.begin, engine.commit = timed_begin, timed_commit  # type: ignore[method-assign]

    def on_commit(self, n: int, seconds: float) -> None:
        self.commit_s += seconds


def build_consumes(ids: list[str], n: int, rng: random.Random) -> list[m.Consume]:
    regions = (Region.CHINESE_MAINLAND, Region.OUTSIDE_CHINESE_MAINLAND)
    return [m.Consume(ids[rng.randrange(len(ids))], str(uuid.uuid4()), regions[rng.randrange(2)],
                      m.CaptchaType.SLIDER, m.Architecture.V2, m.Step.STEP_3)
            for _ in range(n)]


def drive(writer: Writer, items: list[Any], in_flight: int, deadline: float,
          count: Callable[[Any], tuple[int, int]]) -> tuple[int, int]:
    """Submit items keeping ``in_flight`` outstanding (waiting on the oldest) until all are
    submitted or the deadline passes; returns (requests answered, units acknowledged)."""
    pending: deque = deque()
    done = units = 0
    for item in items:
        if len(pending) >= in_flight:
            d, u = count(pending.popleft().result())
            done, units = done + d, units + u
            if time.perf_counter() > deadline:
                break
        pending.append(writer.submit(item))
    while pending:
        d, u = count(pending.popleft().result())
        done, units = done + d, units + u
    return done, units


def as_rows(cmds: list[m.Consume]) -> ConsumeRows:
    """Commands as the consume rows a ConsumeBatch's front hands the writer."""
    return ConsumeRows(row_of(c) for c in cmds)


def count_batch(out: GroupResult) -> tuple[int, int]:
    """A consume group's answer: requests and units; a failure fails the bench."""
    if out.errors:
        raise AssertionError(f"a consume failed: {next(iter(out.errors.values()))!r}")
    return len(out), sum([b and not r for b, r in zip(out.billable, out.replayed, strict=True)])


def count_one(o: tuple[GroupResult, int]) -> tuple[int, int]:
    """A single consume's answer, (the group's columns, its index), as the server's unary
    Consume gets it (issue 18's lean path)."""
    out, j = o
    if out.errors and j in out.errors:
        raise AssertionError(f"a consume failed: {out.errors[j]!r}")
    return 1, 1 if out.billable[j] and not out.replayed[j] else 0


def phase(writer: Writer, timing: Timing, items: list[Any], in_flight: int, seconds: float,
          count: Callable[[Any], tuple[int, int]], phases: Phases | None = None,
          validation: float = 0.0) -> dict[str, float]:
    c0, r0 = writer.stats.commits, writer.stats.requests
    e0, k0 = timing.engine_s, timing.commit_s
    p0 = phases.snapshot() if phases is not None else {}
    t0 = time.perf_counter()
    done, units = drive(writer, items, in_flight, t0 + seconds, count)
    wall = time.perf_counter() - t0
    commits, reqs = writer.stats.commits - c0, writer.stats.requests - r0
    assert reqs == done, ("the writer's count and the answers differ", reqs, done)
    eng_us = (timing.engine_s - e0) / done * 1e6
    com_us = (timing.commit_s - k0) / done * 1e6
    out = {"req_s": done / wall, "requests": done, "units": units, "wall_s": wall,
           "commits": commits, "group": reqs / max(commits, 1), "engine_us": eng_us,
           "commit_us": com_us, "other_us": wall / done * 1e6 - eng_us - com_us}
    if phases is not None:
        out.update({f"phase {k}": v for k, v in phases.per_request_us(
            p0, timing.engine_s - e0, timing.commit_s - k0, done, validation).items()})
    return out


def setup(writer: Writer, n: int, plans_every: int = 2) -> list[str]:
    ids = [f"wb-{i:06d}" for i in range(n)]
    plan_ids = ids[::plans_every]
    plan_set = set(plan_ids)
    steps = [[m.CreateAccount(a) for a in ids],
             [m.TopUp(a, "wb-top-up", m.FundsKind.CASH,
                      PLAN_TOP_UP_MICROS if a in plan_set else PAYG_TOP_UP_MICROS) for a in ids],
             [m.PurchasePlan(a, "wb-plan", PLAN_SPEC) for a in plan_ids]]
    for cmds in steps:
        for i in range(0, len(cmds), SETUP_BATCH):
            for o in writer.call(Batch(cmds[i:i + SETUP_BATCH]), timeout_s=120):
                if o.error is not None:
                    raise AssertionError(f"set-up failed: {o.error!r}")
    return ids


def recorded_units(db: Path | str) -> int:
    """Units the derived tables record: taken from plans plus paid as you go."""
    return Units(str(db)).total()


ROWS = (("req/s", "req_s", "{:,.0f}"), ("mean group (requests)", "group", "{:,.1f}"),
        ("commits", "commits", "{:,.0f}"), ("engine µs/request", "engine_us", "{:.2f}"),
        ("commit µs/request", "commit_us", "{:.2f}"),
        *((f"  {p} µs/request", f"phase {p}", "{:.2f}") for p in PHASES),
        ("other µs/request (hop, answers, submitter)", "other_us", "{:.2f}"),
        ("requests answered", "requests", "{:,.0f}"))


def report(console: Console, rounds: list[dict[str, dict[str, float]]], args: Any) -> float:
    table = Table(title=f"writer capacity, no gRPC: median of {len(rounds)} rounds")
    for col, just in (("figure", "left"), ("batched", "right"), ("unary-like", "right"),
                      ("batched per round", "left"), ("unary-like per round", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for label, key, fmt in ROWS:
        b = [r["batch"][key] for r in rounds]
        u = [r["unary"][key] for r in rounds]
        table.add_row(label, fmt.format(statistics.median(b)), fmt.format(statistics.median(u)),
                      ", ".join(fmt.format(x) for x in b), ", ".join(fmt.format(x) for x in u))
    console.print(table)
    console.print(f"batched: Batch of {args.batch:,}, {args.in_flight} outstanding; unary-like: "
                  f"single consumes, {UNARY_IN_FLIGHT} outstanding; both through writer.submit "
                  "from one thread of the same process.")
    return statistics.median([r["batch"]["req_s"] for r in rounds])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench_writer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accounts", type=int, default=1_000)
    p.add_argument("--requests", type=int, default=200_000, help="per phase per round")
    p.add_argument("--batch", type=int, default=1_000)
    p.add_argument("--in-flight", type=int, default=4, help="batches outstanding")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0, help="cap per phase per round")
    p.add_argument("--front-us", type=float, default=None,
                   help="the gRPC front's measured cost per request per core, in µs")
    p.add_argument("--test-clock", action="store_true", help="a TestClock (no due work)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--plans-every", type=int, default=2, choices=range(1, 1001), metavar="N",
                   help="every Nth account holds a plan (1: each, as bench-batches' spread)")
    p.add_argument("--db", default=None, help="a postgresql:// URL of an empty database "
                   "(default: a fresh SQLite file)")
    p.add_argument("--phases", default="batch,unary", help="which phases to run (profiling)")
    args = p.parse_args(argv)
    if min(args.accounts, args.requests, args.batch, args.in_flight, args.rounds) < 1:
        p.error("counts must be positive")
    console = Console() if sys.stdout.isatty() else Console(width=160)
    load0 = os.getloadavg()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="ledger-bench-writer-") as tmp:
        db: Path | str = args.db or Path(tmp) / "ledger.db"
        store = open_store(str(db))
        clock = TestClock() if args.test_clock else SystemClock()
        engine = Engine(store, clock, catalog.builtin())
        timing = Timing(engine)
        phases = Phases(engine)
        writer = Writer(engine, on_commit=timing.on_commit)
        writer.start()
        try:
            t0 = time.perf_counter()
            ids = setup(writer, args.accounts, args.plans_every)
            tune_gc()  # as the server does before its writer starts
            console.print(f"{len(ids):,} accounts ({len(ids[::args.plans_every]):,} with a "
                          f"{PLAN_SPEC} plan) "
                          f"set up in {time.perf_counter() - t0:.1f} s; "
                          f"{'test' if args.test_clock else 'system'} clock; db {db}")
            units = 0
            warm = build_consumes(ids, WARMUP_REQUESTS, rng)
            units += phase(writer, timing, [as_rows(warm[:args.batch])], 1, 60,
                           count_batch)["units"]
            units += phase(writer, timing, [row_of(c) for c in warm[args.batch:]],
                           UNARY_IN_FLIGHT, 60,
                           count_one)["units"]
            rounds: list[dict[str, dict[str, float]]] = []
            for r in range(args.rounds):
                n_b, n_u = (args.requests if k in args.phases else 1 for k in ("batch", "unary"))
                cmds = build_consumes(ids, n_b, rng)
                batches = [as_rows(cmds[i:i + args.batch]) for i in range(0, n_b, args.batch)]
                del cmds
                valid = validation_us(ids)
                b = phase(writer, timing, batches, args.in_flight, args.seconds, count_batch,
                          phases, valid)
                del batches
                cmds = [row_of(c) for c in build_consumes(ids, n_u, rng)]
                u = phase(writer, timing, cmds, UNARY_IN_FLIGHT, args.seconds, count_one, phases,
                          valid)
                del cmds
                units += b["units"] + u["units"]
                got = recorded_units(db)
                if got != units:
                    raise SystemExit(f"FAILED: {units:,} units acknowledged but {got:,} "
                                     "recorded in offsets_daily + usage_daily")
                rounds.append({"batch": b, "unary": u})
                console.print(
                    f"  round {r + 1}: batched {b['req_s']:,.0f} req/s (group {b['group']:,.0f},"
                    f" engine {b['engine_us']:.2f} + commit {b['commit_us']:.2f} µs/req); "
                    f"unary-like {u['req_s']:,.0f} req/s (group {u['group']:,.1f}, engine "
                    f"{u['engine_us']:.2f} + commit {u['commit_us']:.2f} µs/req); units "
                    f"acknowledged {units:,} = recorded {got:,}")
        finally:
            writer.stop()
            store.close()
            phases.close()
    x = report(console, rounds, args)
    line = f"model: one writer sustains {x:,.0f} req/s in batches"
    if args.front_us:
        line += (f"; at the measured gRPC front cost of {args.front_us:g} µs/request per core, "
                 f"feeding it takes {x * args.front_us / 1e6:.2f} cores of front "
                 f"(one core of front carries {1e6 / args.front_us:,.0f} req/s)")
    console.print(line)
    console.print(f"load average {load0[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the "
                  f"end, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
