"""R11: SIGKILL in the middle of a load loses no acknowledged request and takes no unit twice."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from clients.client import LedgerClient, LedgerError
from ledger.store import consume_entries

from .conftest import make_account

PLAN_UNITS = 100_000  # month-100k
LEFT = 1_000  # units left in the plan when the load starts
THREADS = 50  # callers in flight when the server is killed
PER_THREAD = 40  # 2,000 requests at most
KILL_AFTER_ACKS = 500
LOAD_DEADLINE_S = 20.0
BATCH = 500


def content(i: int) -> dict:
    """Request i's content is fixed, so it can be re-sent exactly (R12)."""
    return {"request_id": f"load-{i}", "quantity": 1 + i % 3,
            "region": "mainland" if i % 2 else "outside"}


def outcome(r) -> tuple:
    return ([(a.plan_id, a.units) for a in r.allocations], r.payg_units, r.payg_amount_micros,
            r.journal_seq, r.billing_day, r.recorded_at.ToJsonString(), r.plan_units_remaining)


def consumes(server) -> list[tuple]:
    """(seq, at_us, account_id, request_id, payload) of every consume entry (read-only)."""
    conn = server.read_conn()
    try:
        return list(consume_entries(conn))
    finally:
        conn.close()


def read_db(server, sql: str, params: tuple = ()) -> list[tuple]:
    conn = server.read_conn()
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def resend(c: LedgerClient, ids: list[int]) -> dict[int, object]:
    """Re-send requests in batches; every item must come back with a response."""
    out = {}
    for k in range(0, len(ids), BATCH):
        chunk = ids[k:k + BATCH]
        res = c.consume_batch([c.consume_request("acme", **content(i)) for i in chunk]).results
        for i, r in zip(chunk, res, strict=True):
            assert r.WhichOneof("outcome") == "response", (i, r.error)
            out[i] = r.response
    return out


def test_r11_sigkill_keeps_every_acknowledged_request(server, client):
    """Acked requests replay identically after SIGKILL + restart; units are conserved exactly."""
    make_account(client, cash_micros=100_000_000)
    plan = client.purchase_plan("acme", "month-100k")
    client.consume("acme", quantity=PLAN_UNITS - LEFT, request_id="warm-up")
    total = THREADS * PER_THREAD

    acked: dict[int, object] = {}
    lock = threading.Lock()
    killed = threading.Event()
    deadline = time.monotonic() + LOAD_DEADLINE_S

    def load(worker: int) -> None:
        with LedgerClient(server.target, timeout_s=5, retries=0) as c:
            for i in range(worker, total, THREADS):
                if killed.is_set() or time.monotonic() > deadline:
                    return
                try:
                    r = c.consume("acme", **content(i))
                except LedgerError:
                    return  # not acknowledged: the server is gone
                with lock:
                    acked[i] = r

    threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(THREADS)]
    for t in threads:
        t.start()
    while len(acked) < KILL_AFTER_ACKS and time.monotonic() < deadline:
        time.sleep(0.005)
    server.kill()
    killed.set()
    for t in threads:
        t.join(timeout=15)
        assert not t.is_alive()
    assert KILL_AFTER_ACKS <= len(acked) < total, "the kill must land in the middle of the load"

    server.start()  # same database; the test clock resumes from the persisted time
    with server.client() as c:
        assert c.get_time().now.ToDatetime().year == 2027
        # 1. Every acknowledged request is there, exactly as answered.
        replays = resend(c, sorted(acked))
        for i, r in replays.items():
            assert r.replayed, f"acknowledged request {i} was lost"
            assert outcome(r) == outcome(acked[i]), i
        # 2. The journal holds every acknowledged entry, with its own allocations.
        rows = {rid: (seq, payload) for seq, _, _, rid, payload in consumes(server)
                if rid.startswith("load-")}
        for i, r in acked.items():
            seq, payload = rows[f"load-{i}"]
            assert seq == r.journal_seq
            assert [tuple(a) for a in payload["alloc"]] == [(a.plan_id, a.units)
                                                            for a in r.allocations]
        acked_units = sum(sum(a.units for a in r.allocations) + r.payg_units
                          for r in acked.values())
        journal_units = sum(sum(a[1] for a in p["alloc"]) + p["payg_units"]
                            for _, p in rows.values())
        assert acked_units <= journal_units
        # 3. Finish the load: unacknowledged requests are applied at most once.
        rest = resend(c, [i for i in range(total) if i not in acked])
        assert all(r.replayed == (f"load-{i}" in rows) for i, r in rest.items())
        remaining = c.get_remaining("acme").units_remaining_total
    assert remaining == 0

    # 4. No unit taken twice: per plan, offsets + remaining == total - forfeited, never < 0.
    seqs = read_db(server, "SELECT count(*), max(seq) FROM journal")
    assert seqs[0][0] == seqs[0][1], "the journal is gap-free"
    for plan_id, units_total, units_remaining, forfeited in read_db(
            server, "SELECT plan_id, units_total, units_remaining, units_forfeited FROM plans"):
        assert units_remaining >= 0
        [(offset,)] = read_db(server, "SELECT coalesce(sum(units), 0) FROM offsets_daily"
                                      " WHERE plan_id = ?", (plan_id,))
        assert offset + units_remaining == units_total - forfeited, plan_id
    per_plan: dict[str, int] = defaultdict(int)
    payg = 0
    for *_, p in consumes(server):
        payg += p["payg_units"]
        for plan_id, units in p["alloc"]:
            per_plan[plan_id] += units
    assert dict(per_plan) == {plan.plan_id: PLAN_UNITS}
    requested = sum(content(i)["quantity"] for i in range(total))
    assert payg == requested - LEFT
    [(usage,)] = read_db(server, "SELECT sum(payg_units) FROM usage_daily")
    assert usage == payg
