"""Daily settlement through the gRPC API with the test clock (R13-R24)."""

from datetime import UTC, datetime, timedelta

import pytest

from clients.client import LedgerError

from .conftest import make_account

D0 = datetime(2027, 3, 11, 0, 0, tzinfo=UTC) - timedelta(hours=8)  # 2027-03-11 00:00 +08:00


def refused(fn, *args, **kwargs) -> LedgerError:
    with pytest.raises(LedgerError) as info:
        fn(*args, **kwargs)
    return info.value


def test_r20_worked_example_exactly(client):
    """500,000 mainland requests, 5 scenarios, custom policy: 350.00 + 2.00 + 5.00 = 357.00."""
    make_account(client, cash_micros=1_000 * 1_000_000)
    client.set_time(D0 + timedelta(hours=1))
    client.update_features("acme", ["s1", "s2", "s3", "s4", "s5"], True)
    for _ in range(5):
        client.consume("acme", region="mainland", quantity=100_000)
    client.set_time(D0 + timedelta(days=1))  # the day has ended: the scheduler settles it
    bill = client.get_bill("acme", "2027-03-11")
    lines = {(ln.item, ln.quantity, ln.amount_micros) for ln in bill.lines}
    assert lines == {("verification", 500_000, 350_000_000), ("scenarios", 2, 2_000_000),
                     ("custom_policy", 1, 5_000_000)}
    assert bill.total_micros == bill.amount_due_micros == 357_000_000
    assert bill.paid_cash_micros == 357_000_000 and bill.outstanding_micros == 0
    assert bill.bill_date == "2027-03-12"
    assert client.get_account("acme").cash_balance_micros == 643_000_000


def test_r17_settling_a_day_that_has_not_ended_is_refused(client):
    """SettleDay for today answers DAY_NOT_ENDED, down to the last microsecond of the day."""
    make_account(client)
    client.set_time(D0 + timedelta(days=1) - timedelta(microseconds=1))
    err = refused(client.settle_day, "2027-03-11")
    assert err.code.name == "FAILED_PRECONDITION" and err.reason == "DAY_NOT_ENDED"
    client.set_time(D0 + timedelta(days=1))
    assert client.settle_day("2027-03-11") is not None


def test_r19_settling_again_changes_nothing(client):
    """A settled day returns the same bills again and charges nothing twice."""
    make_account(client, cash_micros=10_000_000)
    client.set_time(D0 + timedelta(hours=2))
    client.consume("acme", quantity=1_000)
    client.set_time(D0 + timedelta(days=2))
    first = client.settle_day("2027-03-11")
    again = client.settle_day("2027-03-11")
    assert list(first.bills) == list(again.bills) and len(first.bills) == 1
    assert client.get_account("acme").cash_balance_micros == 10_000_000 - 700_000


def test_r22_r23_r24_overdue_suspension_reactivation(client):
    """Unpaid bill -> overdue; >168h -> suspended, config deleted; top-up + reactivate."""
    make_account(client)
    client.set_time(D0 + timedelta(hours=3))
    client.update_features("acme", ["a", "b", "c", "d"], False)
    client.consume("acme", quantity=10)
    client.set_time(D0 + timedelta(days=1))
    acct = client.get_account("acme")
    assert acct.status == 2 and acct.outstanding_micros == 1_010_000  # OVERDUE (R22)
    since = acct.overdue_since.ToDatetime(tzinfo=UTC)
    assert since == D0 + timedelta(days=1)
    client.set_time(since + timedelta(hours=168) - timedelta(seconds=1))
    assert client.get_account("acme").status == 2
    client.set_time(since + timedelta(hours=168))
    assert client.get_account("acme").status == 2  # strictly more than 168 hours
    client.set_time(since + timedelta(hours=168, seconds=1))
    acct = client.get_account("acme")
    assert acct.status == 3 and list(acct.scenario_ids) == []  # SUSPENDED, deleted (R23)
    err = refused(client.consume, "acme")
    assert err.reason == "ACCOUNT_SUSPENDED"
    err = refused(client.reactivate, "acme")
    assert err.reason == "OUTSTANDING_BALANCE"  # R24
    # R13: 4 scenarios cost USD 1 a day on every day they were configured, suspension day too.
    owed = client.get_account("acme").outstanding_micros
    assert owed == 1_010_000 + 7 * 1_000_000
    client.top_up("acme", owed + 1_000_000, "cash")  # R22: pays what is outstanding first
    acct = client.get_account("acme")
    assert acct.outstanding_micros == 0 and acct.status == 3
    assert acct.cash_balance_micros == 1_000_000 and not acct.HasField("overdue_since")
    assert client.reactivate("acme").status == 1
    assert client.consume("acme").billable


