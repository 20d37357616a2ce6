"""Notice rules (issue 22), pure: stable ids, the R23 warnings' instants, the forecast
thresholds of plan_low and forfeit_ahead, and the range checks of the thresholds."""

from __future__ import annotations

from ledger import notices as nt
from ledger import runway as rw
from ledger.calendar import US_PER_DAY, US_PER_HOUR
from ledger.model import AccountStatus

from .test_runway import NOW, plan, window


def test_ids_name_the_fact_not_the_moment_it_was_noticed():
    """The same fact noticed twice (a second settlement, R19, or a restart) has one id."""
    a = nt.notice("bill_issued", "acme", NOW, ("2027-01-19",), {"total_micros": 5})
    b = nt.notice("bill_issued", "acme", NOW + US_PER_HOUR, ("2027-01-19",), {"total_micros": 5})
    assert a.notice_id == b.notice_id == "bill_issued/acme/2027-01-19"
    assert a.payload["id"] == a.notice_id and a.payload["kind"] == "bill_issued"


def test_suspension_warnings_fall_72_and_24_hours_before_r23():
    """R23 suspends after strictly more than 168 h; warnings at 96 h (+1 µs) and 144 h."""
    since = NOW
    suspend_at = since + 168 * US_PER_HOUR + 1
    assert nt.suspension_warnings("acme", since, 9, suspend_at - 72 * US_PER_HOUR - 1) == []
    first = nt.suspension_warnings("acme", since, 9, suspend_at - 72 * US_PER_HOUR)
    assert [n.notice_id for n in first] == [f"suspension_ahead/acme/{since}/72h"]
    both = nt.suspension_warnings("acme", since, 9, suspend_at)
    assert [n.at_us for n in both] == [suspend_at - 72 * US_PER_HOUR,
                                       suspend_at - 24 * US_PER_HOUR]
    assert both[1].data == {"overdue_since_us": since, "suspends_at_us": suspend_at,
                            "hours_ahead": 24, "outstanding_micros": 9}


def test_plan_low_and_forfeit_ahead_follow_the_runway():
    """1,000 a day: a plan that expires in 3 days forfeits 7,001 units (forfeit_ahead at 7
    days); the next, of 3,000 units, is used up 5.999 days from now (plan_low at 7 days);
    a plan far from both says nothing until its units fall below 10% of the plan."""
    limits = nt.Thresholds()
    runway = rw.project(NOW, AccountStatus.ACTIVE, window(7_000), [
        plan(1, 10_000, NOW + 3 * US_PER_DAY), plan(2, 3_000, NOW + 60 * US_PER_DAY)])
    got = {(n.kind, n.data["plan_id"]) for n in nt.forecast("acme", runway, {}, limits)}
    assert got == {("forfeit_ahead", "plan-1"), ("plan_low", "plan-2")}
    far = rw.project(NOW, AccountStatus.ACTIVE, window(700), [
        plan(3, 90_000, NOW + 300 * US_PER_DAY)])
    assert nt.forecast("acme", far, {"plan-3": 100_000}, limits) == []
    low = nt.forecast("acme", far, {"plan-3": 1_000_000}, limits)  # 9% left of a million
    assert [n.kind for n in low] == ["plan_low"]


def test_no_forecast_without_an_estimate():
    """No estimate (suspended, or no history): no forecast notice."""
    runway = rw.project(NOW, AccountStatus.SUSPENDED, window(7_000), [plan(1, 1, NOW + 1)])
    assert nt.forecast("acme", runway, {}, nt.Thresholds()) == []


def test_thresholds_out_of_range_are_named():
    """Configuration checks: each bad threshold is named with its range."""
    assert nt.Thresholds().problems() == []
    bad = nt.Thresholds(plan_low_days=0, plan_low_percent=100, forfeit_ahead_days=91)
    assert bad.problems() == ["plan_low_days must be 1..90; got 0",
                              "forfeit_ahead_days must be 1..90; got 91",
                              "plan_low_percent must be 0..99; got 100"]
