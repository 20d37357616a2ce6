"""The simulation's reference ledger: RULES.md R1-R24 and docs/decisions.md restated in memory.

:class:`RefLedger` takes the same calls as the server (tests/sim_driver.py sends each step to
both) and answers them as the rules say: success with the figures, or :class:`Refused` with the
gRPC code name and the ``ErrorInfo`` reason. It imports nothing from ``ledger``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from .reference_money import day_bill, money_in
from .sim_rules import (
    ACTIVE,
    ADVANCE_MAX_US,
    AMOUNT_MAX,
    BILLABLE,
    CASH,
    CATALOG,
    MAINLAND,
    P_ACTIVE,
    P_EXHAUSTED,
    P_EXPIRED,
    P_REFUNDED,
    PAYG_PRICE,
    QUANTITY_MAX,
    REFUND_WINDOW_US,
    SLIDER,
    STEP_3,
    STEP_4_1,
    SUSPEND_AFTER_US,
    SUSPENDED,
    V2,
    V3,
    add_months,
    billing_day,
    day_end,
    shift_day,
)

# ---------------------------------------------------------------------------- reference model


class Refused(Exception):
    """The model's refusal: the gRPC code name and the ErrorInfo reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code, self.reason = code, reason


def invalid() -> Refused:
    return Refused("INVALID_ARGUMENT", "INVALID_ARGUMENT")


@dataclass
class MPlan:
    plan_id: str
    account_id: str
    spec_id: str
    units: int
    validity: int
    price: int
    bought: int
    expires: int
    order: int
    paid_voucher: int
    paid_cash: int
    left: int = 0
    forfeited: int = 0
    refunded_at: int | None = None

    def can_offset(self, t: int) -> bool:
        return self.refunded_at is None and self.left > 0 and self.bought <= t < self.expires

    def status(self, t: int) -> int:
        if self.refunded_at is not None:
            return P_REFUNDED
        if t >= self.expires:
            return P_EXPIRED
        return P_EXHAUSTED if self.left == 0 else P_ACTIVE

    def view(self, now: int) -> dict[str, Any]:
        return {"plan_id": self.plan_id, "account_id": self.account_id, "spec_id": self.spec_id,
                "units_total": self.units, "units_remaining": self.left,
                "units_consumed": self.units - self.left - self.forfeited, "price": self.price,
                "validity": self.validity, "purchased_at": self.bought,
                "expires_at": self.expires, "status": self.status(now),
                "paid_voucher": self.paid_voucher, "paid_cash": self.paid_cash,
                "refunded_at": self.refunded_at, "units_forfeited": self.forfeited}


@dataclass
class MAccount:
    account_id: str
    display_name: str
    created_at: int
    status: int = ACTIVE
    cash: int = 0
    voucher: int = 0
    outstanding: int = 0
    overdue_since: int | None = None
    suspended_at: int | None = None
    scenarios: tuple[str, ...] = ()
    custom: bool = False
    feature_days: dict[str, tuple[int, bool]] = field(default_factory=dict)  # changed days
    payg: dict[str, dict[int, int]] = field(default_factory=dict)  # day -> region -> units
    offsets: dict[str, dict[str, int]] = field(default_factory=dict)  # day -> plan -> units

    def view(self) -> dict[str, Any]:
        return {"status": self.status, "cash": self.cash, "voucher": self.voucher,
                "outstanding": self.outstanding, "overdue_since": self.overdue_since,
                "suspended_at": self.suspended_at, "scenario_ids": tuple(sorted(self.scenarios)),
                "custom_policy": self.custom, "display_name": self.display_name,
                "created_at": self.created_at}


