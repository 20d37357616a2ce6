"""The SQLite side of `make bench`: the SQLite ceiling (one JSON journal row per request, the
format before consume blocks) and commit floor on the ledger's settings, and the settlement
journal (consume blocks, as the engine writes them) and its measurement. Nothing here talks
gRPC (that is tests/bench.py and tests/bench_loads.py)."""

from __future__ import annotations

import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ledger import calendar as cal
from ledger import catalog
from ledger import model as m
from ledger.clock import TestClock
from ledger.engine import Engine
from ledger.money import Region, payg_cost_micros
from ledger.store import Store, UnitOfWork, blocks, chain_hash, consume_entries
from ledger.store.sqlite import CHECKPOINT_INTERVAL_S
from ledger.writer import GROUP_REQUESTS_MAX

INSERT_TXN_ROWS = 1_000  # the SQLite ceiling: executemany in transactions of 1,000 rows
COMMIT_FLOOR_COMMITS_MAX = 20_000  # the commit floor: at most this many commits, or --seconds
# Untimed commits before the floor's: two of the checkpointer's runs, so the WAL has grown to
# the size it then keeps (a WAL that grows makes each fdatasync write the file's size too).
COMMIT_FLOOR_WARMUP_S = 2 * CHECKPOINT_INTERVAL_S
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



# --------------------------------------------------------------------------- journal rows

