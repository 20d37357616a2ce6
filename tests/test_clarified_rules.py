"""The rules as clarified on 2026-11-29 (R12, R22, R23), end to end over gRPC on the test clock.

T0 is 2027-03-10 18:00 UTC+8. Day D = 2027-03-10 ends at T0 + 6 h, when the ledger settles it
by itself (R17); a bill left unpaid there makes the account overdue from that instant (R22).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import grpc
import pytest
from quota_ledger.v1 import common_pb2 as pb

from clients.client import LedgerError
from clients.wire import timestamp

from .conftest import T0, make_account
from .test_rules_api import journal_rows

USD = 1_000_000
HOUR = 3_600
PLAN = "month-100k"  # 100,000 units, one month, USD 60
TO_DAY_END = 6 * HOUR  # from T0 to the end of day D (2027-03-11 00:00 UTC+8)
DAY_D = "2027-03-10"
UTC8 = timezone(timedelta(hours=8))


def overdue_since(acct) -> int | None:
    return acct.overdue_since.ToMicroseconds() if acct.HasField("overdue_since") else None


def _owe_on_day_d(client, account_id: str, payg_units: int) -> None:
    """Pay-as-you-go outside the mainland on D (USD 0.001 each, R10), before any plan (R7)."""
    client.consume(account_id, region="outside", quantity=payg_units)


def _refund_payload(server, plan_id: str) -> dict:
    rows = [json.loads(r[4]) for r in journal_rows(server, "WHERE kind = 'refund'")]
    return next(p for p in rows if p["plan_id"] == plan_id)


def test_r22_refund_that_covers_the_outstanding_ends_overdue(server, client):
    """R21 + R22: a refund to an overdue account pays what is outstanding first; all paid,
    the account is active again, and the rest of the price is back as cash."""
    make_account(client, "full", cash_micros=60 * USD)
    plan = client.purchase_plan("full", PLAN)  # cash 0
    client.update_features("full", [], True)  # custom policy: USD 5 for D, never offset (R14)
    client.advance_time(TO_DAY_END)
    before = client.get_account("full")
    assert before.status == pb.ACCOUNT_STATUS_OVERDUE and before.outstanding_micros == 5 * USD
    client.refund_plan(plan.plan_id, "r22", request_id="refund-full")
    after = client.get_account("full")
    assert after.status == pb.ACCOUNT_STATUS_ACTIVE
    assert (after.outstanding_micros, overdue_since(after)) == (0, None)
    assert (after.cash_balance_micros, after.voucher_balance_micros) == (55 * USD, 0)
    paid = _refund_payload(server, plan.plan_id)
    assert (paid["paid_outstanding_voucher_micros"], paid["paid_outstanding_cash_micros"]) == (
        0, 5 * USD)


def test_r22_refund_that_covers_part_keeps_overdue_since(server, client):
    """R22: a refund smaller than what is outstanding pays it vouchers first, then cash; the
    account stays overdue and its overdue-since instant does not move."""
    make_account(client, "part", cash_micros=40 * USD, voucher_micros=20 * USD)
    _owe_on_day_d(client, "part", 100_000)  # USD 100 pay-as-you-go, no plan yet
    plan = client.purchase_plan("part", PLAN)  # USD 20 vouchers + USD 40 cash
    client.advance_time(TO_DAY_END)
    before = client.get_account("part")
    assert before.outstanding_micros == 100 * USD and overdue_since(before) is not None
    client.advance_time(HOUR)
    client.refund_plan(plan.plan_id, request_id="refund-part")
    after = client.get_account("part")
    assert after.status == pb.ACCOUNT_STATUS_OVERDUE
    assert after.outstanding_micros == 40 * USD
    assert overdue_since(after) == overdue_since(before)
    assert (after.cash_balance_micros, after.voucher_balance_micros) == (0, 0)
    paid = _refund_payload(server, plan.plan_id)
    assert (paid["paid_outstanding_voucher_micros"], paid["paid_outstanding_cash_micros"]) == (
        20 * USD, 40 * USD)
    # The replay of the refund changes nothing (R12).
    client.refund_plan(plan.plan_id, request_id="refund-part")
    assert client.get_account("part").outstanding_micros == 40 * USD


def test_r22_refund_to_a_suspended_account_keeps_it_suspended(server, client):
    """R22 + R24: a refund after the suspension deadline passed pays what is outstanding,
    but only Reactivate returns the account to service."""
    make_account(client, "susp")
    client.update_features("susp", ["a", "b", "c", "d"], True)  # USD 1 + USD 5 a day
    client.advance_time(TO_DAY_END)  # D billed USD 6, unpaid: overdue from here
    client.advance_time(7 * 24 * HOUR + 1)  # strictly more than 168 h (R23)
    suspended = client.get_account("susp")
    assert suspended.status == pb.ACCOUNT_STATUS_SUSPENDED
    owed = suspended.outstanding_micros
    client.top_up("susp", owed + 60 * USD)  # clears what is owed; stays suspended (R24)
    plan = client.purchase_plan("susp", PLAN)  # cash 0 again
    # The suspension day is billed for the configuration it had at its first moment (R23).
    client.advance_time(24 * HOUR)
    owing = client.get_account("susp")
    assert owing.outstanding_micros > 0 and owing.status == pb.ACCOUNT_STATUS_SUSPENDED
    client.refund_plan(plan.plan_id)  # the day after the deadline passed
    after = client.get_account("susp")
    assert after.status == pb.ACCOUNT_STATUS_SUSPENDED
    assert after.outstanding_micros == 0 and overdue_since(after) is None
    assert after.cash_balance_micros == 60 * USD - owing.outstanding_micros
    with pytest.raises(LedgerError) as err:
        client.consume("susp")
    assert err.value.reason == "ACCOUNT_SUSPENDED"
    assert client.reactivate("susp").status == pb.ACCOUNT_STATUS_ACTIVE


def test_r22_partial_top_up_keeps_overdue_since_and_full_one_clears_it(server, client):
    """R22 (clarified): only "nothing outstanding" ends the overdue period."""
    make_account(client, "topup")
    _owe_on_day_d(client, "topup", 10_000)  # USD 10
    client.advance_time(TO_DAY_END)
    since = overdue_since(client.get_account("topup"))
    assert since is not None
    client.advance_time(HOUR)
    partial = client.top_up("topup", 4 * USD, "voucher")
    assert (partial.outstanding_micros, overdue_since(partial)) == (6 * USD, since)
    assert partial.status == pb.ACCOUNT_STATUS_OVERDUE
    full = client.top_up("topup", 7 * USD)
    assert (full.outstanding_micros, overdue_since(full)) == (0, None)
    assert (full.status, full.cash_balance_micros) == (pb.ACCOUNT_STATUS_ACTIVE, USD)


def test_r23_suspension_day_billed_for_its_configuration_and_no_later_day(server, client):
    """R23 (clarified): the day on which suspension happens is billed by R13/R14 for the
    configuration it had at any moment of that day; no later day is billed."""
    make_account(client, "cfg")
    client.update_features("cfg", ["s1", "s2", "s3", "s4", "s5"], True)  # USD 2 + USD 5 a day
    client.advance_time(TO_DAY_END + 7 * 24 * HOUR + 1)  # suspended at 00:00:00.000001
    acct = client.get_account("cfg")
    assert acct.status == pb.ACCOUNT_STATUS_SUSPENDED and not acct.custom_policy_enabled
    suspended_day = (T0 + timedelta(seconds=TO_DAY_END + 7 * 24 * HOUR)).astimezone(
        UTC8).date().isoformat()
    client.advance_time(3 * 24 * HOUR)  # three more days end
    bills = {b.billing_day: b for b in client.list_bills("cfg", DAY_D, "2027-03-31").bills}
    fees = {(ln.item, ln.amount_micros) for ln in bills[suspended_day].lines}
    assert fees == {("scenarios", 2 * USD), ("custom_policy", 5 * USD)}
    assert max(bills) == suspended_day  # nothing after the suspension day


def test_r12_non_billable_and_dry_run_claim_no_key(server, client):
    """R12 (clarified): a request that changes nothing claims no key, so the same key can
    then carry a billable request of other content."""
    make_account(client, "keys", cash_micros=USD)
    not_billable = client.consume("keys", step="4.1", architecture="v2", request_id="k1")
    assert not not_billable.billable
    real = client.consume("keys", quantity=3, request_id="k1")
    assert real.billable and not real.replayed and real.payg_units == 3
    dry = client.consume("keys", quantity=9, dry_run=True, request_id="k2")
    assert dry.billable and dry.journal_seq == 0
    real2 = client.consume("keys", quantity=2, request_id="k2")
    assert not real2.replayed and real2.payg_units == 2


def test_r12_quantity_zero_and_one_are_the_same_content(server, client):
    """R12 (clarified): content is compared after defaults; quantity 0 is quantity 1."""
    make_account(client, "qty")
    first = client.consume("qty", quantity=0, request_id="q")
    again = client.consume("qty", quantity=1, request_id="q")
    assert again.replayed and again.journal_seq == first.journal_seq
    with pytest.raises(LedgerError) as err:
        client.consume("qty", quantity=2, request_id="q")
    assert err.value.reason == "IDEMPOTENCY_KEY_REUSED"


def test_r25_a_refund_written_before_the_clarification_keeps_its_meaning():
    """History is not rewritten: a refund entry without paid_outstanding_* fields (written
    before 2026-11-29) rebuilds as paying nothing outstanding; a new one as what it paid."""
    from ledger.rebuild import rebuild

    def entries(refund: dict) -> list:
        return [
            (1, 0, "account_created", "a", {"display_name": ""}),
            (2, 1, "top_up", "a", {"kind": 1, "amount_micros": 60 * USD,
                                   "paid_outstanding_micros": 0}),
            (3, 2, "purchase", "a", {"plan_id": "plan-3", "spec_id": PLAN, "units": 100_000,
                                     "validity": 1, "price_micros": 60 * USD,
                                     "paid_voucher_micros": 0, "paid_cash_micros": 60 * USD,
                                     "expires_at_us": 10**15}),
            (4, 3, "bill", "a", {"day": DAY_D, "paid_voucher_micros": 0, "paid_cash_micros": 0,
                                 "outstanding_micros": 5 * USD}),
            (5, 4, "refund", "a", {"plan_id": "plan-3", "reason": "", "voucher_micros": 0,
                                   "cash_micros": 60 * USD, **refund}),
        ]

    old = rebuild(entries({})).accounts["a"]
    new = rebuild(entries({"paid_outstanding_voucher_micros": 0,
                           "paid_outstanding_cash_micros": 5 * USD})).accounts["a"]
    assert (old["cash_micros"], old["outstanding_micros"], old["status"]) == (
        60 * USD, 5 * USD, pb.ACCOUNT_STATUS_OVERDUE)
    assert (new["cash_micros"], new["outstanding_micros"], new["status"]) == (
        55 * USD, 0, pb.ACCOUNT_STATUS_ACTIVE)
    assert new["overdue_since_us"] is None and old["overdue_since_us"] == 3


def test_r26_client_observed_at_is_kept_for_audit_and_never_decides_the_day(server, client):
    """R26/R2: a spooled request arrives days after the caller saw it; it is billed on the
    ledger's day of arrival, and its client_observed_at is kept in the journal entry."""
    make_account(client, "late")
    seen = datetime(2027, 3, 1, 9, 30, tzinfo=UTC)  # a settled day long before T0
    req = client.consume_request("late", request_id="spooled-1")
    req.client_observed_at.CopyFrom(timestamp(seen))
    r = client.stubs["ledger"].Consume(req, timeout=10)
    assert r.billing_day == DAY_D and not r.replayed
    [entry] = [json.loads(row[4]) for row in journal_rows(
        server, "WHERE request_id = ?", ("spooled-1",))]
    assert entry["day"] == DAY_D and entry["client_ts_us"] == int(seen.timestamp()) * 1_000_000
    # The older field name means the same instant: equal values are accepted (a replay) ...
    req.client_timestamp.CopyFrom(timestamp(seen))
    assert client.stubs["ledger"].Consume(req, timeout=10).replayed
    # ... different ones are refused as malformed, and nothing is written.
    before = server.journal_count()
    other = client.consume_request("late", request_id="spooled-2")
    other.client_observed_at.CopyFrom(timestamp(seen))
    other.client_timestamp.CopyFrom(timestamp(datetime(2027, 3, 2, tzinfo=UTC)))
    with pytest.raises(grpc.RpcError) as err:
        client.stubs["ledger"].Consume(other, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "client_observed_at" in err.value.details()
    assert server.journal_count() == before
