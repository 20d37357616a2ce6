"""Soak: the server's resident memory stays flat under steady mixed load (issue: "resident
memory flat during a bounded soak of at least 10 minutes"). `make soak`; not in CI (slow).

One real server (`python -m server serve`, the system clock, WAL + synchronous=FULL) gets
open-loop Consume, ConsumeStream and ConsumeBatch traffic at fixed rates over pay-as-you-go
accounts and accounts with a plan, plus a trickle of retries that must come back replayed,
for SOAK_SECONDS (default 600; `SOAK_SECONDS=60 make soak` for a quick try, which only shows
that the harness works: a minute is too short to see a slow leak). Every ~10 s it reads the
server's VmRSS from /proc/<pid>/status; the first third of the run is warm-up, and the median
of the last third may exceed that of the middle third by RSS_GROWTH_TOLERANCE_MIB at most.
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import statistics
import time
from pathlib import Path

import pytest

from clients.client import AsyncLedgerClient, LedgerError
from clients.loadgen import LoadConfig, LoadResult, prepare_accounts, run_load
from ledger.store import consume_entries as store_consume_entries

from .conftest import ServerProcess

SOAK_SECONDS_DEFAULT = 600.0
SAMPLE_INTERVAL_S_MAX = 10.0
SAMPLES_TARGET = 30  # a short try samples more often, so that each third has a few samples
SAMPLES_MIN = 6  # two per third at least, or the comparison means nothing
PLAN_ACCOUNTS = 200  # each with a year-100m plan: the plan-covered path
PAYG_ACCOUNTS = 50  # no plan: the pay-as-you-go path
PAYG_TOP_UP_MICROS = 100_000_000
# Open loop (requests per second whatever the answers), so the load stays the same over the
# whole run instead of following the server's speed. About 2,000 requests/s in all (a couple
# of hundred commits per second, 1.2 million journal entries in ten minutes): well below
# what one server process takes on a busy 2-core machine, because an overloaded gRPC server
# sheds calls as CANCELLED (grpcio itself does, the bare baseline server too), and a soak
# measures memory under steady load, not overload.
RATES_PER_S = {"unary": 150.0, "stream": 350.0, "batch": 1_500.0}
BATCH_SIZE = 100
STREAMS = 2
CALL_TIMEOUT_S = 10.0
LOAD_SENT_FRACTION_MIN = 0.8  # the open loop must have sent at least this share of its plan
REPLAY_KEYS = 20  # request ids retried over and over: the first use bills, the rest replay
REPLAY_INTERVAL_S = 0.5
SHUTDOWN_GRACE_S = 60.0  # the load ends on its own; this bounds waiting for the tasks
MIB = 1024 * 1024
# What "no growth beyond noise" allows between the middle and the last third (medians).
# Everything the server holds is bounded once warm: SQLite's page cache is capped per
# connection (cache_size default, 2 MiB) and the connections are one writer plus one reader
# per thread; the WAL is checkpointed (TRUNCATE) every 2,000 commits, i.e. every few seconds
# at this load, and journal_size_limit caps it, so the mmapped wal-index (-shm, 32 KiB per
# 4,096 WAL frames) stays well under 1 MiB; the engine caches one object per account and
# plan, all created before the run; metric label sets are fixed. What remains is allocator
# noise (pymalloc arenas, glibc malloc, gRPC buffers), a few MiB up or down. A leak of 42
# bytes per request at ~2,000 requests/s adds 16 MiB over one third of a 10-minute soak,
# so this tolerance catches a leak of that size or more.
RSS_GROWTH_TOLERANCE_MIB = 16.0


def soak_seconds() -> float:
    raw = os.environ.get("SOAK_SECONDS", "")
    try:
        seconds = float(raw) if raw else SOAK_SECONDS_DEFAULT
    except ValueError:
        raise pytest.UsageError(f"SOAK_SECONDS must be a number of seconds, got {raw!r}") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise pytest.UsageError(f"SOAK_SECONDS must be positive, got {raw!r}")
    return seconds


def rss_bytes(pid: int) -> int:
    """VmRSS of a live process, from /proc/<pid>/status (kB there)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def journal_max_seq(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT coalesce(max(seq), 0) FROM journal").fetchone()[0]
    finally:
        conn.close()


def consume_entries(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return sum(1 for _ in store_consume_entries(conn))
    finally:
        conn.close()


def load_config(target: str, accounts: list[str], shape: str, seconds: float) -> LoadConfig:
    rate = RATES_PER_S[shape]
    extra = {"batch": {"batch_size": BATCH_SIZE}, "stream": {"streams": STREAMS}}.get(shape, {})
    return LoadConfig(target=target, account_ids=accounts, shape=shape, rate=rate,
                      requests=int(rate * seconds) + 1, duration_s=seconds,
                      timeout_s=CALL_TIMEOUT_S, **extra)


async def sample_rss(srv: ServerProcess, interval_s: float, samples_max: int,
                     done: asyncio.Event) -> list[dict[str, float]]:
    """One sample now and every interval_s until the load is done (or samples_max)."""
    assert srv.proc is not None
    wal = Path(f"{srv.db}-wal")
    t0 = time.monotonic()
    samples: list[dict[str, float]] = []
    for i in range(samples_max):
        samples.append({"t_s": time.monotonic() - t0, "rss_mib": rss_bytes(srv.proc.pid) / MIB,
                        "journal": journal_max_seq(srv.db),
                        "wal_mib": (wal.stat().st_size if wal.exists() else 0) / MIB})
        wait = t0 + (i + 1) * interval_s - time.monotonic()
        try:
            await asyncio.wait_for(done.wait(), max(0.0, wait))
            break
        except TimeoutError:
            pass
    return samples


async def replays(target: str, accounts: list[str], seconds: float) -> dict[str, int]:
    """The same REPLAY_KEYS request ids sent again and again: the first use of each is billed,
    every later one must come back replayed with the first one's journal entry."""
    counts = {"sent": 0, "fresh": 0, "replayed": 0, "errors": 0}
    first_seq: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    async with AsyncLedgerClient(target, timeout_s=CALL_TIMEOUT_S) as client:
        for i in range(int(seconds / REPLAY_INTERVAL_S) + 1):
            if time.monotonic() >= deadline:
                break
            rid = f"soak-replay-{i % REPLAY_KEYS}"
            counts["sent"] += 1
            try:
                resp = await client.consume(accounts[i % REPLAY_KEYS], request_id=rid)
            except LedgerError:
                counts["errors"] += 1
            else:
                if resp.replayed:
                    counts["replayed"] += 1
                    assert resp.journal_seq == first_seq[rid], (rid, resp, first_seq[rid])
                else:
                    counts["fresh"] += 1
                    assert rid not in first_seq, f"{rid} billed twice"
                    first_seq[rid] = resp.journal_seq
            await asyncio.sleep(REPLAY_INTERVAL_S)
    return counts


async def soak(srv: ServerProcess, seconds: float, interval_s: float
               ) -> tuple[dict[str, LoadResult], dict[str, int], list[dict[str, float]]]:
    plan_cfg = LoadConfig(target=srv.target, accounts=PLAN_ACCOUNTS, account_prefix="soak-plan-",
                          plan="year-100m", timeout_s=CALL_TIMEOUT_S)
    payg_cfg = LoadConfig(target=srv.target, accounts=PAYG_ACCOUNTS, account_prefix="soak-payg-",
                          top_up_micros=PAYG_TOP_UP_MICROS, timeout_s=CALL_TIMEOUT_S)
    await prepare_accounts(plan_cfg)
    await prepare_accounts(payg_cfg)
    accounts = plan_cfg.ids() + payg_cfg.ids()
    done = asyncio.Event()
    sampler = asyncio.create_task(
        sample_rss(srv, interval_s, math.ceil(seconds / interval_s) + 5, done))
    loads = asyncio.gather(*(run_load(load_config(srv.target, accounts, shape, seconds))
                             for shape in RATES_PER_S),
                           replays(srv.target, plan_cfg.ids(), seconds))
    try:
        *results, replay_counts = await asyncio.wait_for(loads, seconds + SHUTDOWN_GRACE_S)
    finally:
        done.set()
    samples = await asyncio.wait_for(sampler, SHUTDOWN_GRACE_S)
    return dict(zip(RATES_PER_S, results, strict=True)), replay_counts, samples


def print_report(results: dict[str, LoadResult], replay_counts: dict[str, int],
                 samples: list[dict[str, float]]) -> None:
    print(f"\n{'t (s)':>8} {'RSS (MiB)':>10} {'journal':>10} {'WAL (MiB)':>10}")
    for s in samples:
        print(f"{s['t_s']:8.1f} {s['rss_mib']:10.1f} {s['journal']:10,.0f} {s['wal_mib']:10.2f}")
    print(f"\n{'load':>8} {'sent':>10} {'acked':>10} {'errors':>7} {'req/s':>8} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'max ms':>8}")
    for shape, r in results.items():
        print(f"{shape:>8} {r.sent:10,} {r.acknowledged:10,} {r.error_total:7,} "
              f"{r.rate_per_s:8,.0f} {r.p50_ms:7.3f} {r.p99_ms:7.3f} {r.max_ms:8.1f}")
    print(f"{'replays':>8} {replay_counts['sent']:10,} "
          f"{replay_counts['fresh'] + replay_counts['replayed']:10,} "
          f"{replay_counts['errors']:7,}   ({replay_counts['replayed']:,} replayed)")


@pytest.mark.slow
def test_resident_memory_stays_flat_under_steady_mixed_load(tmp_path: Path) -> None:
    """Under steady mixed load, the server's RSS in the last third of the soak is within
    RSS_GROWTH_TOLERANCE_MIB of the middle third, and every request has exactly one outcome."""
    seconds = soak_seconds()
    interval_s = min(SAMPLE_INTERVAL_S_MAX, max(1.0, seconds / SAMPLES_TARGET))
    srv = ServerProcess(tmp_path, test_clock=False).start()
    try:
        results, replay_counts, samples = asyncio.run(soak(srv, seconds, interval_s))
        rss_end = rss_bytes(srv.proc.pid) / MIB  # type: ignore[union-attr]
    finally:
        rc = srv.stop()
    print_report(results, replay_counts, samples)

    for shape, r in results.items():
        assert r.consistent, f"{shape}: sent {r.sent} != acknowledged + errors {r.to_dict()}"
        assert r.error_total == 0, f"{shape}: errors {r.errors}"
        planned = RATES_PER_S[shape] * seconds
        assert r.sent >= LOAD_SENT_FRACTION_MIN * planned, (shape, r.sent, planned)
    assert replay_counts["errors"] == 0, replay_counts
    assert replay_counts["sent"] == replay_counts["fresh"] + replay_counts["replayed"]
    assert replay_counts["fresh"] == min(REPLAY_KEYS, replay_counts["sent"]), replay_counts
    assert rc == 0, f"the server did not drain cleanly (exit {rc})"
    # Every acknowledged, billable, not replayed request is one consume entry, and no other.
    fresh = sum(r.billable - r.replayed for r in results.values()) + replay_counts["fresh"]
    assert consume_entries(srv.db) == fresh

    assert len(samples) >= SAMPLES_MIN, f"only {len(samples)} RSS samples"
    n = len(samples)
    middle = statistics.median(s["rss_mib"] for s in samples[n // 3:2 * n // 3])
    last = statistics.median(s["rss_mib"] for s in samples[2 * n // 3:])
    print(f"RSS median: middle third {middle:.1f} MiB, last third {last:.1f} MiB, growth "
          f"{last - middle:+.1f} MiB (tolerance {RSS_GROWTH_TOLERANCE_MIB:g} MiB); first sample "
          f"{samples[0]['rss_mib']:.1f} MiB, at the end {rss_end:.1f} MiB; {seconds:g} s soak")
    assert last - middle <= RSS_GROWTH_TOLERANCE_MIB, (
        f"resident memory grew {last - middle:.1f} MiB between the middle and the last third "
        f"(tolerance {RSS_GROWTH_TOLERANCE_MIB:g} MiB)")
