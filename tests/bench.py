"""`make bench`: the ledger against a do-nothing baseline on the same gRPC stack, in one run.

    python -m tests.bench [--runs 3] [--seconds 8] [--quick] [--json-out FILE]

It starts the real server (`python -m server serve`, a temporary database, the durable
default: WAL with synchronous=FULL) and `tests.baseline_server` as subprocesses on free
loopback ports, creates accounts on the ledger (each with a year-100m plan so requests are
plan-covered, plus some pay-as-you-go accounts), and drives both with the same
`clients.loadgen.run_load` traffic. In-process it also measures the SQLite ceiling (the same
journal rows in plain batched inserts), the SQLite commit floor (one journal row per
transaction, WAL + synchronous=FULL, on the filesystem of the ledger's database: the physical
floor under the 1-in-flight latency) and settlement against a bare SQL aggregation.

Every load is bounded in count and time, all traffic is on 127.0.0.1, each figure is the
median over --runs (ledger and baseline alternate who goes first), and each target is marked
MET or MISSED from what was measured in this run.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import grpc
from rich.console import Console
from rich.table import Table

from clients.loadgen import LoadConfig, LoadResult, prepare_accounts, run_load
from ledger import calendar as cal
from ledger import catalog
from ledger import model as m
from ledger.clock import TestClock
from ledger.engine import Engine
from ledger.money import Region, payg_cost_micros
from ledger.store import Store, UnitOfWork, canonical_json, chain_hash
from ledger.writer import GROUP_REQUESTS_MAX

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
LOAD_REQUESTS_CAP = 10_000_000  # every load stops at this count or at --seconds
INSERT_TXN_ROWS = 1_000  # the SQLite ceiling: executemany in transactions of 1,000 rows
COMMIT_FLOOR_COMMITS_MAX = 20_000  # the commit floor: at most this many commits, or --seconds
SETTLE_DAY = "2027-03-10"  # the settlement journal's day (a fixed day, a test clock)


@dataclass(frozen=True)
class Sizes:
    plan_accounts: int
    payg_accounts: int
    settle_requests: int
    settle_accounts: int
    ceiling_rows_max: int
    warmup_s: float


FULL = Sizes(plan_accounts=1_000, payg_accounts=100, settle_requests=1_000_000,
             settle_accounts=10_000, ceiling_rows_max=2_000_000, warmup_s=1.5)
QUICK = Sizes(plan_accounts=50, payg_accounts=10, settle_requests=20_000,
              settle_accounts=200, ceiling_rows_max=20_000, warmup_s=0.5)


# --------------------------------------------------------------------------- subprocesses

class Proc:
    """A server subprocess that writes its ports to a JSON file once serving."""

    def __init__(self, name: str, cmd: list[str], port_file: Path, log: Path) -> None:
        self.name, self.cmd, self.port_file, self.log_path = name, cmd, port_file, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Proc:
        env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self.log, stderr=self.log,
                                     env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        self.port = json.loads(self.port_file.read_text())["grpc"]
        self.ready()
        return self

    def ready(self) -> None:
        """Block until the server answers (a subclass may check more)."""
        with grpc.insecure_channel(self.target) as ch:
            grpc.channel_ready_future(ch).result(timeout=START_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self.log.close()
            self.proc = None


# --------------------------------------------------------------------------- journal rows

class ConsumeRows:
    """Journal rows exactly as the engine writes a plan-covered or pay-as-you-go Consume
    (payload layout, canonical JSON, fingerprint, SHA-256 chain), built with string
    formatting instead of json.dumps; :meth:`check` proves the equivalence on real rows."""

    FINGERPRINT = "{region}|1|1|1||1"  # slider, v2, step 3, no scenario, quantity 1

    def __init__(self, next_seq: int, last_hash: bytes, day: str) -> None:
        self.next_seq, self.last_hash, self.day = next_seq, last_hash, day

    @staticmethod
    def payload(region: int, plan_id: str | None, payg_micros: int, day: str,
                remaining: int) -> str:
        alloc = f'[["{plan_id}",1]]' if plan_id else "[]"
        payg = 0 if plan_id else 1
        return (f'{{"region":{region},"type":1,"arch":1,"step":1,"qty":1,"alloc":{alloc},'
                f'"payg_units":{payg},"payg_micros":{payg_micros},"day":"{day}",'
                f'"remaining":{remaining}}}')

    def row(self, at_us: int, account_id: str, region: int, plan_id: str | None,
            payg_micros: int, remaining: int) -> tuple:
        seq = self.next_seq
        request_id = f"bench-{seq}"
        payload = self.payload(region, plan_id, payg_micros, self.day, remaining)
        self.last_hash = chain_hash(self.last_hash, seq, at_us, "consume", account_id,
                                    request_id, payload)
        self.next_seq += 1
        return (seq, at_us, "consume", account_id, request_id,
                self.FINGERPRINT.format(region=region), payload, self.last_hash)

    @classmethod
    def check(cls, store: Store) -> None:
        """Formatted payloads and fingerprints equal those of consumes the engine wrote."""
        found = 0
        for payload_json, fingerprint in store.conn.execute(
                "SELECT payload, fingerprint FROM journal WHERE kind = 'consume' LIMIT 50"):
            p = json.loads(payload_json)
            plan_id = p["alloc"][0][0] if p["alloc"] else None
            mine = cls.payload(p["region"], plan_id, p["payg_micros"], p["day"], p["remaining"])
            assert mine == payload_json == canonical_json(p), (mine, payload_json)
            assert cls.FINGERPRINT.format(region=p["region"]) == fingerprint, fingerprint
            found += 1
        assert found, "no consume written by the engine to compare with"


# --------------------------------------------------------------------------- SQLite ceiling

def sqlite_ceiling(tmp: Path, seconds: float, rows_max: int) -> dict[str, float]:
    """Journal rows/s that the same SQLite settings (ledger.store: WAL, synchronous=FULL, the
    journal's indexes and triggers) accept in plain executemany inserts of 1,000 rows per
    transaction. Only the insert and commit are timed, not building the rows."""
    path = tmp / f"ceiling-{time.monotonic_ns()}.db"
    store = Store(path)
    try:
        rows = ConsumeRows(1, store.journal_tail()[1], SETTLE_DAY)
        t_us = cal.day_start(SETTLE_DAY) + 3_600_000_000
        timed, n = 0.0, 0
        conn = store.conn
        while timed < seconds and n < rows_max:
            chunk = [rows.row(t_us + n + i, f"acct-{(n + i) % 1000:04d}", 1, "plan-7", 0, 10**8)
                     for i in range(INSERT_TXN_ROWS)]
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO journal VALUES (?,?,?,?,?,?,?,?)", chunk)
            conn.execute("COMMIT")
            timed += time.perf_counter() - t0
            n += len(chunk)
        return {"rows": n, "timed_s": timed, "rows_per_s": n / timed}
    finally:
        store.close()
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def sqlite_commit_floor(tmp: Path, seconds: float, commits_max: int) -> dict[str, float]:
    """The bare latency of one SQLite commit: one journal row per transaction (BEGIN
    IMMEDIATE, INSERT, COMMIT) with the ledger's settings (ledger.store.Store: WAL,
    synchronous=FULL, the journal's index and triggers), in ``tmp``, the directory that holds
    the ledger's database, so on the same filesystem. Each commit is timed alone (building
    the row is not); SQLite's automatic WAL checkpoints fall inside the timed commits, as
    they do in the server. No request can be durably acknowledged faster than this."""
    path = tmp / f"commit-floor-{time.monotonic_ns()}.db"
    store = Store(path)
    try:
        rows = ConsumeRows(1, store.journal_tail()[1], SETTLE_DAY)
        t_us = cal.day_start(SETTLE_DAY) + 3_600_000_000
        conn = store.conn
        latencies_s: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(latencies_s) < commits_max and time.perf_counter() < deadline:
            n = len(latencies_s)
            row = rows.row(t_us + n, f"acct-{n % 1000:04d}", 1, "plan-7", 0, 10**8)
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO journal VALUES (?,?,?,?,?,?,?,?)", row)
            conn.execute("COMMIT")
            latencies_s.append(time.perf_counter() - t0)
        latencies_s.sort()
        return {"commits": len(latencies_s), "p50_ms": nearest_rank(latencies_s, 50) * 1e3,
                "p99_ms": nearest_rank(latencies_s, 99) * 1e3,
                "commits_per_s": len(latencies_s) / sum(latencies_s)}
    finally:
        store.close()
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def nearest_rank(sorted_xs: list[float], pct: float) -> float:
    """The pct-th percentile of sorted values (nearest rank: a value that was measured)."""
    if not sorted_xs:
        return float("nan")
    k = max(0, min(len(sorted_xs) - 1, -(-len(sorted_xs) * pct // 100) - 1))
    return sorted_xs[int(k)]


# --------------------------------------------------------------------------- settlement

def build_settlement_journal(path: Path, sizes: Sizes, console: Console) -> dict[str, Any]:
    """A ledger database whose journal holds ``settle_requests`` billable requests over
    ``settle_accounts`` accounts on SETTLE_DAY.

    How it is built, and why: accounts, top-ups and plan purchases go through the engine
    (real commands, real plan rows). The consume entries do not: through ConsumeBatch, or
    the engine in-process, a request costs the engine's per-request work (~90 us on a busy
    core here, i.e. 1.5 min or more for 1,000,000), which would eat most of the bench's
    10-minute budget before anything is measured. Settlement never replays consume entries;
    it reads the derived tables (usage_daily, offsets_daily, plans) that the engine writes in
    the same transaction. So the bench writes the same consume rows and the same derived
    rows the engine would, in the engine's own transaction path (Store.commit of a
    UnitOfWork, 4,096 requests per commit like the writer's groups), with the engine's
    payload layout, fingerprint and hash chain (ConsumeRows.check compares it with entries
    the engine wrote itself). Half the accounts hold a year-1m plan, half pay as you go,
    regions alternate."""
    t_start = time.perf_counter()
    day0 = cal.day_start(SETTLE_DAY)
    clock = TestClock(day0 + 3_600_000_000)  # 01:00 UTC+8
    store = Store(path)
    engine = Engine(store, clock, catalog.builtin())
    ids = [f"settle-{i:05d}" for i in range(sizes.settle_accounts)]

    def group(cmds: list[Any]) -> None:
        engine.begin()
        engine.prefetch_keys(cmds)
        for c in cmds:
            engine.execute(c)
        engine.commit()

    for i in range(0, len(ids), GROUP_REQUESTS_MAX):
        part = ids[i:i + GROUP_REQUESTS_MAX]
        group([m.CreateAccount(a) for a in part])
        group([m.TopUp(a, "bench-top-up", m.FundsKind.CASH, 1_000_000_000) for a in part])
        group([m.PurchasePlan(a, "bench-plan", "year-1m") for a in part[::2]])
    # A few consumes through the engine itself: the reference for ConsumeRows.check.
    group([m.Consume(a, f"engine-{a}", Region(1 + k % 2), m.CaptchaType.SLIDER,
                     m.Architecture.V2, m.Step.STEP_3) for k, a in enumerate(ids[:20])])
    ConsumeRows.check(store)
    plans = {p.account_id: p for p in store.load_plans("WHERE units_remaining > 0")}
    remaining = {a: p.units_remaining for a, p in plans.items()}
    seq, last_hash, _ = store.journal_tail()
    rows = ConsumeRows(seq + 1, last_hash, SETTLE_DAY)
    n_total = sizes.settle_requests - 20
    span_us = 20 * 3_600_000_000  # 02:00 .. 22:00 UTC+8
    t_us0 = day0 + 2 * 3_600_000_000
    n = 0
    while n < n_total:
        k = min(GROUP_REQUESTS_MAX, n_total - n)
        uow = UnitOfWork(last_hash=rows.last_hash, next_seq=rows.next_seq)
        for j in range(n, n + k):
            account_id = ids[j % len(ids)]
            region = 1 + (j // len(ids)) % 2
            at = t_us0 + j * span_us // n_total
            plan = plans.get(account_id)
            if plan is not None:
                remaining[account_id] -= 1
                key = (account_id, SETTLE_DAY, plan.plan_id)
                uow.offsets[key] = uow.offsets.get(key, 0) + 1
                uow.rows.append(rows.row(at, account_id, region, plan.plan_id, 0,
                                         remaining[account_id]))
            else:
                micros = payg_cost_micros(Region(region), 1)
                acc = uow.usage.setdefault((account_id, SETTLE_DAY, region), [0, 0])
                acc[0] += 1
                acc[1] += micros
                uow.rows.append(rows.row(at, account_id, region, None, micros, 0))
        for account_id in {ids[j % len(ids)] for j in range(n, n + k)} & plans.keys():
            plan = plans[account_id]
            plan.units_remaining = remaining[account_id]
            uow.plans[plan.plan_id] = plan
        uow.last_hash, uow.next_seq = rows.last_hash, rows.next_seq
        store.commit(uow)
        n += k
    consumes = store.conn.execute(
        "SELECT count(*) FROM journal WHERE kind = 'consume'").fetchone()[0]
    store.close()  # checkpoints (TRUNCATE): the copies below need only the main file
    built_s = time.perf_counter() - t_start
    console.print(f"settlement journal: {consumes:,} consume entries over {len(ids):,} "
                  f"accounts on {SETTLE_DAY}, built in {built_s:.1f} s")
    return {"consume_entries": consumes, "accounts": len(ids), "built_s": built_s}


def measure_settlement(db: Path, tmp: Path, run: int) -> dict[str, Any]:
    """On a fresh copy of the journal: the bare SQL aggregation, then SettleDay (a freshly
    opened engine settling the day: reading figures, issuing and paying every bill,
    committing with one fsync). Both run on the same, page-cache-warm file."""
    copy = tmp / f"settle-run{run}.db"
    shutil.copyfile(db, copy)
    try:
        conn = sqlite3.connect(copy, isolation_level=None)
        t0 = time.perf_counter()
        sums = conn.execute(
            "SELECT account_id, sum(json_extract(payload, '$.payg_units')) FROM journal"
            " WHERE kind = 'consume' GROUP BY account_id").fetchall()
        sql_s = time.perf_counter() - t0
        conn.close()
        store = Store(copy)
        try:
            engine = Engine(store, TestClock(cal.day_end(SETTLE_DAY) + 1_000_000),
                            catalog.builtin())
            t0 = time.perf_counter()
            engine.begin()
            bills = engine.execute(m.SettleDay(SETTLE_DAY))
            engine.commit()
            settle_s = time.perf_counter() - t0
        finally:
            store.close()
        payg_sql = sum(s or 0 for _, s in sums)
        payg_billed = sum(ln.quantity for b in bills for ln in b.lines
                          if ln.item == "verification")
        assert payg_billed == payg_sql, ("bills and journal disagree", payg_billed, payg_sql)
        assert len(bills) == len(sums), ("one bill per active account", len(bills), len(sums))
        return {"settle_s": settle_s, "sql_s": sql_s, "bills": len(bills),
                "payg_units": payg_sql}
    finally:
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)


# --------------------------------------------------------------------------- the measures

@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    load: dict[str, Any]
    value: Callable[[LoadResult], float]
    unit: str


MEASURES = (
    Measure("unary64", "Consume, 64 in flight", {"shape": "unary", "concurrency": 64},
            lambda r: r.calls_per_s, "calls/s"),
    Measure("unary1", "Consume, 1 in flight", {"shape": "unary", "concurrency": 1},
            lambda r: r.p50_ms, "p50 ms"),
    Measure("stream", "ConsumeStream, 64 in flight (4 streams)",
            {"shape": "stream", "concurrency": 64, "streams": 4},
            lambda r: r.rate_per_s, "messages/s"),
    Measure("batch", "ConsumeBatch x1,000, 4 calls in flight",
            {"shape": "batch", "batch_size": 1_000, "concurrency": 4},
            lambda r: r.billable / r.elapsed_s, "billable req/s"),
)


@dataclass
class Collected:
    runs: list[dict[str, Any]] = field(default_factory=list)


async def drive(target: str, accounts: list[str], load: dict[str, Any], seconds: float
                ) -> LoadResult:
    result = await run_load(LoadConfig(target=target, account_ids=accounts,
                                       requests=LOAD_REQUESTS_CAP, duration_s=seconds, **load))
    if not result.consistent:
        raise AssertionError(f"loadgen lost count: {result.to_dict()}")
    return result


def _summary(r: LoadResult) -> dict[str, Any]:
    d = r.to_dict()
    d.pop("series")
    return d


async def network_run(ledger: Proc, baseline: Proc, accounts: list[str], seconds: float,
                      run: int, console: Console) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for measure in MEASURES:
        order = [("ledger", ledger), ("baseline", baseline)]
        if run % 2:
            order.reverse()
        got: dict[str, LoadResult] = {}
        for name, proc in order:
            got[name] = await drive(proc.target, accounts, measure.load, seconds)
        out[measure.key] = {name: _summary(r) for name, r in got.items()}
        lv, bv = measure.value(got["ledger"]), measure.value(got["baseline"])
        errors = {k: v for n in ("ledger", "baseline") for k, v in got[n].errors.items()}
        console.print(f"  run {run + 1} {measure.label}: ledger {lv:,.3f} / baseline {bv:,.3f}"
                      f" {measure.unit}" + (f"  errors {errors}" if errors else ""))
    return out


async def setup_and_warm(ledger: Proc, baseline: Proc, sizes: Sizes, console: Console
                         ) -> list[str]:
    t0 = time.perf_counter()
    plan_cfg = LoadConfig(target=ledger.target, accounts=sizes.plan_accounts,
                          account_prefix="bench-plan-", plan="year-100m",
                          top_up_micros=10_000_000)
    payg_cfg = LoadConfig(target=ledger.target, accounts=sizes.payg_accounts,
                          account_prefix="bench-payg-", top_up_micros=100_000_000)
    await prepare_accounts(plan_cfg)
    await prepare_accounts(payg_cfg)
    accounts = plan_cfg.ids() + payg_cfg.ids()
    console.print(f"accounts: {sizes.plan_accounts:,} with a year-100m plan + "
                  f"{sizes.payg_accounts:,} pay-as-you-go, created in "
                  f"{time.perf_counter() - t0:.1f} s")
    for proc in (ledger, baseline):  # connections, code paths, the engine's account cache
        await drive(proc.target, accounts, {"shape": "batch", "batch_size": 1_000,
                                            "concurrency": 2}, sizes.warmup_s)
        await drive(proc.target, accounts, {"shape": "unary", "concurrency": 16},
                    sizes.warmup_s)
    return accounts


# --------------------------------------------------------------------------- the report

def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def report(runs: list[dict[str, Any]], console: Console, sizes: Sizes) -> dict[str, Any]:
    table = Table(title="quota-ledger against references: median of runs, "
                        "ratio = ledger / reference")
    for col, just in (("measure", "left"), ("figure", "left"), ("ledger", "right"),
                      ("reference", "left"), ("value", "right"), ("ratio", "right"),
                      ("target", "left"), ("verdict", "left"), ("per run", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    rows: list[dict[str, Any]] = []

    def add(label: str, figure: str, lv: list[float], ref: str, rv: list[float], fmt: str,
            target: str, met: Callable[[float, float, float], bool] | None, on: str) -> None:
        """on: which per-run figure the target applies to: 'ratio' or 'ledger'."""
        ratios = [ratio(a, b) for a, b in zip(lv, rv, strict=True)]
        ml, mr, mq = median(lv), median(rv), median(ratios)
        ok = met(ml, mr, mq) if met is not None else None
        per_run = [f"{x:.3f}x" for x in ratios] if on == "ratio" else [fmt.format(x)
                                                                        for x in lv]
        table.add_row(label, figure, fmt.format(ml), ref, fmt.format(mr), f"{mq:.3f}x", target,
                      "info" if ok is None else "[green]MET[/]" if ok else "[red]MISSED[/]",
                      ", ".join(per_run))
        rows.append({"measure": label, "figure": figure, "reference": ref, "ledger": ml,
                     "reference_value": mr, "ratio": mq, "target": target, "met": ok,
                     "per_run_ledger": lv, "per_run_reference": rv, "per_run_ratio": ratios})

    def series(key: str, who: str, f: Callable[[dict[str, Any]], float]) -> list[float]:
        return [f(r["network"][key][who]) for r in runs]

    base = "baseline server"
    add("Consume unary, 64 in flight", "calls/s",
        series("unary64", "ledger", lambda d: d["calls_per_s"]), base,
        series("unary64", "baseline", lambda d: d["calls_per_s"]), "{:,.0f}",
        ">= 0.85x", lambda ml, mr, q: q >= 0.85, "ratio")
    add("Consume unary, 1 in flight", "p50 ms",
        series("unary1", "ledger", lambda d: d["p50_ms"]), base,
        series("unary1", "baseline", lambda d: d["p50_ms"]), "{:.3f}",
        "<= 1.5x", lambda ml, mr, q: q <= 1.5, "ratio")
    add("Consume unary, 1 in flight", "p99 ms",
        series("unary1", "ledger", lambda d: d["p99_ms"]), base,
        series("unary1", "baseline", lambda d: d["p99_ms"]), "{:.3f}",
        "ledger <= 2 ms", lambda ml, mr, q: ml <= 2.0, "ledger")
    floor = "SQLite 1-row commit (WAL+FULL)"
    add("Consume unary, 1 in flight", "p50 ms",
        series("unary1", "ledger", lambda d: d["p50_ms"]), floor,
        [r["commit_floor"]["p50_ms"] for r in runs], "{:.3f}", "(physical floor)", None,
        "ratio")
    add("Consume unary, 1 in flight", "p99 ms",
        series("unary1", "ledger", lambda d: d["p99_ms"]), floor,
        [r["commit_floor"]["p99_ms"] for r in runs], "{:.3f}", "(physical floor)", None,
        "ratio")
    add("ConsumeStream, 64 in flight", "messages/s",
        series("stream", "ledger", lambda d: d["rate_per_s"]), base,
        series("stream", "baseline", lambda d: d["rate_per_s"]), "{:,.0f}",
        ">= 0.8x", lambda ml, mr, q: q >= 0.8, "ratio")
    batch_l = series("batch", "ledger", lambda d: d["billable"] / d["elapsed_s"])
    add("ConsumeBatch x1,000, 4 in flight", "billable req/s", batch_l, base,
        series("batch", "baseline", lambda d: d["billable"] / d["elapsed_s"]), "{:,.0f}",
        "ledger >= 100,000/s", lambda ml, mr, q: ml >= 100_000, "ledger")
    add("ConsumeBatch x1,000, 4 in flight", "billable req/s", batch_l,
        "SQLite ceiling (journal rows/s)", [r["ceiling"]["rows_per_s"] for r in runs],
        "{:,.0f}", "(physical ceiling)", None, "ratio")
    add(f"SettleDay, {sizes.settle_requests:,} req / {sizes.settle_accounts:,} accounts",
        "seconds", [r["settlement"]["settle_s"] for r in runs], "bare SQL GROUP BY",
        [r["settlement"]["sql_s"] for r in runs], "{:.3f}", "<= 3x",
        lambda ml, mr, q: q <= 3.0, "ratio")
    console.print(table)
    console.print("SQLite ceiling: the same journal rows inserted by executemany, 1,000 per "
                  "transaction, WAL + synchronous=FULL (ledger.store.Store). Bare SQL: SELECT "
                  "account_id, sum(json_extract(payload,'$.payg_units')) FROM journal WHERE "
                  "kind='consume' GROUP BY account_id.")
    console.print("SQLite 1-row commit: BEGIN IMMEDIATE, one journal row, COMMIT, each timed "
                  "alone, WAL + synchronous=FULL, in the ledger database's directory (same "
                  "filesystem); p50/p99 over up to "
                  f"{COMMIT_FLOOR_COMMITS_MAX:,} commits or --seconds per run.")
    return {"rows": rows}


def closing_lines(console: Console, info: dict[str, Any], t_all: float) -> float:
    """The load at the end and the whole run's time, with a warning on a busy machine."""
    info["loadavg_end"] = os.getloadavg()
    elapsed = time.perf_counter() - t_all
    console.print(f"load average at the end {info['loadavg_end'][0]:.2f} on {info['nproc']} "
                  f"cores; bench took {elapsed:.0f} s")
    if max(info["loadavg_start"][0], info["loadavg_end"][0]) > info["nproc"]:
        console.print("[yellow]note: the machine was busier than its core count during this "
                      "run; absolute figures are noisy (the ratios less so).[/]")
    return elapsed


def machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {"nproc": usable, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "grpcio": grpc.__version__,
            "platform": platform.platform(), "loadavg_start": os.getloadavg()}


# --------------------------------------------------------------------------- main

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1),
              help="Repeat every measurement; the table shows the median.")
@click.option("--seconds", default=None, type=click.FloatRange(0.2),
              help="Duration of each load measurement, of the SQLite ceiling and of the "
                   "SQLite commit floor "
                   "[default: 8; 1 with --quick].")
@click.option("--quick", is_flag=True, help="Tiny sizes and 1 s loads: a smoke run.")
@click.option("--json-out", default=None, metavar="FILE", help="Write every figure as JSON.")
def main(runs: int, seconds: float | None, quick: bool, json_out: str | None) -> None:
    """Benchmark the ledger against the baseline server; print MET / MISSED per target."""
    console = Console() if sys.stdout.isatty() else Console(width=160)
    sizes = QUICK if quick else FULL
    if seconds is None:
        seconds = 1.0 if quick else 8.0
    info = machine()
    console.print(f"machine: nproc {info['nproc']} (cpu_count {info['cpu_count']}), "
                  f"python {info['python']}, sqlite {info['sqlite']}, grpcio {info['grpcio']}, "
                  f"load average {info['loadavg_start'][0]:.2f}")
    console.print(f"settings: runs {runs}, {seconds:g} s per measurement"
                  f"{', quick sizes' if quick else ''}")
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp_name:
        tmp = Path(tmp_name)
        py = sys.executable
        ledger = Proc("ledger", [py, "-m", "server", "serve", "--listen", "127.0.0.1:0",
                                 "--db", str(tmp / "ledger.db"), "--port-file",
                                 str(tmp / "ledger.json"), "--log-level", "warning"],
                      tmp / "ledger.json", tmp / "ledger.log")
        baseline = Proc("baseline", [py, "-m", "tests.baseline_server", "--listen",
                                     "127.0.0.1:0", "--port-file", str(tmp / "baseline.json")],
                        tmp / "baseline.json", tmp / "baseline.log")
        collected: list[dict[str, Any]] = []
        try:
            ledger.start()
            baseline.start()
            mode = sqlite3.connect(f"file:{tmp / 'ledger.db'}?mode=ro", uri=True).execute(
                "PRAGMA journal_mode").fetchone()[0]
            console.print(f"ledger on {ledger.target} (journal_mode {mode}, synchronous FULL "
                          f"by default), baseline on {baseline.target}")
            settle_db = tmp / "settle.db"
            settle_info = build_settlement_journal(settle_db, sizes, console)

            async def network() -> None:
                accounts = await setup_and_warm(ledger, baseline, sizes, console)
                for run in range(runs):
                    net = await network_run(ledger, baseline, accounts, seconds, run, console)
                    ceiling = sqlite_ceiling(tmp, seconds, sizes.ceiling_rows_max)
                    console.print(f"  run {run + 1} SQLite ceiling: "
                                  f"{ceiling['rows_per_s']:,.0f} rows/s")
                    commit_floor = sqlite_commit_floor(tmp, seconds, COMMIT_FLOOR_COMMITS_MAX)
                    console.print(f"  run {run + 1} SQLite 1-row commit: p50 "
                                  f"{commit_floor['p50_ms']:.3f} ms, p99 "
                                  f"{commit_floor['p99_ms']:.3f} ms over "
                                  f"{commit_floor['commits']:,} commits")
                    settle = measure_settlement(settle_db, tmp, run)
                    console.print(f"  run {run + 1} settlement: SettleDay "
                                  f"{settle['settle_s']:.3f} s, bare SQL {settle['sql_s']:.3f} s"
                                  f" ({settle['bills']:,} bills)")
                    collected.append({"network": net, "ceiling": ceiling,
                                      "commit_floor": commit_floor,
                                      "settlement": settle})

            asyncio.run(network())
        finally:
            ledger.stop()
            baseline.stop()
        summary = report(collected, console, sizes)
    elapsed = closing_lines(console, info, t_all)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"machine": info, "runs": runs, "seconds": seconds, "quick": quick,
                       "settlement_journal": settle_info, "per_run": collected,
                       **summary, "elapsed_s": elapsed}, f, indent=2)
        console.print(f"figures written to {json_out}")


if __name__ == "__main__":
    main()
