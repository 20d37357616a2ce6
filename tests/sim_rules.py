"""The rules' numbers and the UTC+8 calendar, restated for the simulation.

Written from RULES.md, CONTRACT.md and docs/decisions.md; nothing here is imported from
``ledger``: the reference model (tests/sim_model.py) and the generator (tests/sim_ops.py) share
these with the driver (tests/sim_driver.py), which also converts wire timestamps with them.
"""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

# ---------------------------------------------------------------------------- the rules' numbers

US_PER_S = 1_000_000
US_PER_H = 3_600 * US_PER_S
US_PER_DAY = 24 * US_PER_H
USD = 1_000_000
CENT = 10_000
TZ8 = timezone(timedelta(hours=8))  # R1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

ACTIVE, OVERDUE, SUSPENDED = 1, 2, 3  # AccountStatus
P_ACTIVE, P_EXHAUSTED, P_EXPIRED, P_REFUNDED = 1, 2, 3, 4  # PlanStatus
ONE_MONTH, ONE_YEAR = 1, 2  # PlanValidity
CASH, VOUCHER = 1, 2  # FundsKind
MAINLAND, OUTSIDE = 1, 2  # Region
V2, V3 = 1, 2  # ClientArchitecture
SLIDER, PUZZLE, ONE_CLICK, IMAGE_RESTORATION, INVISIBLE = 1, 2, 3, 4, 5  # CaptchaType
STEP_3, STEP_4_1 = 1, 2  # VerificationStep

# R3, written out from the table.
BILLABLE = frozenset(
    {(V2, t, STEP_3) for t in (SLIDER, PUZZLE, ONE_CLICK, IMAGE_RESTORATION, INVISIBLE)}
    | {(V3, t, STEP_3) for t in (SLIDER, PUZZLE, ONE_CLICK, IMAGE_RESTORATION)}
    | {(V3, INVISIBLE, STEP_3), (V3, INVISIBLE, STEP_4_1)})
PAYG_PRICE = {MAINLAND: 700, OUTSIDE: 1_000}  # R10
SCENARIOS_FREE, SCENARIO_FEE, CUSTOM_FEE = 3, 1 * USD, 5 * USD  # R13, R14
REFUND_WINDOW_US = 120 * US_PER_H  # R21, inclusive
SUSPEND_AFTER_US = 168 * US_PER_H  # R23, strictly more than
QUANTITY_MAX = 1_000_000
AMOUNT_MAX = 10**15
ADVANCE_MAX_US = 3 * 366 * US_PER_DAY  # the test clock's longest single move
# The built-in catalog (docs): spec -> (units, validity, months, price).
CATALOG = {
    "month-100k": (100_000, ONE_MONTH, 1, 60 * USD),
    "month-1m": (1_000_000, ONE_MONTH, 1, 550 * USD),
    "year-1m": (1_000_000, ONE_YEAR, 12, 500 * USD),
    "year-10m": (10_000_000, ONE_YEAR, 12, 4_500 * USD),
    "year-100m": (100_000_000, ONE_YEAR, 12, 40_000 * USD),
}


# ---------------------------------------------------------------------------- calendar (R1, R6)


def to_us(dt: datetime) -> int:
    return (dt - EPOCH) // timedelta(microseconds=1)


def billing_day(t_us: int) -> str:
    return (EPOCH + timedelta(microseconds=t_us)).astimezone(TZ8).date().isoformat()


def day_start(day: str) -> int:
    d = date.fromisoformat(day)
    return to_us(datetime(d.year, d.month, d.day, tzinfo=TZ8))


def day_end(day: str) -> int:
    return day_start(day) + US_PER_DAY


def shift_day(day: str, n: int) -> str:
    return (date.fromisoformat(day) + timedelta(days=n)).isoformat()


def days_between(lo: str, hi: str) -> list[str]:
    n = (date.fromisoformat(hi) - date.fromisoformat(lo)).days
    return [shift_day(lo, i) for i in range(n + 1)]


def add_months(t_us: int, months: int) -> int:
    """R6: same local clock time, same day of month, clamped to the month's last day."""
    local = (EPOCH + timedelta(microseconds=t_us)).astimezone(TZ8)
    year, month0 = divmod(local.month - 1 + months, 12)
    year += local.year
    last = calendar.monthrange(year, month0 + 1)[1]
    return to_us(local.replace(year=year, month=month0 + 1, day=min(local.day, last)))


def round_half_up_cent(micros: int) -> int:
    return (micros + CENT // 2) // CENT * CENT


def ts(t_us: int) -> Timestamp:
    return Timestamp(seconds=t_us // US_PER_S, nanos=t_us % US_PER_S * 1_000)


def us(t: Timestamp) -> int:
    return t.seconds * US_PER_S + t.nanos // 1_000


def opt_us(msg: Any, name: str) -> int | None:
    return us(getattr(msg, name)) if msg.HasField(name) else None
