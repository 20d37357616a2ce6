"""Daily settlement arithmetic (R13-R16, R18, R20): pure, exact, integer micro-USD.

The engine gathers one account's figures for a day and asks :func:`make_bill` for the bill;
paying it (R16) and what stays outstanding (R22) are decided here too, and applied by the
engine. The reference model in the tests computes the same thing independently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import calendar as cal
from .money import (
    CUSTOM_POLICY_FEE_MICROS,
    PAYG_UNIT_PRICE_MICROS,
    SCENARIO_FEE_MICROS,
    SCENARIOS_FREE,
    Region,
    round_half_up_to_cent,
    split_payment,
)


@dataclass(frozen=True, slots=True)
class BillLine:
    item: str  # "verification" | "scenarios" | "custom_policy"
    region: int  # Region for verification lines, 0 for feature lines
    quantity: int
    unit_price_micros: int
    amount_micros: int


@dataclass(frozen=True, slots=True)
class DayFigures:
    """What one account did on one billing day."""

    payg_units: dict[int, int] = field(default_factory=dict)  # region -> units
    plan_offsets: tuple[tuple[str, int], ...] = ()  # (plan_id, units), R8 order
    max_scenarios: int = 0  # R13: the most configured at any moment of the day
    custom_policy: bool = False  # R14: enabled at any moment of the day

    @property
    def has_activity(self) -> bool:
        """R18: a bill is issued for any billable request or feature fee on the day."""
        return bool(any(self.payg_units.values()) or self.plan_offsets
                    or self.max_scenarios > SCENARIOS_FREE or self.custom_policy)


@dataclass(frozen=True, slots=True)
class Bill:
    account_id: str
    billing_day: str
    bill_date: str
    lines: tuple[BillLine, ...]
    plan_offsets: tuple[tuple[str, int], ...]
    total_micros: int
    amount_due_micros: int
    paid_voucher_micros: int
    paid_cash_micros: int
    outstanding_micros: int
    issued_at_us: int

    def to_payload(self) -> dict[str, Any]:
        return {"day": self.billing_day, "bill_date": self.bill_date,
                "lines": [[ln.item, ln.region, ln.quantity, ln.unit_price_micros,
                           ln.amount_micros] for ln in self.lines],
                "plan_offsets": [list(p) for p in self.plan_offsets],
                "total_micros": self.total_micros, "amount_due_micros": self.amount_due_micros,
                "paid_voucher_micros": self.paid_voucher_micros,
                "paid_cash_micros": self.paid_cash_micros,
                "outstanding_micros": self.outstanding_micros}

    @classmethod
    def from_payload(cls, account_id: str, p: dict[str, Any], issued_at_us: int) -> Bill:
        return cls(account_id, p["day"], p["bill_date"],
                   tuple(BillLine(*ln) for ln in p["lines"]),
                   tuple((a, b) for a, b in p["plan_offsets"]), p["total_micros"],
                   p["amount_due_micros"], p["paid_voucher_micros"], p["paid_cash_micros"],
                   p["outstanding_micros"], issued_at_us)


def bill_lines(f: DayFigures) -> list[BillLine]:
    lines = []
    for region in sorted(f.payg_units):
        units = f.payg_units[region]
        if units:
            price = PAYG_UNIT_PRICE_MICROS[Region(region)]
            lines.append(BillLine("verification", region, units, price, units * price))
    extra = max(0, f.max_scenarios - SCENARIOS_FREE)
    if extra:
        lines.append(BillLine("scenarios", 0, extra, SCENARIO_FEE_MICROS,
                              extra * SCENARIO_FEE_MICROS))
    if f.custom_policy:
        lines.append(BillLine("custom_policy", 0, 1, CUSTOM_POLICY_FEE_MICROS,
                              CUSTOM_POLICY_FEE_MICROS))
    return lines


def make_bill(account_id: str, day: str, f: DayFigures, voucher_micros: int, cash_micros: int,
              issued_at_us: int) -> Bill:
    """R18 bill for the day, paid vouchers first then cash (R16); the rest is outstanding."""
    lines = bill_lines(f)
    total = sum(ln.amount_micros for ln in lines)
    due = round_half_up_to_cent(total)
    from_voucher, from_cash = split_payment(due, voucher_micros, cash_micros)
    return Bill(account_id, day, cal.next_day(day), tuple(lines), f.plan_offsets, total, due,
                from_voucher, from_cash, due - from_voucher - from_cash, issued_at_us)
