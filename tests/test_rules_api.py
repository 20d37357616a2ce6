"""The billing rules end to end over gRPC, through the client library, one server per test."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest
from quota_ledger.v1 import common_pb2 as pb

from clients.client import LedgerError
from ledger.store import canonical_json, consume_entries

from .conftest import T0, make_account

USD = 1_000_000
PLAN = "month-100k"  # 100,000 units, one month, USD 60
PLAN_UNITS = 100_000
PLAN_PRICE = 60 * USD


def allocs(r) -> list[tuple[str, int]]:
    return [(a.plan_id, a.units) for a in r.allocations]


def as_dt(t) -> datetime:
    return t.ToDatetime(tzinfo=UTC)


def response_fields(r) -> tuple:
    """Everything a replay must repeat (R12), except the replayed flag itself."""
    return (r.billable, allocs(r), r.payg_units, r.payg_amount_micros, r.billing_day,
            r.recorded_at.ToJsonString(), r.plan_units_remaining, r.journal_seq, r.request_id)


def journal_rows(server, where: str = "", params: tuple = ()) -> list[tuple]:
    """Journal entries (seq, kind, account_id, request_id, payload JSON), the consumes of a
    block (ledger/store/blocks.py) as one entry each; ``where`` filters those entries (SQL,
    run on an in-memory copy, whichever backend the server has)."""
    src, mem = server.read_conn(), sqlite3.connect(":memory:")
    try:
        mem.execute("CREATE TABLE entries (seq, kind, account_id, request_id, payload)")
        mem.executemany("INSERT INTO entries VALUES (?,?,?,?,?)", [
            (seq, "consume", account_id, request_id, canonical_json(payload))
            for seq, _, account_id, request_id, payload in consume_entries(src)])
        mem.executemany("INSERT INTO entries VALUES (?,?,?,?,?)", [
            (*row[:4], bytes(row[4]).decode() if not isinstance(row[4], str) else row[4])
            for row in src.execute("SELECT seq, kind, account_id, request_id, payload"
                                   " FROM journal WHERE kind NOT IN ('consume', 'consume_block')")])
        return mem.execute(f"SELECT seq, kind, account_id, request_id, payload FROM entries "
                           f"{where} ORDER BY seq", params).fetchall()
    finally:
        src.close()
        mem.close()


def test_r5_quantity_n_is_n_units_under_one_key(server, client):
    """Quantity N takes N units (split plan/payg as needed) in one journal entry, one key."""
    make_account(client, cash_micros=100 * USD)
    plan = client.purchase_plan("acme", PLAN)
    client.consume("acme", quantity=PLAN_UNITS - 100)
    before = server.journal_count()
    r = client.consume("acme", quantity=250, request_id="q-250")
    assert allocs(r) == [(plan.plan_id, 100)] and r.payg_units == 150
    assert r.payg_amount_micros == 150 * 700 and r.plan_units_remaining == 0
    assert server.journal_count() == before + 1
    rows = journal_rows(server, "WHERE request_id = ?", ("q-250",))
    assert len(rows) == 1 and json.loads(rows[0][4])["qty"] == 250
    again = client.consume("acme", quantity=250, request_id="q-250")
    assert again.replayed and allocs(again) == allocs(r) and again.payg_units == 150
    assert server.journal_count() == before + 1
    one = client.consume("acme", quantity=0, request_id="q-0")  # 0 means 1
    assert one.payg_units == 1 and one.payg_amount_micros == 700


def test_r7_plan_never_covers_earlier_requests_and_covers_from_purchase_on(server, client):
    """A request before a purchase stays payg; from the purchase instant on it is covered."""
    make_account(client, cash_micros=100 * USD)
    early = client.consume("acme", quantity=3, request_id="early")
    assert early.payg_units == 3 and not early.allocations
    bought_at = T0 + timedelta(hours=1)
    client.set_time(bought_at)
    plan = client.purchase_plan("acme", PLAN)
    assert as_dt(plan.purchased_at) == bought_at
    at_purchase = client.consume("acme", quantity=2, request_id="at-purchase")
    assert as_dt(at_purchase.recorded_at) == bought_at  # purchased_at <= t: covered (R6)
    assert allocs(at_purchase) == [(plan.plan_id, 2)] and at_purchase.payg_units == 0
    client.set_time(bought_at + timedelta(minutes=5))
    later = client.consume("acme", request_id="later")
    assert allocs(later) == [(plan.plan_id, 1)]
    # The early request was never offset afterwards.
    replay = client.consume("acme", quantity=3, request_id="early")
    assert replay.replayed and replay.payg_units == 3 and not replay.allocations
    usage = client.get_usage("acme", "2027-03-10", "2027-03-10").days[0]
    assert [(u.region, u.units, u.amount_micros) for u in usage.payg] == [
        (pb.REGION_CHINESE_MAINLAND, 3, 2_100)]
    assert [(p.plan_id, p.units) for p in usage.plan_units] == [(plan.plan_id, 3)]
    assert client.get_remaining("acme").units_remaining_total == PLAN_UNITS - 3


def test_r9_expiry_forfeits_remaining_units_then_payg(server, client):
    """At expires_at the unused units are forfeited and journaled; later requests go payg."""
    make_account(client, cash_micros=100 * USD)
    plan = client.purchase_plan("acme", PLAN)
    # R6: one month at the same UTC+8 wall-clock time (T0 is 18:00+08 on 2027-03-10).
    assert as_dt(plan.expires_at) == datetime(2027, 4, 10, 10, 0, tzinfo=UTC)
    client.consume("acme", quantity=40)
    client.set_time(as_dt(plan.expires_at) - timedelta(seconds=1))
    last = client.consume("acme", request_id="last-second")
    assert allocs(last) == [(plan.plan_id, 1)]
    client.set_time(as_dt(plan.expires_at))  # valid means t < expires_at
    listed = client.list_plans("acme", include_inactive=True).plans
    assert len(listed) == 1
    p = listed[0]
    assert p.status == pb.PLAN_STATUS_EXPIRED
    assert (p.units_remaining, p.units_forfeited, p.units_consumed) == (0, PLAN_UNITS - 41, 41)
    assert not client.list_plans("acme").plans
    assert client.get_remaining("acme").units_remaining_total == 0
    after = client.consume("acme", quantity=2, region="outside")
    assert not after.allocations and after.payg_units == 2 and after.payg_amount_micros == 2_000
    assert after.plan_units_remaining == 0
    about_plan = [json.loads(row[4]) for row in journal_rows(server, "WHERE kind != 'purchase'")
                  if json.loads(row[4]).get("plan_id") == plan.plan_id]
    assert len(about_plan) == 1, "R9: the forfeit is one journal entry"
    assert PLAN_UNITS - 41 in about_plan[0].values()


def test_r10_payg_prices_by_region(server, client):
    """Uncovered requests cost 700 micros in the mainland and 1,000 outside it."""
    make_account(client)
    cn = client.consume("acme", quantity=3, region="mainland")
    intl = client.consume("acme", quantity=3, region="outside")
    assert (cn.payg_units, cn.payg_amount_micros) == (3, 2_100)
    assert (intl.payg_units, intl.payg_amount_micros) == (3, 3_000)
    rem = client.get_remaining("acme")
    assert (rem.payg_units, rem.payg_amount_micros) == (6, 5_100)
    day = client.get_usage("acme", "2027-03-10", "2027-03-10").days[0]
    assert sorted((u.region, u.units, u.amount_micros) for u in day.payg) == [
        (pb.REGION_CHINESE_MAINLAND, 3, 2_100), (pb.REGION_OUTSIDE_CHINESE_MAINLAND, 3, 3_000)]


def test_r12_replay_returns_first_result_and_changes_nothing(server, client):
    """Same key and content: the first result again, marked replayed, journal unchanged."""
    make_account(client, cash_micros=100 * USD)
    make_account(client, "beta")
    plan = client.purchase_plan("acme", PLAN)
    first = client.consume("acme", quantity=3, request_id="k1", scenario_id="login")
    assert not first.replayed and allocs(first) == [(plan.plan_id, 3)]
    client.set_time(T0 + timedelta(hours=7))  # later, and on the next billing day
    count = server.journal_count()
    again = client.consume("acme", quantity=3, request_id="k1", scenario_id="login")
    assert again.replayed
    assert response_fields(again) == response_fields(first)
    assert server.journal_count() == count
    assert client.get_remaining("acme").units_remaining_total == PLAN_UNITS - 3
    # Same key, different content: refused, and says so.
    for changed in ({"quantity": 4}, {"region": "outside"}, {"captcha_type": "puzzle"},
                    {"scenario_id": "checkout"}):
        kwargs = {"quantity": 3, "scenario_id": "login", **changed}
        with pytest.raises(LedgerError) as exc:
            client.consume("acme", request_id="k1", **kwargs)
        assert exc.value.code.name == "ALREADY_EXISTS", changed
        assert exc.value.reason == "IDEMPOTENCY_KEY_REUSED"
        assert "k1" in exc.value.message
    assert server.journal_count() == count
    # The same key on another account is independent.
    other = client.consume("beta", quantity=3, request_id="k1", scenario_id="login")
    assert not other.replayed and other.payg_units == 3
    assert other.journal_seq > first.journal_seq


def test_r12_admin_requests_replay_and_refuse_reuse(server, client):
    """Top-ups and purchases replay once per key; a key reused with other content is refused."""
    make_account(client)
    a1 = client.top_up("acme", 100 * USD, "cash", request_id="t1")
    a2 = client.top_up("acme", 100 * USD, "cash", request_id="t1")
    assert a1.cash_balance_micros == a2.cash_balance_micros == 100 * USD
    with pytest.raises(LedgerError) as exc:
        client.top_up("acme", 5 * USD, "cash", request_id="t1")
    assert (exc.value.code.name, exc.value.reason) == ("ALREADY_EXISTS", "IDEMPOTENCY_KEY_REUSED")
    p1 = client.purchase_plan("acme", PLAN, request_id="buy-1")
    p2 = client.purchase_plan("acme", PLAN, request_id="buy-1")
    assert p1.plan_id == p2.plan_id
    assert client.get_account("acme").cash_balance_micros == 100 * USD - PLAN_PRICE
    with pytest.raises(LedgerError) as exc:
        client.purchase_plan("acme", "month-1m", request_id="buy-1")
    assert exc.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert len(client.list_plans("acme", include_inactive=True).plans) == 1


def test_r12_same_key_twice_in_one_batch_and_stream(server, client):
    """A key repeated inside one batch or stream replays the first item; other content fails."""
    make_account(client, cash_micros=100 * USD)
    plan = client.purchase_plan("acme", PLAN)
    count = server.journal_count()
    reqs = [client.consume_request("acme", request_id="dup", quantity=2),
            client.consume_request("acme", request_id="dup", quantity=2),
            client.consume_request("acme", request_id="dup", quantity=3)]
    res = client.consume_batch(reqs).results
    first, second = res[0].response, res[1].response
    assert not first.replayed and allocs(first) == [(plan.plan_id, 2)]
    assert second.replayed and response_fields(second) == response_fields(first)
    assert res[2].error.reason == "IDEMPOTENCY_KEY_REUSED"
    streamed = list(client.consume_stream(
        [client.consume_request("acme", request_id="dup-s", quantity=2),
         client.consume_request("acme", request_id="dup-s", quantity=2),
         client.consume_request("acme", request_id="dup", quantity=2)], timeout_s=30))
    assert not streamed[0].response.replayed
    assert streamed[1].response.replayed
    assert response_fields(streamed[1].response) == response_fields(streamed[0].response)
    assert response_fields(streamed[2].response) == response_fields(first)
    assert server.journal_count() == count + 2
    assert client.get_remaining("acme").units_remaining_total == PLAN_UNITS - 4
    # Keys are per kind: a top-up may use a consume's key.
    assert client.top_up("acme", 1, "cash", request_id="dup").cash_balance_micros > 0


def test_r12_key_reused_with_non_billable_content_is_refused(server, client):
    """A key used for a billable request, reused with a non-billable combination, is refused."""
    make_account(client)
    client.consume("acme", request_id="k1", architecture="v2", step="3")
    count = server.journal_count()
    with pytest.raises(LedgerError) as exc:
        client.consume("acme", request_id="k1", architecture="v2", step="4.1")
    assert exc.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert server.journal_count() == count


def test_r16_purchase_pays_vouchers_first_then_cash(server, client):
    """A purchase takes vouchers first, then cash; the plan records both parts."""
    make_account(client, cash_micros=100 * USD, voucher_micros=25 * USD)
    plan = client.purchase_plan("acme", PLAN)
    assert (plan.paid_voucher_micros, plan.paid_cash_micros) == (25 * USD, 35 * USD)
    acct = client.get_account("acme")
    assert (acct.voucher_balance_micros, acct.cash_balance_micros) == (0, 65 * USD)
    make_account(client, "rich-in-vouchers", cash_micros=10 * USD, voucher_micros=70 * USD)
    plan = client.purchase_plan("rich-in-vouchers", PLAN)
    assert (plan.paid_voucher_micros, plan.paid_cash_micros) == (PLAN_PRICE, 0)
    acct = client.get_account("rich-in-vouchers")
    assert (acct.voucher_balance_micros, acct.cash_balance_micros) == (10 * USD, 10 * USD)


def test_r16_insufficient_funds_refused_and_nothing_changes(server, client):
    """Vouchers plus cash short of the price: FAILED_PRECONDITION, balances/plans/journal intact."""
    make_account(client, "poor", cash_micros=20 * USD, voucher_micros=39_999_999)
    count = server.journal_count()
    with pytest.raises(LedgerError) as exc:
        client.purchase_plan("poor", PLAN, request_id="buy-poor")
    assert (exc.value.code.name, exc.value.reason) == ("FAILED_PRECONDITION",
                                                       "INSUFFICIENT_FUNDS")
    assert server.journal_count() == count
    acct = client.get_account("poor")
    assert (acct.voucher_balance_micros, acct.cash_balance_micros) == (39_999_999, 20 * USD)
    assert not client.list_plans("poor", include_inactive=True).plans
    # The refusal claimed no key: after a top-up the same request_id buys the plan.
    client.top_up("poor", 1, "cash")
    plan = client.purchase_plan("poor", PLAN, request_id="buy-poor")
    assert (plan.paid_voucher_micros, plan.paid_cash_micros) == (39_999_999, 20 * USD + 1)
    acct = client.get_account("poor")
    assert (acct.voucher_balance_micros, acct.cash_balance_micros) == (0, 0)


R3_BILLABLE = {("v2", t, "3") for t in ("slider", "puzzle", "one_click", "image_restoration",
                                         "invisible")} | {
    ("v3", t, "3") for t in ("slider", "puzzle", "one_click", "image_restoration",
                             "invisible")} | {("v3", "invisible", "4.1")}


def test_r3_billing_step_table(server, client):
    """Only the R3 table's combinations bill; every other one is acknowledged, free, unjournaled."""
    make_account(client, cash_micros=100 * USD)
    client.purchase_plan("acme", PLAN)
    remaining = PLAN_UNITS
    for arch in ("v2", "v3"):
        for ctype in ("slider", "puzzle", "one_click", "image_restoration", "invisible"):
            for step in ("3", "4.1"):
                count = server.journal_count()
                r = client.consume("acme", architecture=arch, captcha_type=ctype, step=step,
                                   quantity=2)
                combo = (arch, ctype, step)
                if combo in R3_BILLABLE:
                    remaining -= 2
                    assert r.billable and sum(a.units for a in r.allocations) == 2, combo
                    assert server.journal_count() == count + 1, combo
                else:
                    assert not r.billable, combo
                    assert not r.allocations and r.payg_units == 0, combo
                    assert r.payg_amount_micros == 0 and r.journal_seq == 0, combo
                    assert server.journal_count() == count, combo
                assert r.plan_units_remaining == remaining, combo
    assert client.get_remaining("acme").units_remaining_total == remaining == PLAN_UNITS - 22


