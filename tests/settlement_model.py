"""The settlement property tests' reference model (tests/test_settlement_properties.py).

:class:`Model` restates the rules directly (it imports neither ``ledger.settlement`` nor
``ledger.allocation``): plans as records in R8 order, pay-as-you-go per day and region, the
configuration at every moment of the day, bills paid vouchers then cash, outstanding amounts,
suspension and reactivation. The rules' numbers are written out by hand here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from ledger import calendar as cal
from ledger.model import FundsKind
from ledger.money import Region

from .reference_money import day_bill, money_in

US_PER_SECOND = 1_000_000
US_PER_HOUR = 3_600 * US_PER_SECOND
US_PER_DAY = 24 * US_PER_HOUR
USD = 1_000_000

# The rules' numbers, written out by hand (R10, R21, R23; the R13/R14 fees and the bill are
# tests/reference_money.py's day_bill, shared with the simulation's model).
PAYG_PRICE = {int(Region.CHINESE_MAINLAND): 700, int(Region.OUTSIDE_CHINESE_MAINLAND): 1_000}
REFUND_WINDOW_US = 120 * US_PER_HOUR  # inclusive
SUSPEND_AFTER_US = 168 * US_PER_HOUR  # strictly more than
ACTIVE, OVERDUE, SUSPENDED = 1, 2, 3  # AccountStatus wire numbers

SPECS = ("month-100k", "year-1m")
MONTHS = {"month-100k": 1, "year-1m": 12}
ACCOUNT_IDS = ("acme", "beta")
SCENARIO_POOL = tuple(f"s{i}" for i in range(8))


def _us(*args: int) -> int:
    return (datetime(*args, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(
        microseconds=1)


def next_day(day: str) -> str:
    return (date.fromisoformat(day) + timedelta(days=1)).isoformat()


# ---------------------------------------------------------------------------- reference model


@dataclass
class MPlan:
    plan_id: str
    account_id: str
    units: int
    left: int
    price: int
    bought: int
    expires: int
    order: int
    paid_voucher: int
    paid_cash: int
    forfeited: int = 0
    refunded: bool = False


@dataclass
class MAccount:
    account_id: str
    cash: int = 0
    voucher: int = 0
    outstanding: int = 0
    overdue_since: int | None = None
    suspended_at: int | None = None
    status: int = ACTIVE
    scenarios: tuple[str, ...] = ()
    custom: bool = False
    # R13/R14: day -> (most scenarios, custom policy any time) for days whose config changed.
    feature_days: dict[str, tuple[int, bool]] = field(default_factory=dict)
    payg: dict[str, dict[int, int]] = field(default_factory=dict)  # day -> region -> units
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)  # day -> plan -> units

    def row(self) -> tuple[Any, ...]:
        return (self.status, self.cash, self.voucher, self.outstanding, self.overdue_since,
                self.suspended_at, sorted(self.scenarios), int(self.custom))


BillTuple = tuple[Any, ...]


@dataclass
class Model:
    now: int
    accounts: dict[str, MAccount] = field(default_factory=dict)
    plans: list[MPlan] = field(default_factory=list)  # in purchase order
    first_day: str | None = None
    next_settle: str | None = None
    bills: dict[str, list[BillTuple]] = field(default_factory=dict)
    topups_total: int = 0
    paid_outstanding_by_topups: int = 0
    paid_outstanding_by_refunds: int = 0
    suspensions: int = 0
    suspension_log: list[tuple[Any, ...]] = field(default_factory=list)
    expiry_log: list[tuple[Any, ...]] = field(default_factory=list)
    reactivations: int = 0

    # -- helpers

    def day(self) -> str:
        return cal.billing_day(self.now)

    def _note_config(self, a: MAccount, scenarios: int, custom: bool) -> None:
        """The configuration of today's first moment, then the most it had (R13, R14)."""
        day = self.day()
        start = a.feature_days.get(day, (len(a.scenarios), a.custom))
        a.feature_days[day] = (max(start[0], scenarios), start[1] or custom)

    # -- commands

    def create(self, account_id: str) -> None:
        self.accounts[account_id] = MAccount(account_id)
        if self.first_day is None:
            self.first_day = self.next_settle = self.day()

    def top_up(self, account_id: str, kind: FundsKind, amount: int) -> None:
        cash = amount if kind is FundsKind.CASH else 0
        paid = money_in(self.accounts[account_id], amount - cash, cash)
        self.paid_outstanding_by_topups += paid
        self.topups_total += amount

    def features(self, account_id: str, ids: tuple[str, ...], custom: bool) -> str | None:
        a = self.accounts[account_id]
        if a.status == SUSPENDED:
            return "ACCOUNT_SUSPENDED"
        self._note_config(a, len(ids), custom)
        a.scenarios, a.custom = tuple(sorted(ids)), custom
        return None

    def purchase(self, account_id: str, spec_id: str, price: int) -> str | MPlan:
        a = self.accounts[account_id]
        if a.voucher + a.cash < price:
            return "INSUFFICIENT_FUNDS"
        pv = min(price, a.voucher)  # R16: vouchers first
        pc = price - pv
        a.voucher -= pv
        a.cash -= pc
        units = {"month-100k": 100_000, "year-1m": 1_000_000}[spec_id]
        plan = MPlan("?", account_id, units, units, price, self.now,
                     cal.add_months(self.now, MONTHS[spec_id]), len(self.plans), pv, pc)
        self.plans.append(plan)
        return plan

    def consume(self, account_id: str, qty: int, region: int
                ) -> str | tuple[list[tuple[str, int]], int]:
        a = self.accounts[account_id]
        if a.status == SUSPENDED:
            return "ACCOUNT_SUSPENDED"
        valid = sorted((p for p in self.plans if p.account_id == account_id and not p.refunded
                        and p.left > 0 and p.bought <= self.now < p.expires),
                       key=lambda p: (p.expires, p.order))
        takes, left = [], qty
        for p in valid:
            if left == 0:
                break
            n = min(left, p.left)
            p.left -= n
            left -= n
            takes.append((p.plan_id, n))
        day = self.day()
        for plan_id, n in takes:
            offs = a.offsets.setdefault(day, {})
            offs[plan_id] = offs.get(plan_id, 0) + n
        if left:
            per_region = a.payg.setdefault(day, {})
            per_region[region] = per_region.get(region, 0) + left
        return takes, left

    def refund(self, plan: MPlan) -> str | None:
        if plan.refunded:
            return "PLAN_REFUNDED"
        if self.now - plan.bought > REFUND_WINDOW_US:
            return "REFUND_WINDOW_PASSED"
        if plan.left != plan.units:  # consumed or forfeited
            return "PLAN_USED"
        plan.refunded = True
        paid = money_in(self.accounts[plan.account_id], plan.paid_voucher, plan.paid_cash)
        self.paid_outstanding_by_refunds += paid
        return None

    def reactivate(self, account_id: str) -> str | None:
        a = self.accounts[account_id]
        if a.status != SUSPENDED:
            return "NOT_SUSPENDED"
        if a.outstanding > 0:
            return "OUTSTANDING_BALANCE"
        a.status, a.suspended_at, a.overdue_since = ACTIVE, None, None
        self.reactivations += 1
        return None

    # -- time

    def advance(self, to_us: int) -> None:
        """Everything due at or before ``to_us``, in time order (settlement first on ties)."""
        assert to_us >= self.now
        while True:
            due: list[tuple[int, int, int, Any]] = []
            if self.next_settle is not None:
                due.append((cal.day_end(self.next_settle), 0, 0, self.next_settle))
            for p in self.plans:
                if p.left > 0 and not p.refunded:
                    due.append((p.expires, 1, p.order, p))
            for a in self.accounts.values():
                if a.overdue_since is not None and a.status != SUSPENDED:
                    due.append((a.overdue_since + SUSPEND_AFTER_US + 1, 2, 0, a))
            if not due:
                break
            at, kind, _, what = min(due, key=lambda d: d[:3])
            if at > to_us:
                break
            self.now = max(self.now, at)
            if kind == 0:
                self._settle(what)
            elif kind == 1:
                self.expiry_log.append((what.account_id, what.plan_id, at, what.left))
                what.forfeited, what.left = what.left, 0  # R9
            else:
                self._suspend(what)
        self.now = to_us

    def _suspend(self, a: MAccount) -> None:
        """R23: strictly more than 168 h overdue: configuration deleted, fees stop."""
        self._note_config(a, 0, False)
        self.suspension_log.append((a.account_id, self.now, a.overdue_since, a.outstanding,
                                    sorted(a.scenarios), a.custom))
        a.scenarios, a.custom = (), False
        a.status, a.suspended_at = SUSPENDED, self.now
        self.suspensions += 1

    def _settle(self, day: str) -> None:
        at = self.now
        assert at == cal.day_end(day)
        bills = []
        for account_id in sorted(self.accounts):
            bill = day_bill(self.accounts[account_id], account_id, day, next_day(day),
                            self.plans, at)
            if bill is not None:
                bills.append(bill)
        self.bills[day] = bills
        self.next_settle = next_day(day)

    def ended_days(self) -> list[str]:
        """Days from the first entry's day to yesterday."""
        assert self.first_day is not None
        yesterday = (date.fromisoformat(self.day()) - timedelta(days=1)).isoformat()
        return cal.days_between(self.first_day, yesterday)