@dataclass(frozen=True)
class CReq:
    """One Consume request as sent (quantity 0 means 1, R5)."""

    acct: str
    rid: str
    region: int = MAINLAND
    ctype: int = SLIDER
    arch: int = V2
    step: int = STEP_3
    qty: int = 1
    scenario: str | None = None
    dry: bool = False

    def __repr__(self) -> str:
        extra = (f" scn={self.scenario}" if self.scenario else "") + (" DRY" if self.dry else "")
        return (f"C({self.acct} {self.rid} r{self.region} t{self.ctype} a{self.arch} "
                f"s{self.step} q{self.qty}{extra})")


BillTuple = tuple[Any, ...]


class RefLedger:
    """RULES.md R1-R24 and docs/decisions.md restated, in memory, driven by the same calls."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.accounts: dict[str, MAccount] = {}
        self.plans: list[MPlan] = []  # purchase order (R8)
        self.keys: dict[tuple[str, str, str], tuple[Any, Any]] = {}  # R12: -> (content, result)
        self.first_day: str | None = None
        self.next_settle: str | None = None
        self.settled: list[str] = []
        self.bills: dict[str, list[BillTuple]] = {}  # day -> bills in account order
        self.refunds_paying_outstanding = 0  # R22 (clarified): refunds that paid a debt

    def day(self) -> str:
        return billing_day(self.now)

    def _entry(self) -> None:
        """A journal entry was written: settlement starts with the first one's day."""
        if self.first_day is None:
            self.first_day = self.next_settle = self.day()

    def _account(self, account_id: str) -> MAccount:
        a = self.accounts.get(account_id)
        if a is None:
            raise Refused("NOT_FOUND", "ACCOUNT_NOT_FOUND")
        return a

    def _claimed(self, account_id: str, kind: str, rid: str, content: Any) -> Any:
        hit = self.keys.get((account_id, kind, rid))
        if hit is None:
            return None
        if hit[0] != content:
            raise Refused("ALREADY_EXISTS", "IDEMPOTENCY_KEY_REUSED")
        return hit

    def _note_config(self, a: MAccount, scenarios: int, custom: bool) -> None:
        """R13/R14: the day's most scenarios and whether custom policy was ever on."""
        day = self.day()
        start = a.feature_days.get(day, (len(a.scenarios), a.custom))
        a.feature_days[day] = (max(start[0], scenarios), start[1] or custom)

    def plans_of(self, account_id: str) -> list[MPlan]:
        return sorted((p for p in self.plans if p.account_id == account_id),
                      key=lambda p: (p.expires, p.order))

    def units_left(self, account_id: str) -> int:
        return sum(p.left for p in self.plans_of(account_id) if p.can_offset(self.now))

    # -- requests

    def create(self, account_id: str, name: str) -> dict[str, Any]:
        if account_id in self.accounts:
            raise Refused("ALREADY_EXISTS", "ACCOUNT_EXISTS")
        self.accounts[account_id] = a = MAccount(account_id, name, self.now)
        self._entry()
        return a.view()

    def top_up(self, account_id: str, rid: str, kind: int, amount: int) -> dict[str, Any]:
        if not 0 < amount <= AMOUNT_MAX:
            raise invalid()
        a = self._account(account_id)
        if self._claimed(account_id, "top_up", rid, (kind, amount)):
            return a.view()  # an administrative replay answers the current state
        cash = amount if kind == CASH else 0
        money_in(a, amount - cash, cash)
        self.keys[(account_id, "top_up", rid)] = ((kind, amount), None)
        self._entry()
        return a.view()

    def features(self, account_id: str, rid: str, ids: tuple[str, ...], custom: bool
                 ) -> dict[str, Any]:
        if len(set(ids)) != len(ids):
            raise invalid()
        a = self._account(account_id)
        content = (tuple(sorted(ids)), custom)
        if self._claimed(account_id, "features", rid, content):
            return a.view()
        if a.status == SUSPENDED:
            raise Refused("FAILED_PRECONDITION", "ACCOUNT_SUSPENDED")
        self._note_config(a, len(ids), custom)
        a.scenarios, a.custom = tuple(sorted(ids)), custom
        self.keys[(account_id, "features", rid)] = (content, None)
        self._entry()
        return a.view()

    def purchase(self, account_id: str, rid: str, spec_id: str) -> MPlan:
        a = self._account(account_id)
        hit = self._claimed(account_id, "purchase", rid, spec_id)
        if hit:
            return hit[1]
        if spec_id not in CATALOG:
            raise Refused("NOT_FOUND", "SPEC_NOT_FOUND")
        units, validity, months, price = CATALOG[spec_id]
        if a.voucher + a.cash < price:  # R16: refused, nothing changed
            raise Refused("FAILED_PRECONDITION", "INSUFFICIENT_FUNDS")
        pv = min(price, a.voucher)
        pc = price - pv
        a.voucher -= pv
        a.cash -= pc
        plan = MPlan("?", account_id, spec_id, units, validity, price, self.now,
                     add_months(self.now, months), len(self.plans), pv, pc, left=units)
        self.plans.append(plan)
        self.keys[(account_id, "purchase", rid)] = (spec_id, plan)
        self._entry()
        return plan

    def refund(self, plan_id: str, rid: str) -> MPlan:
        plan = next((p for p in self.plans if p.plan_id == plan_id), None)
        if plan is None:
            raise Refused("NOT_FOUND", "PLAN_NOT_FOUND")
        if self._claimed(plan.account_id, "refund", rid, plan_id):
            return plan
        if plan.refunded_at is not None:
            raise Refused("FAILED_PRECONDITION", "PLAN_REFUNDED")
        if self.now - plan.bought > REFUND_WINDOW_US:
            raise Refused("FAILED_PRECONDITION", "REFUND_WINDOW_PASSED")
        if plan.left != plan.units:  # consumed or forfeited
            raise Refused("FAILED_PRECONDITION", "PLAN_USED")
        plan.refunded_at = self.now
        # R21: back where it came from; R22 (clarified): it pays what is outstanding first.
        paid = money_in(self.accounts[plan.account_id], plan.paid_voucher, plan.paid_cash)
        self.refunds_paying_outstanding += paid > 0
        self.keys[(plan.account_id, "refund", rid)] = (plan_id, None)
        self._entry()
        return plan

    def reactivate(self, account_id: str, rid: str) -> dict[str, Any]:
        a = self._account(account_id)
        if self._claimed(account_id, "reactivate", rid, ""):
            return a.view()
        if a.status != SUSPENDED:
            raise Refused("FAILED_PRECONDITION", "NOT_SUSPENDED")
        if a.outstanding > 0:
            raise Refused("FAILED_PRECONDITION", "OUTSTANDING_BALANCE")
        a.status, a.suspended_at, a.overdue_since = ACTIVE, None, None
        self.keys[(account_id, "reactivate", rid)] = ("", None)
        self._entry()
        return a.view()

    def consume(self, r: CReq) -> dict[str, Any]:
        """A fresh applied result is returned as the stored object itself (the driver fills in
        its journal_seq from the server); a replay is a copy marked replayed."""
        qty = 1 if r.qty == 0 else r.qty
        if (not 0 < qty <= QUANTITY_MAX or r.region not in PAYG_PRICE
                or r.ctype not in range(1, 6) or r.arch not in (V2, V3)
                or r.step not in (STEP_3, STEP_4_1) or not r.rid):
            raise invalid()
        a = self._account(r.acct)
        content = (r.region, r.ctype, r.arch, r.step, r.scenario or "", qty)
        hit = self._claimed(r.acct, "consume", r.rid, content)
        if hit:
            return {**hit[1], "replayed": True}
        if a.status == SUSPENDED:  # R23, billable or not
            raise Refused("FAILED_PRECONDITION", "ACCOUNT_SUSPENDED")
        day = self.day()
        result = {"billable": False, "allocations": (), "payg_units": 0, "payg_amount": 0,
                  "replayed": False, "billing_day": day, "recorded_at": self.now,
                  "plan_units_remaining": self.units_left(r.acct), "request_id": r.rid,
                  "journal_seq": 0}
        if (r.arch, r.ctype, r.step) not in BILLABLE:  # R3: acknowledged, nothing else
            return result
        takes, left = [], qty
        for p in self.plans_of(r.acct):  # R8: earliest expiry, then purchase order
            if left == 0:
                break
            if p.can_offset(self.now):
                n = min(left, p.left)
                takes.append((p, n))
                left -= n
        result.update(billable=True, allocations=tuple((p.plan_id, n) for p, n in takes),
                      payg_units=left, payg_amount=left * PAYG_PRICE[r.region])
        if r.dry:
            result["plan_units_remaining"] -= qty - left
            return result
        for p, n in takes:
            p.left -= n
            offs = a.offsets.setdefault(day, {})
            offs[p.plan_id] = offs.get(p.plan_id, 0) + n
        if left:
            per_region = a.payg.setdefault(day, {})
            per_region[r.region] = per_region.get(r.region, 0) + left
        result.update(plan_units_remaining=self.units_left(r.acct), journal_seq=None)
        self.keys[(r.acct, "consume", r.rid)] = (content, result)
        self._entry()
        return result

    def settle_day(self, day: str) -> list[BillTuple]:
        try:
            date.fromisoformat(day)
        except ValueError:
            raise invalid() from None
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day):
            raise invalid()
        if self.now < day_end(day):
            raise Refused("FAILED_PRECONDITION", "DAY_NOT_ENDED")
        assert self.next_settle is None or self.next_settle > day, "every ended day is settled"
        return list(self.bills.get(day, []))  # R19: the same bills again

    def set_time(self, to: int) -> int:
        if to < self.now or to - self.now > ADVANCE_MAX_US:
            raise invalid()
        self.advance(to)
        return self.now

    def remaining(self, account_id: str) -> dict[str, Any]:
        plans = [p for p in self.plans_of(account_id) if p.can_offset(self.now)]
        payg = self.accounts[account_id].payg.get(self.day(), {})
        return {"total": sum(p.left for p in plans), "plans": [p.view(self.now) for p in plans],
                "payg_units": sum(payg.values()),
                "payg_amount": sum(n * PAYG_PRICE[r] for r, n in payg.items()),
                "billing_day": self.day()}

    # -- time: settlements (R17), expiries (R9), suspensions (R23), in time order

    def advance(self, to: int) -> None:
        while True:
            due: list[tuple[int, int, int, Any]] = []
            if self.next_settle is not None:
                due.append((day_end(self.next_settle), 0, 0, self.next_settle))
            for p in self.plans:
                if p.left > 0 and p.refunded_at is None:
                    due.append((p.expires, 1, p.order, p))
            for a in self.accounts.values():
                if a.overdue_since is not None and a.status != SUSPENDED:
                    due.append((a.overdue_since + SUSPEND_AFTER_US + 1, 2, 0, a))
            if not due:
                break
            at, kind, _, what = min(due, key=lambda d: d[:3])
            if at > to:
                break
            self.now = max(self.now, at)
            if kind == 0:
                self._settle(what)
            elif kind == 1:
                what.forfeited, what.left = what.left, 0
            else:
                self._note_config(what, 0, False)
                what.scenarios, what.custom = (), False
                what.status, what.suspended_at = SUSPENDED, self.now
        self.now = to

    def _settle(self, day: str) -> None:
        at = self.now
        bills = []
        for account_id in sorted(self.accounts):
            bill = day_bill(self.accounts[account_id], account_id, day, shift_day(day, 1),
                            self.plans, at)
            if bill is not None:
                bills.append(bill)
        self.bills[day] = bills
        self.settled.append(day)
        self.next_settle = shift_day(day, 1)