def test_r2_billing_day_follows_ledger_clock_not_client_timestamp(server, client):
    """The ledger's clock (UTC+8 day, R1) decides billing_day; client_timestamp never does."""
    make_account(client)
    before_midnight = datetime(2027, 3, 10, 15, 59, 59, 999_999, tzinfo=UTC)  # 23:59:59+08
    client.set_time(before_midnight)

    def consume_with_client_ts(request_id: str, client_ts: datetime):
        req = client.consume_request("acme", request_id=request_id)
        req.client_timestamp.FromDatetime(client_ts)
        return client.stubs["ledger"].Consume(req, timeout=10)

    r = consume_with_client_ts("c1", datetime(2027, 3, 12, 3, 0, tzinfo=UTC))
    assert r.billing_day == "2027-03-10" and as_dt(r.recorded_at) == before_midnight
    midnight = before_midnight + timedelta(microseconds=1)  # 2027-03-11 00:00+08, still 10th UTC
    client.set_time(midnight)
    r = consume_with_client_ts("c2", datetime(2027, 3, 10, 1, 0, tzinfo=UTC))
    assert r.billing_day == "2027-03-11" and as_dt(r.recorded_at) == midnight
    usage = client.get_usage("acme", "2027-03-09", "2027-03-12").days
    assert [(d.billing_day, sum(u.units for u in d.payg)) for d in usage] == [
        ("2027-03-09", 0), ("2027-03-10", 1), ("2027-03-11", 1), ("2027-03-12", 0)]


def test_dry_run_changes_nothing(server, client):
    """dry_run answers what would happen, but journals nothing and claims no key."""
    make_account(client, cash_micros=100 * USD)
    plan = client.purchase_plan("acme", PLAN)
    client.consume("acme", quantity=PLAN_UNITS - 5)
    count = server.journal_count()
    dry = client.consume("acme", quantity=8, request_id="d1", dry_run=True, region="outside")
    assert dry.billable and not dry.replayed and dry.journal_seq == 0
    assert allocs(dry) == [(plan.plan_id, 5)] and dry.payg_units == 3
    assert dry.payg_amount_micros == 3_000 and dry.plan_units_remaining == 0
    assert server.journal_count() == count
    rem = client.get_remaining("acme")
    assert rem.units_remaining_total == 5 and rem.payg_units == 0
    real = client.consume("acme", quantity=8, request_id="d1", region="outside")
    assert not real.replayed and real.journal_seq > 0
    assert (allocs(real), real.payg_units) == (allocs(dry), dry.payg_units)
    assert server.journal_count() == count + 1