def test_r21_refund_window_and_use(client):
    """Refund within 120h of an unused plan returns the money as paid; else the rule is named."""
    make_account(client, cash_micros=50_000_000, voucher_micros=20_000_000)
    bought = client.purchase_plan("acme", "month-100k")
    assert (bought.paid_voucher_micros, bought.paid_cash_micros) == (20_000_000, 40_000_000)
    purchased = bought.purchased_at.ToDatetime(tzinfo=UTC)
    client.set_time(purchased + timedelta(hours=120))
    refunded = client.refund_plan(bought.plan_id, "changed my mind")
    assert refunded.status == 4
    acct = client.get_account("acme")
    assert (acct.voucher_balance_micros, acct.cash_balance_micros) == (20_000_000, 50_000_000)
    late = client.purchase_plan("acme", "month-100k")
    client.set_time(late.purchased_at.ToDatetime(tzinfo=UTC) + timedelta(hours=120, seconds=1))
    assert refused(client.refund_plan, late.plan_id).reason == "REFUND_WINDOW_PASSED"
    client.top_up("acme", 60_000_000)
    used = client.purchase_plan("acme", "month-100k")
    client.consume("acme", quantity=100_001)  # R8: the older plan first, then one from this
    assert refused(client.refund_plan, used.plan_id).reason == "PLAN_USED"


def test_r18_bill_lists_payg_per_region_plan_offsets_and_fees(client):
    """One bill dated D+1: a verification line per region, offsets per plan, both fees."""
    make_account(client, cash_micros=200_000_000)
    client.set_time(D0 + timedelta(hours=1))
    plan = client.purchase_plan("acme", "month-100k")
    client.top_up("acme", 3_000_000, "voucher")
    client.update_features("acme", ["a", "b", "c", "d"], True)
    client.consume("acme", quantity=100_010, region="mainland")  # 100,000 offset, 10 payg
    client.consume("acme", quantity=3, region="outside")
    client.set_time(D0 + timedelta(days=1))
    bill = client.get_bill("acme", "2027-03-11")
    assert bill.bill_date == "2027-03-12"
    assert [(p.plan_id, p.units) for p in bill.plan_offsets] == [(plan.plan_id, 100_000)]
    assert [(ln.item, ln.region, ln.quantity, ln.unit_price_micros, ln.amount_micros)
            for ln in bill.lines] == [
        ("verification", 1, 10, 700, 7_000), ("verification", 2, 3, 1_000, 3_000),
        ("scenarios", 0, 1, 1_000_000, 1_000_000), ("custom_policy", 0, 1, 5_000_000, 5_000_000)]
    assert bill.total_micros == 6_010_000 and bill.amount_due_micros == 6_010_000
    assert (bill.paid_voucher_micros, bill.paid_cash_micros) == (3_000_000, 3_010_000)  # R16


def test_r4_every_verification_at_a_billable_step_is_one_request(client):
    """Pass, block or secondary authentication: the outcome is no input, each bills one unit."""
    make_account(client)
    outcomes = [client.consume("acme", scenario_id=s) for s in ("passed", "blocked", "2fa")]
    assert [r.payg_units for r in outcomes] == [1, 1, 1]
    assert client.get_remaining("acme").payg_units == 3
