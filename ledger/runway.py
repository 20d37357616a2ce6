"""Runway (issue 22): how long an account's plans last if its recent daily rate goes on.

Pure arithmetic on plain values, in integers only (R15): no float touches a unit or a
micro-USD. The method, so that a customer can redo any figure by hand:

1. **The window** is the last ``window_days`` complete billing days (R1) before today,
   cut to the days that began at or after the account's creation. With no such day there
   is no estimate; a suspended account (R23) has none either.
2. **The rate** is ``W`` billable units over ``N`` days: the pay-as-you-go units of every
   region plus the units plans offset on those days (the derived usage rows). Demand is
   spread evenly: by the instant ``t`` after now, ``U(t) = floor(W * (t - now) / (N days))``
   units have been asked for.
3. **Plans** are used in R8 order (earliest expiry, then purchase order), each from the
   instant the one before it ran out. A plan of ``r`` units that starts at ``s`` is used up
   at the first instant where ``U`` reaches ``U(s) + r``, that is
   ``now + ceil((U(s) + r) * N days / W)``, unless that instant is at or after its expiry;
   then it "expires first": it serves the units asked before its expiry, up to
   ``U(expiry - 1 µs)``, and the rest are projected forfeited (R9). Unit ``k`` is asked at
   ``now + ceil(k * N days / W)``; each goes to the first plan in that order that is still
   valid and has units.
4. **Pay-as-you-go** starts at the instant the first unit no plan covers is asked. Over the
   horizon (the 30 days from now, end exclusive) it takes the units asked after the plans'
   last one, up to ``U(horizon - 1 µs)``. They are split by
   the regions' shares of the window's pay-as-you-go units, mainland
   ``floor(units * m / (m + o))`` and the rest outside, and priced at R10. With no
   pay-as-you-go in the window the mix is unknown, and every unit is priced outside the
   mainland, the higher price (``price_basis`` says which was used).
"""

from __future__ import annotations

from dataclasses import dataclass

from .calendar import US_PER_DAY, billing_day, day_start, parse_day
from .model import AccountStatus, PlanState
from .money import PAYG_UNIT_PRICE_MICROS, Region

RUNWAY_WINDOW_DAYS_DEFAULT = 7
RUNWAY_WINDOW_DAYS_MAX = 90
RUNWAY_HORIZON_DAYS = 30

PRICE_BASIS_MIX = "recent_mix"  # the window's pay-as-you-go split by region
PRICE_BASIS_OUTSIDE = "no_recent_payg_priced_outside_mainland"


@dataclass(frozen=True, slots=True)
class Window:
    """The complete billing days the rate is taken from, and what they held."""

    from_day: str
    to_day: str
    days: int
    units: int  # billable units: pay-as-you-go of every region + units plans offset
    payg_mainland_units: int
    payg_outside_units: int


@dataclass(frozen=True, slots=True)
class PlanRunway:
    plan_id: str
    spec_id: str
    units_remaining: int
    expires_at: int
    used_up_at: int | None  # None: the plan expires first
    forfeit_units: int  # projected units left at expiry (R9)


@dataclass(frozen=True, slots=True)
class Runway:
    now: int
    window: Window | None
    no_estimate_reason: str = ""
    plans: tuple[PlanRunway, ...] = ()
    payg_starts_at: int | None = None  # None: at a rate of 0, never
    horizon_end: int = 0
    payg_units: int = 0  # projected over [now, horizon_end)
    payg_cost_micros: int = 0
    price_basis: str = ""

    @property
    def estimated(self) -> bool:
        return self.window is not None and not self.no_estimate_reason

    @property
    def daily_rate_units(self) -> int:
        """Whole units per day (rounded down), for display: figures use the exact W/N."""
        return self.window.units // self.window.days if self.window and self.window.days else 0


def window_days(created_at: int, now: int, wanted_days: int) -> tuple[str, str, int] | None:
    """(from_day, to_day, days): the last `wanted_days` complete billing days before today
    that began at or after the account's creation; None when there is none."""
    today = parse_day(billing_day(now))
    first = parse_day(billing_day(created_at))
    if day_start(first.isoformat()) < created_at:
        first = first.fromordinal(first.toordinal() + 1)  # the creation day is partial
    last = today.fromordinal(today.toordinal() - 1)
    start = max(first, last.fromordinal(last.toordinal() - wanted_days + 1))
    if start > last:
        return None
    return start.isoformat(), last.isoformat(), last.toordinal() - start.toordinal() + 1


def project(now: int, status: AccountStatus, window: Window | None,
            plans: list[PlanState]) -> Runway:
    """The runway of an account (steps 2-4 of the module's method). `plans` may hold
    any of the account's plans: only those that can offset now count, in R8 order."""
    if status is AccountStatus.SUSPENDED:
        return Runway(now, window, "the account is suspended (R23): its plans offset nothing")
    if window is None:
        return Runway(now, None, "no complete billing day since the account was created")
    span = window.days * US_PER_DAY
    rate_units = window.units

    def asked_by(t: int) -> int:  # U(t)
        return rate_units * (t - now) // span

    def asked_at(k: int) -> int:  # the instant U reaches k: unit k is asked then
        return now - (-k * span // rate_units)  # now + ceil(k * span / W)

    served = 0  # units 1..served are covered by the plans before this one
    out: list[PlanRunway] = []
    for plan in sorted((p for p in plans if p.can_offset_at(now)), key=lambda p: p.order_key):
        target = served + plan.units_remaining
        used_up = asked_at(target) if rate_units else None
        if used_up is not None and used_up < plan.expires_at:
            out.append(PlanRunway(plan.plan_id, plan.spec_id, plan.units_remaining,
                                  plan.expires_at, used_up, 0))
            served = target
        else:  # serves the units asked before its expiry (valid means t < expires_at, R6)
            through = max(served, asked_by(plan.expires_at - 1))
            out.append(PlanRunway(plan.plan_id, plan.spec_id, plan.units_remaining,
                                  plan.expires_at, None, target - through))
            served = through
    horizon = now + RUNWAY_HORIZON_DAYS * US_PER_DAY
    units = max(0, asked_by(horizon - 1) - served)
    cost, basis = payg_cost(units, window)
    starts = asked_at(served + 1) if rate_units else None
    return Runway(now, window, "", tuple(out), starts, horizon, units, cost, basis)


def payg_cost(units: int, window: Window) -> tuple[int, str]:
    """Step 4: the cost of `units` pay-as-you-go units at the window's region mix (R10)."""
    mainland, outside = window.payg_mainland_units, window.payg_outside_units
    if mainland + outside == 0:
        return units * PAYG_UNIT_PRICE_MICROS[Region.OUTSIDE_CHINESE_MAINLAND], PRICE_BASIS_OUTSIDE
    units_mainland = units * mainland // (mainland + outside)
    return (units_mainland * PAYG_UNIT_PRICE_MICROS[Region.CHINESE_MAINLAND]
            + (units - units_mainland) * PAYG_UNIT_PRICE_MICROS[Region.OUTSIDE_CHINESE_MAINLAND],
            PRICE_BASIS_MIX)
