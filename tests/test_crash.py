"""Crash campaign (R11, R12, R25): start, load, SIGKILL at random moments, restart, check.

Each iteration is seeded. It kills the server either at a random instant or from inside the
commit path (``ledger/faults.py``: before the transaction, after the rows are written but
before COMMIT, after COMMIT but before any reply). After each restart it checks that every
acknowledged request is there exactly once with its original result, that units and money
are conserved, and at the end that ``verify`` passes.

The default suite runs CRASH_ITERATIONS_CI iterations; ``make crash`` runs 200.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections import Counter

import pytest

from clients.client import LedgerClient, LedgerError
from ledger.store import consume_entries
from ledger.verify import verify

from .conftest import T0, ServerProcess

CRASH_ITERATIONS_CI = 20
CRASH_ITERATIONS_FULL = 200
ACCOUNTS = ("crash-a", "crash-b", "crash-c")
WORKERS = 4
REQUESTS_PER_WORKER_MAX = 400
LOAD_SECONDS_MAX = 4.0
MODES = ("timer", "before_commit", "during_commit", "after_commit")


def _fund(srv: ServerProcess) -> None:
    with srv.client() as c:
        c.set_time(T0)
        for acct in ACCOUNTS:
            c.create_account(acct)
            c.top_up(acct, 1_000_000_000, request_id=f"fund-{acct}")
            c.purchase_plan(acct, "month-100k", request_id=f"plan-{acct}")


def _load(srv: ServerProcess, seed: int, acked: dict[str, tuple], stop: threading.Event) -> None:
    rng = random.Random(seed)
    with LedgerClient(srv.target, timeout_s=2, retries=0) as c:
        for i in range(REQUESTS_PER_WORKER_MAX):
            if stop.is_set():
                return
            acct = rng.choice(ACCOUNTS)
            qty = rng.randint(1, 60)
            region = rng.choice(("mainland", "outside"))
            rid = f"s{seed}-{i}"
            try:
                r = c.consume(acct, quantity=qty, region=region, request_id=rid)
            except LedgerError:
                return  # the server died under us: this request is unacknowledged
            acked[rid] = (acct, qty, region, [(a.plan_id, a.units) for a in r.allocations],
                          r.payg_units, r.journal_seq)


def _iteration(srv: ServerProcess, seed: int, monkeypatch: pytest.MonkeyPatch) -> int:
    rng = random.Random(seed)
    mode = MODES[seed % len(MODES)]
    if mode == "timer":
        monkeypatch.delenv("QUOTA_LEDGER_FAULT", raising=False)
    else:
        monkeypatch.setenv("QUOTA_LEDGER_FAULT", f"{mode}:{rng.uniform(0.005, 0.05)}:{seed}")
    srv.start()
    monkeypatch.delenv("QUOTA_LEDGER_FAULT", raising=False)
    acked: dict[str, tuple] = {}
    stop = threading.Event()
    workers = [threading.Thread(target=_load, args=(srv, seed * 100 + w, acked, stop))
               for w in range(WORKERS)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + (rng.uniform(0.05, 1.5) if mode == "timer"
                                   else LOAD_SECONDS_MAX)
    while time.monotonic() < deadline and srv.proc.poll() is None:
        time.sleep(0.01)
    if srv.proc.poll() is None:
        srv.kill()
    else:
        srv.log.close()
    stop.set()
    for w in workers:
        w.join(30)
    srv.start()  # restart without faults
    with srv.client() as c:
        for rid, (acct, qty, region, alloc, payg, seq) in acked.items():
            again = c.consume(acct, quantity=qty, region=region, request_id=rid)
            assert again.replayed, rid
            assert [(a.plan_id, a.units) for a in again.allocations] == alloc, rid
            assert (again.payg_units, again.journal_seq) == (payg, seq), rid
    srv.stop()
    _check_conserved(srv, acked)
    return len(acked)


def _check_conserved(srv: ServerProcess, acked: dict[str, tuple]) -> None:
    conn = sqlite3.connect(f"file:{srv.db}?mode=ro", uri=True)
    try:
        entries = list(consume_entries(conn))
        keys = Counter(e[3] for e in entries)
        assert all(keys[rid] == 1 for rid in acked), "an acknowledged request is missing"
        payloads = [e[4] for e in entries]
        taken = sum(n for p in payloads for _, n in p["alloc"])
        payg = sum(p["payg_units"] for p in payloads)
        assert taken + payg == sum(p["qty"] for p in payloads)  # units conserved
        offsets = conn.execute("SELECT coalesce(sum(units), 0) FROM offsets_daily").fetchone()[0]
        usage = conn.execute("SELECT coalesce(sum(payg_units), 0), coalesce(sum(payg_micros), 0)"
                             " FROM usage_daily").fetchone()
        assert offsets == taken and usage[0] == payg
        assert usage[1] == sum(p["payg_micros"] for p in payloads)  # money conserved
        for total, remaining, forfeited, plan_id in conn.execute(
                "SELECT units_total, units_remaining, units_forfeited, plan_id FROM plans"):
            used = conn.execute("SELECT coalesce(sum(units), 0) FROM offsets_daily"
                                " WHERE plan_id = ?", (plan_id,)).fetchone()[0]
            assert total == remaining + forfeited + used and remaining >= 0  # no unit twice
    finally:
        conn.close()


def _campaign(tmp_path, monkeypatch, iterations: int) -> None:
    srv = ServerProcess(tmp_path)
    srv.start()
    _fund(srv)
    srv.stop()
    acknowledged = 0
    for seed in range(iterations):
        try:
            acknowledged += _iteration(srv, seed, monkeypatch)
        except AssertionError as exc:
            raise AssertionError(f"crash campaign failed at seed {seed} "
                                 f"(mode {MODES[seed % len(MODES)]}): {exc}") from exc
    report = verify(str(srv.db))
    assert report.ok, report.problems
    assert acknowledged > iterations  # the load really ran
    print(f"crash campaign: {iterations} iterations, {acknowledged} acknowledged requests, "
          f"{report.entries} journal entries, verify ok")


def test_r11_crash_campaign_short(tmp_path, monkeypatch):
    """20 seeded SIGKILLs (timer and inside the commit path): nothing acknowledged is lost."""
    _campaign(tmp_path, monkeypatch, CRASH_ITERATIONS_CI)


@pytest.mark.slow
def test_r11_crash_campaign_full(tmp_path, monkeypatch):
    """`make crash`: the same campaign, 200 iterations."""
    _campaign(tmp_path, monkeypatch, int(os.environ.get("CRASH_ITERATIONS",
                                                        CRASH_ITERATIONS_FULL)))
