"""R11 under concurrency: many callers racing for the last units of one plan."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from clients.client import LedgerClient

from .conftest import make_account

PLAN_UNITS = 100_000  # month-100k
LEFT = 500  # M: units left in the plan when the race starts
CALLERS = 50
LOAD_DEADLINE_S = 60.0


def read_db(server, sql: str, params: tuple = ()) -> list[tuple]:
    conn = server.read_conn()
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def check_tables(server, plan_id: str, payg_expected: int) -> None:
    """Derived tables agree: plan at 0, never negative, offsets and payg add up."""
    assert read_db(server, "SELECT count(*) FROM plans WHERE units_remaining < 0") == [(0,)]
    [(remaining, total, forfeited)] = read_db(
        server, "SELECT units_remaining, units_total, units_forfeited FROM plans"
                " WHERE plan_id = ?", (plan_id,))
    assert (remaining, forfeited) == (0, 0)
    [(offset,)] = read_db(server, "SELECT sum(units) FROM offsets_daily WHERE plan_id = ?",
                          (plan_id,))
    assert offset == total == PLAN_UNITS
    [(payg,)] = read_db(server, "SELECT sum(payg_units) FROM usage_daily WHERE account_id = ?",
                        ("acme",))
    assert payg == payg_expected


def setup_plan(client) -> str:
    make_account(client, cash_micros=100_000_000)
    plan = client.purchase_plan("acme", "month-100k")
    r = client.consume("acme", quantity=PLAN_UNITS - LEFT)
    assert r.plan_units_remaining == LEFT
    return plan.plan_id


def test_r11_concurrent_callers_take_each_unit_once(server, client):
    """50 callers send 2M single requests for M units: exactly M covered, M payg, none negative."""
    plan_id = setup_plan(client)
    total = 2 * LEFT
    deadline = time.monotonic() + LOAD_DEADLINE_S
    start = threading.Barrier(CALLERS)

    def caller(worker: int) -> list:
        out = []
        with LedgerClient(server.target, timeout_s=30) as c:
            start.wait(timeout=30)
            for i in range(worker, total, CALLERS):
                assert time.monotonic() < deadline, "load took too long"
                out.append(c.consume("acme", request_id=f"race-{i}"))
        return out

    with ThreadPoolExecutor(CALLERS) as pool:
        results = [r for f in [pool.submit(caller, w) for w in range(CALLERS)]
                   for r in f.result(timeout=LOAD_DEADLINE_S)]
    assert len(results) == total
    assert not any(r.replayed for r in results)
    covered = [r for r in results if r.allocations]
    assert all([(a.plan_id, a.units) for a in r.allocations] == [(plan_id, 1)] and
               r.payg_units == 0 for r in covered)
    assert all(r.payg_units == 1 and r.payg_amount_micros == 700
               for r in results if not r.allocations)
    assert len(covered) == LEFT
    assert all(r.plan_units_remaining >= 0 for r in results)
    # Each covered request saw a distinct "units left after me": LEFT-1 down to 0.
    assert sorted(r.plan_units_remaining for r in covered) == list(range(LEFT))
    # Every request is its own entry: a block's items share its seq, never a request_id.
    assert len({(r.journal_seq, r.request_id) for r in results}) == total
    assert client.get_remaining("acme").units_remaining_total == 0
    check_tables(server, plan_id, payg_expected=LEFT)


def test_r11_concurrent_batches_streams_and_singles_share_one_plan(server, client):
    """Unary, batch and stream callers racing with quantities 1..3: units are conserved exactly."""
    plan_id = setup_plan(client)
    rng = random.Random(11)
    jobs = [[(f"mix-{w}-{i}", rng.randint(1, 3)) for i in range(20)] for w in range(18)]
    requested = sum(q for job in jobs for _, q in job)
    assert requested > LEFT
    deadline = time.monotonic() + LOAD_DEADLINE_S

    def run(worker: int) -> list:
        job = jobs[worker]
        with LedgerClient(server.target, timeout_s=30) as c:
            reqs = [c.consume_request("acme", request_id=rid, quantity=q) for rid, q in job]
            if worker % 3 == 0:
                out = [c.consume("acme", request_id=rid, quantity=q) for rid, q in job]
            elif worker % 3 == 1:
                out = [res.response for res in c.consume_batch(reqs).results]
            else:
                out = [res.response for res in c.consume_stream(reqs, timeout_s=30)]
        assert time.monotonic() < deadline, "load took too long"
        return out

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = [r for f in [pool.submit(run, w) for w in range(len(jobs))]
                   for r in f.result(timeout=LOAD_DEADLINE_S)]
    assert len(results) == sum(len(j) for j in jobs)
    plan_units = sum(a.units for r in results for a in r.allocations)
    payg_units = sum(r.payg_units for r in results)
    assert plan_units == LEFT and payg_units == requested - LEFT
    assert all(r.billable and r.journal_seq > 0 for r in results)
    assert all(sum(a.units for a in r.allocations) + r.payg_units in (1, 2, 3) for r in results)
    check_tables(server, plan_id, payg_expected=requested - LEFT)
