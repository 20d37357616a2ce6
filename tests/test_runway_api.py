"""GetRunway over gRPC on both backends (issue 22): the figures equal the unit-by-unit
reference fed only from what GetUsage and ListPlans say; ties (R8), a month-end expiry
(R6), a plan that expires before the rate uses it up (R9), the region mix (R10)."""

from __future__ import annotations

from datetime import datetime

import grpc
import pytest

from clients.client import LedgerError
from ledger.calendar import BILLING_TZ, from_datetime
from ledger.model import PlanState, Validity

from .conftest import make_account
from .test_runway import reference

USD = 1_000_000
CREATED = datetime(2027, 3, 29, 12, 0, tzinfo=BILLING_TZ)  # day 03-29 is partial: not counted
PAYG_DAY = datetime(2027, 3, 30, 9, 0, tzinfo=BILLING_TZ)
BOUGHT = datetime(2027, 3, 31, 10, 0, tzinfo=BILLING_TZ)  # month plans: expire 04-30 (R6)
LAST_DAY = datetime(2027, 4, 1, 15, 0, tzinfo=BILLING_TZ)
NOW = datetime(2027, 4, 2, 8, 0, tzinfo=BILLING_TZ)


@pytest.fixture
def history(client):
    """03-30: 3,000 mainland and 6,000 outside pay-as-you-go; 03-31 10:00: two month plans
    bought at one instant (tied on expiry), 20,000 units; 04-01: 4,000 units."""
    client.set_time(CREATED)
    make_account(client, "acme", cash_micros=200 * USD)
    client.set_time(PAYG_DAY)
    client.consume("acme", region="mainland", quantity=3_000)
    client.consume("acme", region="outside", quantity=6_000)
    client.set_time(BOUGHT)
    first = client.purchase_plan("acme", "month-100k")
    second = client.purchase_plan("acme", "month-100k")
    client.consume("acme", region="outside", quantity=20_000)
    client.set_time(LAST_DAY)
    client.consume("acme", region="mainland", quantity=4_000)
    client.set_time(NOW)
    return first.plan_id, second.plan_id


def expected(client, window_days: int):  # noqa: ANN201
    """The reference, fed from GetUsage and ListPlans only."""
    days = [f"2027-03-{d}" for d in (30, 31)] + ["2027-04-01"]
    days = days[-window_days:]
    usage = client.get_usage("acme", days[0], days[-1])
    units = sum(u.units for d in usage.days for u in list(d.payg) + list(d.plan_units))
    plans = [PlanState(p.plan_id, "acme", p.spec_id, p.units_total, p.units_remaining, 0,
                       Validity.ONE_MONTH, p.purchased_at.ToMicroseconds(),
                       p.expires_at.ToMicroseconds(), i)
             for i, p in enumerate(client.get_remaining("acme").plans)]  # R8 order
    return units, reference(units, len(days), plans, from_datetime(NOW))


@pytest.mark.parametrize("window_days", [0, 1])
def test_runway_equals_the_reference(client, history, window_days):
    """A 3-day window (the account is younger than 7 days) and a 1-day one: every plan's
    use-up or forfeit and the pay-as-you-go start and units equal the reference."""
    first, second = history
    r = client.get_runway("acme", window_days)
    units, want = expected(client, window_days or 3)
    assert r.estimated and r.window_units == units and r.window_days == (window_days or 3)
    assert r.window_to_day == "2027-04-01"
    assert [p.plan_id for p in r.plans] == [first, second]  # tied: bought first goes first
    expires = from_datetime(datetime(2027, 4, 30, 10, 0, tzinfo=BILLING_TZ))
    assert all(p.expires_at.ToMicroseconds() == expires for p in r.plans)  # 31 April: 30th
    got_used_up = {p.plan_id: p.used_up_at.ToMicroseconds() if p.HasField("used_up_at")
                   else None for p in r.plans}
    assert got_used_up == want.used_up_at
    assert {p.plan_id: p.forfeit_units for p in r.plans} == want.forfeit
    assert r.payg_starts_at.ToMicroseconds() == want.payg_starts_at
    assert r.payg_units == want.payg_units
    if window_days == 1:  # 4,000 a day: the second plan expires with units left (R9)
        assert r.plans[1].expires_first and r.plans[1].forfeit_units > 0
        assert r.price_basis == "no_recent_payg_priced_outside_mainland"
        assert r.payg_cost_micros == r.payg_units * 1_000
    else:  # 11,000 a day: both used up; pay-as-you-go split 3,000 : 6,000 (R10)
        assert not any(p.expires_first for p in r.plans)
        mainland = r.payg_units * 3_000 // 9_000
        assert (r.window_payg_mainland_units, r.window_payg_outside_units) == (3_000, 6_000)
        assert r.payg_cost_micros == mainland * 700 + (r.payg_units - mainland) * 1_000
        assert r.price_basis == "recent_mix"


def test_no_estimate_for_an_account_without_a_complete_day(client):
    """Created today: nothing to take a rate from, and the answer says so."""
    make_account(client, "new")
    r = client.get_runway("new")
    assert not r.estimated and "no complete billing day" in r.no_estimate_reason
    assert not r.plans and not r.HasField("payg_starts_at")


def test_bad_runway_requests_are_refused(client):
    """A window beyond 90 days or an unknown account: the right code and a clear message."""
    make_account(client, "acme")
    with pytest.raises(LedgerError) as bad:
        client.get_runway("acme", 91)
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT and "1..90" in bad.value.message
    with pytest.raises(LedgerError) as missing:
        client.get_runway("nobody")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
