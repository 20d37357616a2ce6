"""Runway arithmetic (issue 22) against a reference written separately: a unit-by-unit
simulation that asks each unit at its instant and gives it to the first valid plan (R8)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import runway as rw
from ledger.calendar import BILLING_TZ, US_PER_DAY, US_PER_HOUR, add_months, from_datetime
from ledger.model import AccountStatus, PlanState, Validity

NOW = from_datetime(datetime(2027, 1, 20, 15, 30, tzinfo=BILLING_TZ))


def plan(seq: int, remaining: int, expires_at: int, bought: int = NOW - US_PER_DAY) -> PlanState:
    return PlanState(f"plan-{seq}", "acct", "spec", remaining, remaining, 0, Validity.ONE_MONTH,
                     bought, expires_at, seq)


def window(units: int, days: int = 7, mainland: int = 0, outside: int = 0) -> rw.Window:
    return rw.Window("2027-01-13", "2027-01-19", days, units, mainland, outside)


@dataclass
class Expected:
    used_up_at: dict[str, int | None]
    forfeit: dict[str, int]
    payg_starts_at: int | None
    payg_units: int


def reference(units: int, days: int, plans: list[PlanState], now: int = NOW) -> Expected:
    """Unit k is asked at the first microsecond t with units * (t - now) >= k * span: walk
    the units one by one, each to the first plan (by expiry, then purchase) valid at t."""
    span = days * US_PER_DAY
    horizon = now + 30 * US_PER_DAY
    left = {p.plan_id: p.units_remaining for p in plans}
    order = sorted(plans, key=lambda p: (p.expires_at, p.purchase_seq))
    used_up: dict[str, int | None] = {p.plan_id: None for p in plans}
    payg_start, payg_units, k = None, 0, 0
    while units:
        k += 1
        t = now + (k * span + units - 1) // units
        live = [p for p in order if left[p.plan_id] and t < p.expires_at]
        if live:
            p = live[0]
            left[p.plan_id] -= 1
            if not left[p.plan_id]:
                used_up[p.plan_id] = t
            continue
        if payg_start is None:
            payg_start = t
        if t >= horizon:
            break
        payg_units += 1
    forfeit = {p.plan_id: left[p.plan_id] for p in plans}
    return Expected(used_up, forfeit, payg_start, payg_units)


def check(units: int, days: int, plans: list[PlanState]) -> rw.Runway:
    got = rw.project(NOW, AccountStatus.ACTIVE, window(units, days), plans)
    want = reference(units, days, plans)
    assert {p.plan_id: p.used_up_at for p in got.plans} == want.used_up_at
    assert {p.plan_id: p.forfeit_units for p in got.plans} == want.forfeit
    assert got.payg_starts_at == want.payg_starts_at
    assert got.payg_units == want.payg_units
    return got


def test_plans_tied_on_expiry_go_in_purchase_order():
    """R8: two plans expiring at the same instant: the one bought first is used up first."""
    expires = NOW + 20 * US_PER_DAY
    got = check(700, 7, [plan(2, 300, expires), plan(1, 500, expires)])
    assert [p.plan_id for p in got.plans] == ["plan-1", "plan-2"]
    assert got.plans[0].used_up_at == NOW + 5 * US_PER_DAY  # 500 units at 100 a day
    assert got.plans[1].used_up_at == NOW + 8 * US_PER_DAY


def test_month_end_expiry_forfeits_what_the_rate_leaves():
    """R6 and R9: bought 31 December for a month, the plan expires 31 January; bought
    31 January it would expire 28 February. The rate leaves units at that expiry."""
    bought = from_datetime(datetime(2026, 12, 31, 10, 0, tzinfo=BILLING_TZ))
    expires = add_months(bought, 1)
    assert expires == from_datetime(datetime(2027, 1, 31, 10, 0, tzinfo=BILLING_TZ))
    got = check(70, 7, [plan(1, 500, expires, bought)])
    assert got.plans[0].used_up_at is None
    # 10 a day from 20 Jan 15:30 to 31 Jan 10:00: 10 days 18.5 hours = 107 units served
    assert got.plans[0].forfeit_units == 500 - 107
    short = add_months(from_datetime(datetime(2027, 1, 31, 10, 0, tzinfo=BILLING_TZ)), 1)
    assert short == from_datetime(datetime(2027, 2, 28, 10, 0, tzinfo=BILLING_TZ))


def test_a_plan_that_expires_first_hands_over_to_the_next():
    """R9: the first plan expires with units left; the next takes the demand from then."""
    got = check(7_000, 7, [plan(1, 10_000, NOW + 3 * US_PER_DAY),
                           plan(2, 2_000, NOW + 60 * US_PER_DAY)])
    # 1,000 a day: unit 3,000 is asked at the expiry itself, when the plan is no longer
    # valid (R6: t < expires_at), so it served 2,999 and the second plan takes 3,000..4,999
    assert got.plans[0].used_up_at is None and got.plans[0].forfeit_units == 7_001
    assert got.plans[1].used_up_at == NOW + 4_999 * US_PER_DAY // 1_000
    assert got.payg_starts_at is not None and got.payg_units == 25_000


def test_pay_as_you_go_is_priced_at_the_recent_region_mix():
    """R10: 1,000 units split 1:3 between the mainland and outside: 250 x 700 + 750 x 1,000."""
    units, basis = rw.payg_cost(1_000, window(70, mainland=10, outside=30))
    assert (units, basis) == (250 * 700 + 750 * 1_000, rw.PRICE_BASIS_MIX)
    units, basis = rw.payg_cost(1_000, window(70))
    assert (units, basis) == (1_000 * 1_000, rw.PRICE_BASIS_OUTSIDE)


def test_no_estimate_without_history_or_when_suspended():
    """An account created today has no complete day; a suspended one offsets nothing (R23)."""
    assert rw.window_days(NOW - US_PER_HOUR, NOW, 7) is None
    got = rw.project(NOW, AccountStatus.ACTIVE, None, [plan(1, 5, NOW + US_PER_DAY)])
    assert not got.estimated and "no complete billing day" in got.no_estimate_reason
    got = rw.project(NOW, AccountStatus.SUSPENDED, window(70), [plan(1, 5, NOW + US_PER_DAY)])
    assert not got.estimated and "suspended" in got.no_estimate_reason


def test_window_skips_the_partial_creation_day_and_stops_at_the_limit():
    """R1: only complete billing days count; the creation day counts if it began with it."""
    created = from_datetime(datetime(2027, 1, 17, 9, 0, tzinfo=BILLING_TZ))
    assert rw.window_days(created, NOW, 7) == ("2027-01-18", "2027-01-19", 2)
    midnight = from_datetime(datetime(2027, 1, 17, 0, 0, tzinfo=BILLING_TZ))
    assert rw.window_days(midnight, NOW, 7) == ("2027-01-17", "2027-01-19", 3)
    assert rw.window_days(NOW - 400 * US_PER_DAY, NOW, 90) == ("2026-10-22", "2027-01-19", 90)


def test_a_rate_of_zero_forfeits_everything_and_never_reaches_pay_as_you_go():
    """With history but no use, every plan is projected to expire with all its units."""
    got = check(0, 7, [plan(1, 40, NOW + 2 * US_PER_DAY)])
    assert got.estimated and got.plans[0].forfeit_units == 40
    assert got.payg_starts_at is None and got.payg_units == 0 and got.daily_rate_units == 0


@settings(max_examples=150, deadline=None)
@given(units=st.integers(0, 400), days=st.integers(1, 10),
       plans=st.lists(st.tuples(st.integers(0, 300), st.integers(1, 40 * 24)), max_size=4))
def test_projection_matches_the_unit_by_unit_reference(units, days, plans):
    """Any rate and plans (expiries on the hour, ties likely): the closed form equals the
    walk, unit by unit."""
    check(units, days, [plan(i + 1, r, NOW + h * US_PER_HOUR) for i, (r, h) in enumerate(plans)
                        if r])