class ConsumeRows:
    """Journal rows as the engine wrote a plan-covered Consume before consume blocks: one
    row per request (JSON payload, fingerprint, SHA-256 chain, the idempotency index), the
    row shape of the SQLite ceiling and the commit floor."""

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
    the row is not). Between two commits the WAL is let start over as the ledger's writer
    lets it (``Store.restart_wal``, untimed, as the writer's is done after its reply), after
    ``COMMIT_FLOOR_WARMUP_S`` of untimed commits that let the WAL reach its steady size: until
    the fifteenth sitting it was not, the WAL grew by every commit (200 MB in 20,000) and
    each fdatasync also wrote the file's size, which the ledger's own commits do not (the
    floor then read 0.22-0.27 ms at the p50 against 0.14-0.15 with the WAL reused). No
    request can be durably acknowledged faster than this."""
    path = tmp / f"commit-floor-{time.monotonic_ns()}.db"
    store = Store(path)
    try:
        rows = ConsumeRows(1, store.journal_tail()[1], SETTLE_DAY)
        t_us = cal.day_start(SETTLE_DAY) + 3_600_000_000
        conn = store.conn
        latencies_s: list[float] = []
        cpu_s = 0.0  # this thread's CPU in the commits (the fsync's kernel time included)
        warm_until = time.perf_counter() + COMMIT_FLOOR_WARMUP_S
        deadline = warm_until + seconds
        warm = 0  # untimed commits first: the WAL grows to its steady size, as in a server

        def commit(row: tuple) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO journal VALUES (?,?,?,?,?,?,?,?)", row)
            conn.execute("COMMIT")

        while len(latencies_s) < commits_max and time.perf_counter() < deadline:
            n = len(latencies_s) + warm
            row = rows.row(t_us + n, f"acct-{n % 1000:04d}", 1, "plan-7", 0, 10**8)
            if time.perf_counter() < warm_until and warm < commits_max:
                commit(row)
                warm += 1
            else:
                t0, c0 = time.perf_counter(), time.thread_time()
                commit(row)
                latencies_s.append(time.perf_counter() - t0)
                cpu_s += time.thread_time() - c0
            store.restart_wal()
        latencies_s.sort()
        return {"commits": len(latencies_s), "p50_ms": nearest_rank(latencies_s, 50) * 1e3,
                "p99_ms": nearest_rank(latencies_s, 99) * 1e3,
                "commits_per_s": len(latencies_s) / sum(latencies_s),
                "cpu_us": cpu_s * 1e6 / max(1, len(latencies_s))}
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
    the same transaction. So the bench writes the same consume blocks and the same derived
    rows the engine would, in the engine's own transaction path (Store.commit of a
    UnitOfWork, 4,096 requests per commit and one instant per commit like the writer's
    groups), with the engine's item layout (check_items compares it with consumes the
    engine wrote itself). Half the accounts hold a year-1m plan, half pay as you go,
    regions alternate."""
    t_start = time.perf_counter()
    day0 = cal.day_start(SETTLE_DAY)
    clock = TestClock(day0 + 3_600_000_000)  # 01:00 UTC+8
    store = Store(path)
    engine = Engine(store, clock, catalog.builtin())
    ids = [f"settle-{i:05d}" for i in range(sizes.settle_accounts)]

    for i in range(0, len(ids), GROUP_REQUESTS_MAX):
        part = ids[i:i + GROUP_REQUESTS_MAX]
        run_group(engine, [m.CreateAccount(a) for a in part])
        run_group(engine, [m.TopUp(a, "bench-top-up", m.FundsKind.CASH, 1_000_000_000)
                           for a in part])
        run_group(engine, [m.PurchasePlan(a, "bench-plan", "year-1m") for a in part[::2]])
    # A few consumes through the engine itself: the reference for check_items.
    run_group(engine, [m.Consume(a, f"engine-{a}", Region(1 + k % 2), m.CaptchaType.SLIDER,
                                 m.Architecture.V2, m.Step.STEP_3)
                       for k, a in enumerate(ids[:20])])
    assert check_items(store) == 20
    plans = {p.account_id: p for p in store.load_plans("WHERE units_remaining > 0")}
    remaining = {a: p.units_remaining for a, p in plans.items()}
    # 02:00 .. 22:00 UTC+8, one instant and one transaction per commit group, as the engine's
    write_consumes(store, ids, SETTLE_DAY, sizes.settle_requests - 20, offset=0, plans=plans,
                   remaining=remaining, t0_us=day0 + 2 * 3_600_000_000,
                   span_us=20 * 3_600_000_000, txn_items=GROUP_REQUESTS_MAX,
                   block_items=GROUP_REQUESTS_MAX)
    consumes = sum(1 for _ in consume_entries(store.conn))
    store.close()  # checkpoints (TRUNCATE): the copies below need only the main file
    built_s = time.perf_counter() - t_start
    console.print(f"settlement journal: {consumes:,} consume entries over {len(ids):,} "
                  f"accounts on {SETTLE_DAY}, built in {built_s:.1f} s")
    return {"consume_entries": consumes, "accounts": len(ids), "built_s": built_s}


def run_group(engine: Engine, cmds: list[Any]) -> None:
    """Commands through the engine, committed together as the writer would."""
    for i in range(0, len(cmds), GROUP_REQUESTS_MAX):
        engine.begin()
        part = cmds[i:i + GROUP_REQUESTS_MAX]
        engine.prefetch_keys(part)
        for c in part:
            engine.execute(c)
        engine.commit()


def bench_item(account_id: str, region: int, plan_id: str | None, payg_micros: int,
               remaining: int) -> list[Any]:
    """A quantity-1 slider/v2/step-3 consume with a random UUID request_id, as the engine
    records it in a block."""
    return [account_id, str(uuid.uuid4()), region, 1, 1, 1, None, 1, None,
            [[plan_id, 1]] if plan_id else [], 0 if plan_id else 1, payg_micros, remaining]


def check_items(store: Store) -> int:
    """bench_item() lays an item out exactly as the engine did for its own consumes (the
    only consumes in the journal so far); returns how many were compared."""
    found = 0
    for _, _, account_id, _request_id, p in consume_entries(store.conn):
        plan_id = p["alloc"][0][0] if p["alloc"] else None
        mine = bench_item(account_id, p["region"], plan_id, p["payg_micros"], p["remaining"])
        assert blocks.entry_payload(p["day"], mine) == p, (mine, p)
        found += 1
    assert found, "no consume written by the engine to compare with"
    return found


def write_consumes(store: Store, ids: list[str], day: str, n: int, *, offset: int,
                   plans: dict[str, Any], remaining: dict[str, int], t0_us: int, span_us: int,
                   txn_items: int, block_items: int) -> None:
    """n quantity-1 consumes on ``day``, round robin over ``ids`` from ``offset`` (regions
    alternating by round), spread over ``[t0_us, t0_us + span_us)``: journal blocks of
    ``block_items`` (one instant each) with the derived rows the engine would write, one
    transaction of ``txn_items`` through ``Store.commit``, which indexes the keys as the
    server's does. A plan covers its account's consumes; the other accounts pay as they go."""
    seq, last_hash, _ = store.journal_tail()
    next_seq = seq + 1
    payg_micros = {r: payg_cost_micros(Region(r), 1) for r in (1, 2)}
    for start in range(0, n, txn_items):
        uow = UnitOfWork(last_hash=last_hash, next_seq=next_seq)
        touched: set[str] = set()
        for j in range(start, min(n, start + txn_items)):
            g = offset + j
            account_id = ids[g % len(ids)]
            region = 1 + (g // len(ids)) % 2
            at = t0_us + (j - j % block_items) * span_us // n
            plan = plans.get(account_id)
            if plan is not None:
                remaining[account_id] -= 1
                key = (account_id, day, plan.plan_id)
                uow.offsets[key] = uow.offsets.get(key, 0) + 1
                uow.add_consume(at, day, bench_item(account_id, region, plan.plan_id, 0,
                                                    remaining[account_id]))
                touched.add(account_id)
            else:
                acc = uow.usage.setdefault((account_id, day, region), [0, 0])
                acc[0] += 1
                acc[1] += payg_micros[region]
                uow.add_consume(at, day, bench_item(account_id, region, None,
                                                    payg_micros[region], 0))
        for account_id in touched:
            plan = plans[account_id]
            plan.units_remaining = remaining[account_id]
            uow.plans[plan.plan_id] = plan
        store.commit(uow)
        last_hash, next_seq = uow.last_hash, uow.next_seq


def journal_scan(conn: sqlite3.Connection) -> dict[str, int]:
    """The bare scan: every consume block's items decoded (MessagePack, in C) and the
    pay-as-you-go units summed per account that consumed, with no derived table."""
    sums: dict[str, int] = {}
    for (payload,) in conn.execute(
            "SELECT payload FROM journal WHERE kind = ?", (blocks.BLOCK_KIND,)):
        for item in blocks.decode(payload)[1]:
            a = item[blocks.ACCOUNT]
            sums[a] = sums.get(a, 0) + item[blocks.PAYG_UNITS]
    return sums


def measure_settlement(db: Path, tmp: Path, run: int) -> dict[str, Any]:
    """On a fresh copy of the journal: the bare journal scan, then SettleDay (a freshly
    opened engine settling the day: reading figures, issuing and paying every bill,
    committing with one fsync). Both run on the same, page-cache-warm file."""
    copy = tmp / f"settle-run{run}.db"
    shutil.copyfile(db, copy)
    try:
        conn = sqlite3.connect(copy, isolation_level=None)
        t0 = time.perf_counter()
        payg = journal_scan(conn)
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
        payg_sql = sum(payg.values())
        payg_billed = sum(ln.quantity for b in bills for ln in b.lines
                          if ln.item == "verification")
        assert payg_billed == payg_sql, ("bills and journal disagree", payg_billed, payg_sql)
        assert len(bills) == len(payg), ("one bill per active account", len(bills), len(payg))
        return {"settle_s": settle_s, "sql_s": sql_s, "bills": len(bills),
                "payg_units": payg_sql}
    finally:
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)
