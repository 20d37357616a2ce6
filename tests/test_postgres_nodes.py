"""Several ledger nodes on one PostgreSQL database (issue 11, point 3): the same guarantees
as one server. Real nodes (``quota-ledger serve`` processes) on a real cluster; no mocks."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest

from clients.client import LedgerClient
from ledger.verify import verify

from .conftest import ROOT, T0, ServerProcess, make_account
from .test_group_commit import scrape

PLAN_UNITS = 100_000  # month-100k
LEFT = 300  # units left in the plan when two nodes race for them
CALLERS_PER_NODE = 8
LOAD_DEADLINE_S = 90.0
STALL_S = 3.0  # how long node A holds its transaction open in the lock test


def units_taken(node: ServerProcess, plan_id: str) -> tuple[int, int]:
    conn = node.read_conn()
    try:
        [(remaining, total)] = conn.execute(
            "SELECT units_remaining, units_total FROM plans WHERE plan_id = ?",
            (plan_id,)).fetchall()
        [(payg,)] = conn.execute("SELECT coalesce(sum(payg_units), 0) FROM usage_daily",
                                 ()).fetchall()
        return total - remaining, payg
    finally:
        conn.close()


def test_postgres_two_nodes_racing_for_one_plan_take_each_unit_once(two_nodes):
    """R11 across nodes: 2 x LEFT requests for LEFT units, half through each node."""
    a, b = two_nodes
    with a.client() as c:
        c.set_time(T0)
        make_account(c, cash_micros=100_000_000)
        plan = c.purchase_plan("acme", "month-100k")
        c.consume("acme", quantity=PLAN_UNITS - LEFT)
    total = 2 * LEFT
    start = threading.Barrier(2 * CALLERS_PER_NODE)
    deadline = time.monotonic() + LOAD_DEADLINE_S

    def caller(worker: int) -> list:
        node = (a, b)[worker % 2]
        out = []
        with LedgerClient(node.target, timeout_s=30) as c:
            start.wait(timeout=30)
            for i in range(worker, total, 2 * CALLERS_PER_NODE):
                assert time.monotonic() < deadline, "load took too long"
                out.append(c.consume("acme", request_id=f"race-{i}"))
        return out

    with ThreadPoolExecutor(2 * CALLERS_PER_NODE) as pool:
        results = [r for f in [pool.submit(caller, w) for w in range(2 * CALLERS_PER_NODE)]
                   for r in f.result(timeout=LOAD_DEADLINE_S)]
    assert len(results) == total and not any(r.replayed for r in results)
    covered = [r for r in results if r.allocations]
    assert len(covered) == LEFT, "every unit left taken exactly once, never more (R11)"
    assert sorted(r.plan_units_remaining for r in covered) == list(range(LEFT))
    assert all(r.payg_units == 1 for r in results if not r.allocations)
    taken, payg = units_taken(a, plan.plan_id)
    assert (taken, payg) == (PLAN_UNITS, LEFT)
    report = verify(str(a.db))
    assert report.ok, report.problems


def test_postgres_one_request_id_sent_to_two_nodes_at_once_is_charged_once(two_nodes):
    """R12 across nodes: each id goes to both nodes at the same moment; one charges, the
    other replays the same result."""
    a, b = two_nodes
    with a.client() as c:
        c.set_time(T0)
        make_account(c, cash_micros=100_000_000)
        c.purchase_plan("acme", "month-100k")
    ids = [f"twice-{i}" for i in range(40)]
    with a.client() as ca, b.client() as cb, ThreadPoolExecutor(2) as pool:
        pairs = []
        for rid in ids:
            fa = pool.submit(ca.consume, "acme", request_id=rid)
            fb = pool.submit(cb.consume, "acme", request_id=rid)
            pairs.append((fa.result(timeout=30), fb.result(timeout=30)))
    for ra, rb in pairs:
        assert sorted([ra.replayed, rb.replayed]) == [False, True]
        assert [(x.plan_id, x.units) for x in ra.allocations] == \
            [(x.plan_id, x.units) for x in rb.allocations]
        assert (ra.plan_units_remaining, ra.journal_seq, ra.billing_day) == \
            (rb.plan_units_remaining, rb.journal_seq, rb.billing_day)
    with a.client() as c:
        assert c.get_remaining("acme").units_remaining_total == PLAN_UNITS - len(ids)
    assert verify(str(a.db)).ok


def test_postgres_the_test_clock_is_shared_and_each_day_is_settled_once(two_nodes):
    """--test-clock lives in the database; SettleDay through either node bills once."""
    a, b = two_nodes
    with a.client() as ca, b.client() as cb:
        ca.set_time(T0)
        assert cb.get_time() == ca.get_time()
        make_account(ca, "acme", cash_micros=10_000_000)
        make_account(cb, "globex", cash_micros=10_000_000)
        for _ in range(3):
            ca.consume("acme")
            cb.consume("globex")
            cb.consume("acme")
        day = ca.consume("acme").billing_day
        cb.set_time(T0 + timedelta(days=1))
        assert ca.get_time() == cb.get_time()
        first = ca.settle_day(day).bills
        again = cb.settle_day(day).bills
        assert sorted((x.account_id, x.total_micros) for x in first) == \
            sorted((x.account_id, x.total_micros) for x in again)
        assert {x.account_id for x in first} == {"acme", "globex"}
    conn = a.read_conn()
    try:
        settled = [json.loads(p)["day"] for (p,) in conn.execute(
            "SELECT payload FROM journal WHERE kind = 'day_settled'", ()).fetchall()]
        [(bills,)] = conn.execute("SELECT count(*) FROM bills WHERE day = ?",
                                  (day,)).fetchall()
    finally:
        conn.close()
    assert settled.count(day) == 1 and len(settled) == len(set(settled)), settled
    assert bills == 2
    assert verify(str(a.db)).ok


def test_postgres_a_transaction_held_open_on_one_account_does_not_stop_another(
        tmp_path, pg_url, monkeypatch):
    """R25 as amended: node A stalls inside its commit on account X (a fault point holds
    its transaction and locks open); node B still commits for account Y meanwhile, and
    B's request for X waits for A instead of failing or overdrawing."""
    setup = ServerProcess(tmp_path, db=pg_url, test_clock=False).start()
    with setup.client() as c:
        make_account(c, "x-corp", cash_micros=100_000_000)
        make_account(c, "y-corp", cash_micros=10_000_000)
        c.purchase_plan("x-corp", "month-100k")  # A's consume then changes X's version
    b = setup
    (tmp_path / "a").mkdir()
    monkeypatch.setenv("QUOTA_LEDGER_FAULT", f"during_commit:1.0:1:{STALL_S}")
    a = ServerProcess(tmp_path / "a", db=pg_url, test_clock=False).start()
    monkeypatch.delenv("QUOTA_LEDGER_FAULT")
    try:
        with a.client(timeout_s=30) as ca, b.client(timeout_s=30) as cb, \
                ThreadPoolExecutor(1) as pool:
            held = pool.submit(ca.consume, "x-corp", request_id="held-x")
            time.sleep(0.5)  # A is inside its commit, holding x-corp
            assert not held.done()
            t0 = time.monotonic()
            cb.consume("y-corp", request_id="free-y")
            unrelated_s = time.monotonic() - t0
            assert not held.done(), "B's commit for Y did not wait for A"
            r = cb.consume("x-corp", request_id="after-x")
            assert held.done(), "B's request for X waited for A's transaction"
            assert not held.result().replayed and not r.replayed
        assert unrelated_s < STALL_S / 2, f"an unrelated account waited {unrelated_s:.2f} s"
        # Issue 20, contention as B's metrics tell it: its group for X waited for A's lock
        # (most of the stall), and B reloaded X, which A had changed.
        seen = scrape(b.metrics_port)
        assert seen["ledger_pg_lock_wait_seconds_total"] >= STALL_S / 2, seen
        assert seen["ledger_pg_account_reloads_total"] >= 1, seen
        assert scrape(a.metrics_port)["ledger_pg_lock_wait_seconds_total"] < STALL_S / 2
    finally:
        a.stop()
        b.stop()
    assert verify(pg_url).ok


def test_postgres_a_client_given_both_nodes_spreads_calls_over_them(two_nodes):
    """docs/scaling.md: one client, several targets, round robin; ledgerctl too (with
    account affinity, its default: tests/test_affinity.py)."""
    a, b = two_nodes
    both = f"{a.target},{b.target}"
    with LedgerClient(both, routing="round_robin") as c:
        c.set_time(T0)
        make_account(c, cash_micros=10_000_000)
        for i in range(40):
            c.consume("acme", request_id=f"spread-{i}")
    conn = a.read_conn()
    try:
        nodes = {n for (n,) in conn.execute(
            "SELECT DISTINCT node FROM journal WHERE kind = 'consume_block'", ()).fetchall()}
    finally:
        conn.close()
    assert len(nodes) == 2, "every call went to one node"
    done = subprocess.run([str(Path(sys.executable).parent / "ledgerctl"), "--target", both,
                           "account", "show", "acme"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "acme" in done.stdout, done.stderr
    with pytest.raises(ValueError, match="IPv4"):
        LedgerClient(f"localhost:{a.port},{b.target}")
