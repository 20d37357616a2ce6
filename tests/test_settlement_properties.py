"""Property tests of daily settlement (R13-R24): the real engine against a reference model.

Each hypothesis example opens a fresh SQLite journal in its own temporary directory and drives
the engine in process through the single writer (``writer.call`` + ``unwrap``), exactly as the
server does, over a random run of purchases, consumes, feature changes, top-ups, refunds,
reactivations, on-demand settlements and clock moves for one or two accounts (restarts in
the lifecycle runs). :class:`Model` restates
the rules directly (it imports neither ``ledger.settlement`` nor ``ledger.allocation``): plans
as records in R8 order, pay-as-you-go per day and region, the configuration at every moment of
the day, bills paid vouchers then cash, outstanding amounts, suspension and reactivation. Every
answer is compared as the run goes; at the end every ended day is settled on demand (twice) and
the bills, balances, journal entries and money flows are compared.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ledger import calendar as cal
from ledger.catalog import builtin
from ledger.clock import TestClock
from ledger.engine import Engine
from ledger.errors import LedgerError
from ledger.model import (
    AdvanceClock,
    Architecture,
    CaptchaType,
    Consume,
    CreateAccount,
    FundsKind,
    PurchasePlan,
    Reactivate,
    RefundPlan,
    SettleDay,
    Step,
    TopUp,
    UpdateFeatures,
)
from ledger.money import Region
from ledger.store import Store
from ledger.writer import Writer, unwrap

from .reference_money import money_in

US_PER_SECOND = 1_000_000
US_PER_HOUR = 3_600 * US_PER_SECOND
US_PER_DAY = 24 * US_PER_HOUR
USD = 1_000_000
CENT = 10_000

# The rules' numbers, written out by hand (R10, R13, R14, R21, R23).
PAYG_PRICE = {int(Region.CHINESE_MAINLAND): 700, int(Region.OUTSIDE_CHINESE_MAINLAND): 1_000}
SCENARIOS_FREE, SCENARIO_FEE, CUSTOM_FEE = 3, 1 * USD, 5 * USD
REFUND_WINDOW_US = 120 * US_PER_HOUR  # inclusive
SUSPEND_AFTER_US = 168 * US_PER_HOUR  # strictly more than
ACTIVE, OVERDUE, SUSPENDED = 1, 2, 3  # AccountStatus wire numbers

SPECS = ("month-100k", "year-1m")
MONTHS = {"month-100k": 1, "year-1m": 12}
ACCOUNT_IDS = ("acme", "beta")
SCENARIO_POOL = tuple(f"s{i}" for i in range(8))

RUN = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _us(*args: int) -> int:
    return (datetime(*args, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(
        microseconds=1)


# Starts near the edges of a UTC+8 day (local times in comments).
EDGE_STARTS_US = (
    _us(2027, 3, 10, 16) - 1,  # 10 Mar 23:59:59.999999
    _us(2027, 3, 10, 16) - 60 * US_PER_SECOND,  # 10 Mar 23:59
    _us(2027, 3, 10, 16),  # 11 Mar 00:00
    _us(2028, 2, 28, 15, 30),  # 28 Feb 23:30 of a leap year
    _us(2027, 12, 31, 15, 59),  # 31 Dec 23:59
)


def next_day(day: str) -> str:
    return (date.fromisoformat(day) + timedelta(days=1)).isoformat()


def round_cent_half_up(micros: int) -> int:
    """R15, restated: totals are never negative here."""
    cents, rest = divmod(micros, CENT)
    return (cents + (rest >= CENT // 2)) * CENT


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
            a = self.accounts[account_id]
            scen, custom = a.feature_days.get(day, (len(a.scenarios), a.custom))
            payg = a.payg.get(day, {})
            offs = a.offsets.get(day, {})
            extra = max(0, scen - SCENARIOS_FREE)
            if not (payg or offs or extra or custom):
                continue
            lines = [("verification", r, payg[r], PAYG_PRICE[r], payg[r] * PAYG_PRICE[r])
                     for r in sorted(payg)]
            if extra:
                lines.append(("scenarios", 0, extra, SCENARIO_FEE, extra * SCENARIO_FEE))
            if custom:
                lines.append(("custom_policy", 0, 1, CUSTOM_FEE, CUSTOM_FEE))
            by_id = {p.plan_id: p for p in self.plans}
            offsets = tuple(sorted(offs.items(),
                                   key=lambda kv: (by_id[kv[0]].expires, by_id[kv[0]].order)))
            total = sum(ln[4] for ln in lines)
            due = round_cent_half_up(total)
            pv = min(due, a.voucher)
            pc = min(due - pv, a.cash)
            out = due - pv - pc
            a.voucher -= pv
            a.cash -= pc
            if out:
                a.outstanding += out
                if a.overdue_since is None:
                    a.overdue_since = at
                if a.status == ACTIVE:
                    a.status = OVERDUE
            bills.append((account_id, day, next_day(day), tuple(lines), offsets, total, due,
                          pv, pc, out, at))
        self.bills[day] = bills
        self.next_settle = next_day(day)

    def ended_days(self) -> list[str]:
        """Days from the first entry's day to yesterday."""
        assert self.first_day is not None
        yesterday = (date.fromisoformat(self.day()) - timedelta(days=1)).isoformat()
        return cal.days_between(self.first_day, yesterday)


def bill_tuple(b: Any) -> BillTuple:
    return (b.account_id, b.billing_day, b.bill_date,
            tuple((ln.item, ln.region, ln.quantity, ln.unit_price_micros, ln.amount_micros)
                  for ln in b.lines),
            tuple((p, n) for p, n in b.plan_offsets), b.total_micros, b.amount_due_micros,
            b.paid_voucher_micros, b.paid_cash_micros, b.outstanding_micros, b.issued_at_us)


# ---------------------------------------------------------------------------- the real ledger


class Live:
    """One store, test clock, engine and writer on a database file of a temp directory."""

    def __init__(self, db: Path, start_us: int) -> None:
        self.db = db
        self._open(start_us)

    def _open(self, start_us: int) -> None:
        self.store = Store(self.db)
        self.clock = TestClock(start_us)  # the engine floors it to the saved clock
        self.engine = Engine(self.store, self.clock, builtin())
        self.writer = Writer(self.engine)
        self.writer.start()

    def close(self) -> None:
        self.writer.stop()
        self.store.close()

    def restart(self) -> None:
        """Stop and reopen from the database alone (state is reloaded, not replayed)."""
        self.close()
        self._open(0)

    def call(self, cmd: Any) -> Any:
        return unwrap(self.writer.call(cmd))

    def attempt(self, cmd: Any) -> tuple[Any, str | None]:
        """(result, None) or (None, the refusal's reason); a refusal writes nothing."""
        before = self.snapshot()
        try:
            return self.call(cmd), None
        except LedgerError as exc:
            assert self.snapshot() == before, f"{cmd} was refused but changed state"
            return None, exc.reason

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def account_rows(self) -> dict[str, tuple[Any, ...]]:
        return {r[0]: (r[1], r[2], r[3], r[4], r[5], r[6], sorted(json.loads(r[7])), r[8])
                for r in self.query(
                    "SELECT account_id, status, cash_micros, voucher_micros, outstanding_micros,"
                    " overdue_since_us, suspended_at_us, scenario_ids, custom_policy"
                    " FROM accounts")}

    def snapshot(self) -> tuple[Any, ...]:
        """What settling an already settled day again must leave alone."""
        return (self.query("SELECT count(*) FROM journal")[0][0], self.account_rows(),
                self.query("SELECT count(*) FROM bills")[0][0])


@contextmanager
def ledger_at(start_us: int) -> Iterator[Live]:
    """A fresh ledger per hypothesis example (pytest's tmp_path is per test, not example)."""
    with tempfile.TemporaryDirectory(dir=RAM_DIR) as d:
        live = Live(Path(d) / "l.db", start_us)
        try:
            yield live
        finally:
            live.close()


# Durability is not what these tests check: a RAM disk keeps each fsync (and shrinking) cheap.
RAM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def consume_cmd(account_id: str, request_id: str, qty: int, region: int) -> Consume:
    return Consume(account_id, request_id, Region(region), CaptchaType.SLIDER, Architecture.V2,
                   Step.STEP_3, quantity=qty)


# ---------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Buy:
    acct: int
    spec_id: str


@dataclass(frozen=True)
class Use:
    acct: int
    quantity: int
    region: int


@dataclass(frozen=True)
class Configure:
    acct: int
    scenario_ids: tuple[str, ...]
    custom: bool


@dataclass(frozen=True)
class Fund:
    acct: int
    kind: FundsKind
    amount: int


@dataclass(frozen=True)
class PayOff:
    """A top-up of what the account owes now plus ``extra`` (skipped when that is 0)."""

    acct: int
    kind: FundsKind
    extra: int


@dataclass(frozen=True)
class Refund:
    pick: int


@dataclass(frozen=True)
class React:
    acct: int


@dataclass(frozen=True)
class Settle:
    pick: int


@dataclass(frozen=True)
class Restart:
    pass


@dataclass(frozen=True)
class Advance:
    """secs: by ``value`` seconds; day_end, suspend, refund_edge, expiry: that instant + value µs
    (the next day's start; the first suspension due; the end of the first refund window open;
    the first plan expiry with units left)."""

    mode: str
    value: int


accts = st.integers(0, 1)
amounts = st.one_of(
    st.integers(1, 10 * USD),
    st.integers(1, 700 * USD),
    st.sampled_from([5_000, 60 * USD, 500 * USD, 10 * USD - 1]),
)
advances = st.one_of(
    st.builds(Advance, st.just("secs"), st.integers(60, 3 * 86_400)),
    st.builds(Advance, st.just("day_end"), st.sampled_from([-1, 0, 1])),
    st.builds(Advance, st.just("suspend"), st.sampled_from([0, 1])),
    st.builds(Advance, st.just("refund_edge"), st.sampled_from([0, 1])),
    st.builds(Advance, st.just("expiry"), st.sampled_from([-1, 0, 1])),
)
uses = st.builds(Use, accts, st.one_of(st.integers(1, 300_000), st.integers(1, 60),
                                       st.sampled_from([50, 100_000, 100_001])),
                 st.sampled_from(sorted(PAYG_PRICE)))
configures = st.builds(Configure, accts, st.lists(st.sampled_from(SCENARIO_POOL), unique=True,
                                                 max_size=6).map(tuple), st.booleans())
funds = st.builds(Fund, accts, st.sampled_from(list(FundsKind)), amounts)
buys = st.builds(Buy, accts, st.sampled_from(SPECS))
# Weighted by repetition: sampled_from keeps duplicates (one_of would not weigh them).
operation = st.sampled_from([
    uses, uses, uses, uses, advances, advances, advances, advances, configures, configures,
    funds, funds, buys, buys, st.builds(Refund, st.integers(0, 100)), st.builds(React, accts),
    st.builds(Settle, st.integers(0, 100)),
]).flatmap(lambda s: s)
# Overdue, suspension and reactivation (R22-R24) more often: fees, small top-ups, long waits.
lifecycle_operation = st.sampled_from([
    uses, configures, configures, advances, advances, advances,
    st.builds(Advance, st.just("suspend"), st.sampled_from([0, 1])),
    st.builds(Advance, st.just("suspend"), st.sampled_from([0, 1])),
    st.builds(Fund, accts, st.sampled_from(list(FundsKind)), st.integers(1, 30 * USD)),
    st.builds(Fund, accts, st.sampled_from(list(FundsKind)), st.integers(1, 30 * USD)),
    st.builds(PayOff, accts, st.sampled_from(list(FundsKind)),
              st.sampled_from([0, 1, 5_000, 7 * USD])),
    st.builds(React, accts), st.builds(React, accts), buys, st.just(Restart()),
]).flatmap(lambda s: s)
# Refunds (R21) to accounts with something outstanding (R22 clarified): a plan bought with
# everything the account has, fees that the day's bill cannot pay, then the refund.
refund_lifecycle_operation = st.sampled_from([
    buys, buys, st.builds(Configure, accts, st.just(("s1", "s2", "s3", "s4")), st.booleans()),
    st.builds(Advance, st.just("day_end"), st.sampled_from([0, 1])),
    st.builds(Advance, st.just("day_end"), st.sampled_from([0, 1])),
    st.builds(Advance, st.just("suspend"), st.sampled_from([0, 1])),
    st.builds(Refund, st.integers(0, 100)), st.builds(Refund, st.integers(0, 100)),
    st.builds(Fund, accts, st.sampled_from(list(FundsKind)),
              st.sampled_from([1, 3 * USD, 60 * USD])),
    st.builds(PayOff, accts, st.sampled_from(list(FundsKind)), st.sampled_from([0, 60 * USD])),
    st.builds(React, accts), st.just(Restart()),
]).flatmap(lambda s: s)
initial_cash = st.sampled_from([0, 60 * USD, 600 * USD]) | st.integers(0, 10 * USD)
initial_vouchers = st.sampled_from([0, 100 * USD]) | st.integers(0, 10 * USD)
start_instants = st.one_of(st.sampled_from(EDGE_STARTS_US),
                           st.integers(_us(2027, 1, 1), _us(2029, 12, 31)))


# ---------------------------------------------------------------------------- the driver


def advance_target(model: Model, op: Advance) -> int:
    now = model.now
    day_end = cal.day_end(model.day())
    if op.mode == "secs":
        return now + op.value * US_PER_SECOND
    if op.mode == "suspend":
        since = [a.overdue_since for a in model.accounts.values()
                 if a.overdue_since is not None and a.status != SUSPENDED]
        if since and min(since) + SUSPEND_AFTER_US + op.value >= now:
            return min(since) + SUSPEND_AFTER_US + op.value
    if op.mode == "refund_edge":
        fresh = [p.bought for p in model.plans
                 if not p.refunded and p.bought + REFUND_WINDOW_US + op.value >= now]
        if fresh:
            return min(fresh) + REFUND_WINDOW_US + op.value
    if op.mode == "expiry":
        live = [p.expires for p in model.plans
                if not p.refunded and p.left > 0 and p.expires + op.value >= now]
        if live:
            return min(live) + op.value
    return max(now, day_end + (op.value if op.mode == "day_end" else 0))


def drive(live: Live, model: Model, accounts: list[str], funds: list[tuple[int, int]],
          ops: list[object]) -> None:
    """Run the ops on the ledger and the model; check every answer as it comes."""
    for account_id, (cash, voucher) in zip(accounts, funds, strict=True):
        live.call(CreateAccount(account_id))
        model.create(account_id)
        for kind, amount in ((FundsKind.CASH, cash), (FundsKind.VOUCHER, voucher)):
            if amount:
                live.call(TopUp(account_id, f"init-{int(kind)}", kind, amount))
                model.top_up(account_id, kind, amount)
    for i, op in enumerate(ops):
        event(f"op {type(op).__name__}")
        rid = f"r-{i}"
        acct = accounts[getattr(op, "acct", 0) % len(accounts)]
        if isinstance(op, Buy):
            price = builtin()[op.spec_id].price_micros
            expected = model.purchase(acct, op.spec_id, price)
            plan, reason = live.attempt(PurchasePlan(acct, rid, op.spec_id))
            if isinstance(expected, str):
                assert (plan, reason) == (None, expected), op
            else:
                assert reason is None, (op, reason)
                expected.plan_id = plan.plan_id
                assert (plan.purchased_at, plan.expires_at, plan.paid_voucher_micros,
                        plan.paid_cash_micros) == (expected.bought, expected.expires,
                                                   expected.paid_voucher, expected.paid_cash)
        elif isinstance(op, Use):
            expected = model.consume(acct, op.quantity, op.region)
            out, reason = live.attempt(consume_cmd(acct, rid, op.quantity, op.region))
            if isinstance(expected, str):
                assert (out, reason) == (None, expected), op
            else:
                assert reason is None, (op, reason)
                assert ([tuple(a) for a in out.allocations], out.payg_units) == expected, op
        elif isinstance(op, Configure):
            expected = model.features(acct, op.scenario_ids, op.custom)
            _, reason = live.attempt(UpdateFeatures(acct, rid, op.scenario_ids, op.custom))
            assert reason == expected, op
        elif isinstance(op, Fund):
            live.call(TopUp(acct, rid, op.kind, op.amount))
            model.top_up(acct, op.kind, op.amount)
        elif isinstance(op, PayOff):
            amount = model.accounts[acct].outstanding + op.extra
            if amount:
                live.call(TopUp(acct, rid, op.kind, amount))
                model.top_up(acct, op.kind, amount)
        elif isinstance(op, Refund):
            bought = [p for p in model.plans if p.plan_id != "?"]
            if not bought:
                continue
            plan = bought[op.pick % len(bought)]
            expected = model.refund(plan)
            _, reason = live.attempt(RefundPlan(plan.plan_id, rid))
            assert reason == expected, (op, plan)
            event(f"refund -> {reason or 'OK'}")
        elif isinstance(op, React):
            expected = model.reactivate(acct)
            _, reason = live.attempt(Reactivate(acct, rid))
            assert reason == expected, op
            event(f"reactivate -> {reason or 'OK'}")
        elif isinstance(op, Settle):
            days = model.ended_days()
            if op.pick % (len(days) + 1) == len(days):  # today: not ended yet (R17)
                _, reason = live.attempt(SettleDay(model.day()))
                assert reason == "DAY_NOT_ENDED"
            else:
                day = days[op.pick % (len(days) + 1)]
                got = [bill_tuple(b) for b in live.call(SettleDay(day))]
                assert got == model.bills.get(day, []), day
        elif isinstance(op, Restart):
            live.restart()
            assert live.clock.now_us() == model.now, "the test clock survives a restart"
        elif isinstance(op, Advance):
            to_us = advance_target(model, op)
            model.advance(to_us)
            assert live.call(AdvanceClock(to_us)) == to_us
        assert live.account_rows() == {a: m.row() for a, m in model.accounts.items()}, (i, op)
    # Past the end of the last day: every day with activity is settled (R17).
    to_us = cal.day_end(model.day())
    model.advance(to_us)
    assert live.call(AdvanceClock(to_us)) == to_us
    assert live.account_rows() == {a: m.row() for a, m in model.accounts.items()}
    bills = [b for day in model.bills.values() for b in day]
    event(f"bills: {min(len(bills), 10)}+" if len(bills) >= 10 else f"bills: {len(bills)}")
    event(f"suspensions: {model.suspensions}, reactivations: {model.reactivations}")
    event(f"bills with outstanding: {sum(1 for b in bills if b[9]) > 0}")
    event(f"outstanding paid by top-ups: {model.paid_outstanding_by_topups > 0}")
    event(f"outstanding paid by refunds: {model.paid_outstanding_by_refunds > 0}")
    event(f"plan offsets billed: {any(b[4] for b in bills)}")
    event(f"due != total (rounded): {any(b[5] != b[6] for b in bills)}")
    event(f"plan expiries: {len(model.expiry_log) > 0}")


def check_money(live: Live, model: Model) -> None:
    """Every micro-dollar topped up is a balance, a plan, a bill payment (R15, R16, R22)."""
    balances = live.query("SELECT sum(cash_micros + voucher_micros) FROM accounts")[0][0]
    plans_net = live.query(
        "SELECT coalesce(sum(paid_voucher_micros + paid_cash_micros), 0) FROM plans"
        " WHERE refunded_at_us IS NULL")[0][0]
    due, paid_at_settlement, outstanding_in_bills = live.query(
        "SELECT coalesce(sum(amount_due_micros), 0),"
        " coalesce(sum(paid_voucher_micros + paid_cash_micros), 0),"
        " coalesce(sum(outstanding_micros), 0) FROM bills")[0]
    topped_up, paid_later = live.query(
        "SELECT coalesce(sum(json_extract(payload, '$.amount_micros')), 0),"
        " coalesce(sum(json_extract(payload, '$.paid_outstanding_micros')), 0)"
        " FROM journal WHERE kind = 'top_up'")[0]
    refunds_paid = live.query(
        "SELECT coalesce(sum(json_extract(payload, '$.paid_outstanding_voucher_micros')"
        " + json_extract(payload, '$.paid_outstanding_cash_micros')), 0)"
        " FROM journal WHERE kind = 'refund'")[0][0]
    outstanding = live.query("SELECT sum(outstanding_micros) FROM accounts")[0][0]
    assert topped_up == model.topups_total
    assert (paid_later, refunds_paid) == (model.paid_outstanding_by_topups,
                                          model.paid_outstanding_by_refunds)
    # A refund's money paid outstanding amounts (R22): it left plans_net, not a balance.
    paid_later += refunds_paid
    assert topped_up == balances + plans_net + paid_at_settlement + paid_later
    assert due == paid_at_settlement + paid_later + outstanding
    assert outstanding_in_bills == paid_later + outstanding


def check_journal(live: Live, model: Model, days: list[str]) -> None:
    """The journal says the same (R25): each day settled once, in order, at its end (R17);
    one entry per bill with the bill's figures; suspensions (R23) and forfeits (R9)."""
    settled = [(json.loads(p)["day"], at) for at, p in live.query(
        "SELECT at_us, payload FROM journal WHERE kind = 'day_settled' ORDER BY seq")]
    assert settled == [(d, cal.day_end(d)) for d in days]
    bills = []
    for account_id, at, payload in live.query(
            "SELECT account_id, at_us, payload FROM journal WHERE kind = 'bill' ORDER BY seq"):
        p = json.loads(payload)
        bills.append((account_id, p["day"], p["bill_date"], tuple(map(tuple, p["lines"])),
                      tuple(map(tuple, p["plan_offsets"])), p["total_micros"],
                      p["amount_due_micros"], p["paid_voucher_micros"], p["paid_cash_micros"],
                      p["outstanding_micros"], at))
    assert bills == [b for d in days for b in model.bills.get(d, [])]
    suspended = []
    for account_id, at, payload in live.query(
            "SELECT account_id, at_us, payload FROM journal WHERE kind = 'account_suspended'"
            " ORDER BY seq"):
        p = json.loads(payload)
        suspended.append((account_id, at, p["overdue_since_us"], p["outstanding_micros"],
                          sorted(p["deleted"]["scenario_ids"]), p["deleted"]["custom_policy"]))
    assert suspended == model.suspension_log
    expired = [(a, json.loads(p)["plan_id"], at, json.loads(p)["units_forfeited"])
               for a, at, p in live.query("SELECT account_id, at_us, payload FROM journal"
                                          " WHERE kind = 'plan_expired' ORDER BY seq")]
    assert expired == model.expiry_log


# ---------------------------------------------------------------------------- R13-R24


def run_and_check(start_us: int, n_accounts: int, funds: list[tuple[int, int]],
                  ops: list[object]) -> None:
    accounts = list(ACCOUNT_IDS[:n_accounts])
    with ledger_at(start_us) as live:
        model = Model(now=start_us)
        drive(live, model, accounts, funds[:n_accounts], ops)
        days = model.ended_days()
        assert days and days[-1] == cal.billing_day(model.now - 1)
        assert days[0] == cal.billing_day(start_us)
        before = live.snapshot()
        first = {d: [bill_tuple(b) for b in live.call(SettleDay(d))] for d in days}
        middle = live.snapshot()
        again = {d: [bill_tuple(b) for b in live.call(SettleDay(d))] for d in days}
        after = live.snapshot()
        check_money(live, model)
        check_journal(live, model, days)
    assert first == {d: model.bills.get(d, []) for d in days}
    assert set(model.bills) <= set(days)
    assert again == first  # R19: the same bills again
    assert before == middle == after  # ... and nothing charged or written again


@RUN
@given(start_us=start_instants, n_accounts=st.integers(1, 2),
       funds=st.lists(st.tuples(initial_cash, initial_vouchers), min_size=2, max_size=2),
       ops=st.lists(operation, min_size=10, max_size=25))
def test_r13_r24_settlement_matches_reference_model(start_us, n_accounts, funds, ops):
    """Bills, payments, overdue and suspension equal the model's; money is conserved; R19."""
    run_and_check(start_us, n_accounts, funds, ops)


@SMALL
@given(start_us=start_instants, n_accounts=st.integers(1, 2),
       ops=st.lists(lifecycle_operation, min_size=10, max_size=25))
def test_r22_r24_overdue_suspension_lifecycle_matches_reference_model(start_us, n_accounts,
                                                                       ops):
    """Unpaid fees, suspension at +168 h + 1 µs, top-ups and reactivation as the model says."""
    run_and_check(start_us, n_accounts, [(0, 0), (0, 0)], ops)


@SMALL
@given(start_us=start_instants, n_accounts=st.integers(1, 2),
       funds=st.lists(st.sampled_from([(60 * USD, 0), (40 * USD, 20 * USD)]), min_size=2,
                      max_size=2),
       ops=st.lists(refund_lifecycle_operation, min_size=10, max_size=25))
def test_r21_r22_refunds_pay_outstanding_as_the_model_says(start_us, n_accounts, funds, ops):
    """Refunds to overdue and suspended accounts pay what is outstanding, vouchers then
    cash (R22 clarified); money is conserved and the journal rebuilds the same figures.
    Each run opens with a plan bought with everything the first account has and a fee that
    the day's bill cannot pay, so that a refund finds something outstanding."""
    owing = [Buy(0, "month-100k"), Configure(0, ("s1", "s2", "s3", "s4"), True),
             Advance("day_end", 0)]
    run_and_check(start_us, n_accounts, funds, owing + ops)


@SMALL
@given(qty=st.integers(1, 300_000), region=st.sampled_from(sorted(PAYG_PRICE)),
       scenarios=st.integers(0, 6), custom=st.booleans(),
       voucher=st.integers(0, 400 * USD), cash=st.integers(0, 400 * USD))
def test_r15_r16_one_day_bill_rounded_and_paid_vouchers_first(qty, region, scenarios, custom,
                                                              voucher, cash):
    """One day's bill: exact lines, due = total rounded half up to the cent, vouchers first."""
    d0 = _us(2027, 3, 10, 16)  # 2027-03-11 00:00+08:00
    with ledger_at(d0) as live:
        live.call(CreateAccount("acme"))
        for kind, amount in ((FundsKind.VOUCHER, voucher), (FundsKind.CASH, cash)):
            if amount:
                live.call(TopUp("acme", f"t{int(kind)}", kind, amount))
        live.call(AdvanceClock(d0 + US_PER_HOUR))
        ids = tuple(SCENARIO_POOL[:scenarios])
        live.call(UpdateFeatures("acme", "f", ids, custom))
        live.call(consume_cmd("acme", "c", qty, region))
        live.call(AdvanceClock(d0 + US_PER_DAY))
        (bill,) = live.call(SettleDay("2027-03-11"))
    total = qty * PAYG_PRICE[region] + max(0, scenarios - 3) * USD + custom * 5 * USD
    due = (total + 5_000) // 10_000 * 10_000
    pv = min(due, voucher)
    pc = min(due - pv, cash)
    assert (bill.total_micros, bill.amount_due_micros) == (total, due)
    assert (bill.paid_voucher_micros, bill.paid_cash_micros, bill.outstanding_micros) == (
        pv, pc, due - pv - pc)
    assert bill.issued_at_us == d0 + US_PER_DAY and bill.bill_date == "2027-03-12"


@SMALL
@given(before=st.integers(0, 6), during=st.lists(st.integers(0, 6), max_size=3),
       custom_moments=st.lists(st.booleans(), min_size=1, max_size=3))
def test_r13_r14_feature_fee_is_the_most_at_any_moment(before, during, custom_moments):
    """Day D pays for the most scenarios configured at any moment of D, custom if ever on."""
    d0 = _us(2027, 3, 10, 16)  # 2027-03-11 00:00+08:00
    with ledger_at(d0 - US_PER_HOUR) as live:
        live.call(CreateAccount("acme"))
        live.call(TopUp("acme", "t", FundsKind.CASH, 100 * USD))
        live.call(UpdateFeatures("acme", "f-before", tuple(SCENARIO_POOL[:before]),
                                 custom_moments[0]))
        customs = list(custom_moments[1:]) + [False] * len(during)
        for i, n in enumerate(during):
            live.call(AdvanceClock(d0 + (i + 1) * US_PER_HOUR))
            live.call(UpdateFeatures("acme", f"f-{i}", tuple(SCENARIO_POOL[:n]), customs[i]))
        live.call(AdvanceClock(d0 + 2 * US_PER_DAY))
        bills = {d: live.call(SettleDay(d)) for d in ("2027-03-11", "2027-03-12")}
    most = max([before, *during])
    any_custom = custom_moments[0] or any(customs[:len(during)])
    last_n = during[-1] if during else before
    last_custom = customs[len(during) - 1] if during else custom_moments[0]
    for day, (n, custom) in (("2027-03-11", (most, any_custom)),
                             ("2027-03-12", (last_n, last_custom))):
        want = max(0, n - 3) * USD + custom * 5 * USD
        got = bills[day]
        assert sum(b.total_micros for b in got) == want, day
        assert len(got) == (1 if want else 0), day


def test_r22_r23_r24_suspension_exactly_after_168_hours():
    """Overdue at the settlement; still served at +168 h, suspended 1 µs later; R24 order."""
    d0 = _us(2027, 3, 10, 16)
    with ledger_at(d0 + US_PER_HOUR) as live:
        live.call(CreateAccount("acme"))
        live.call(UpdateFeatures("acme", "f", SCENARIO_POOL[:5], True))
        live.call(AdvanceClock(d0 + US_PER_DAY))
        since = d0 + US_PER_DAY
        rows = live.account_rows()["acme"]
        assert rows[:5] == (OVERDUE, 0, 0, 7 * USD, since)
        live.call(AdvanceClock(since + SUSPEND_AFTER_US))
        assert live.account_rows()["acme"][0] == OVERDUE
        live.call(consume_cmd("acme", "c-served", 1, 1))  # service goes on while overdue
        live.call(AdvanceClock(since + SUSPEND_AFTER_US + 1))
        status, *_, suspended_at, scenarios, custom = live.account_rows()["acme"]
        assert (status, suspended_at, scenarios, custom) == (SUSPENDED, since + SUSPEND_AFTER_US
                                                             + 1, [], 0)
        assert live.attempt(consume_cmd("acme", "c", 1, 1))[1] == "ACCOUNT_SUSPENDED"
        assert live.attempt(UpdateFeatures("acme", "g", (), False))[1] == "ACCOUNT_SUSPENDED"
        assert live.attempt(Reactivate("acme", "r1"))[1] == "OUTSTANDING_BALANCE"
        owed = live.account_rows()["acme"][3]
        # 7 USD per day on 8 days (the suspension day too, R13/R14) + the served request.
        assert owed == 8 * 7 * USD
        # R22: outstanding first; the rest is cash for the suspension day's own bill (7.00:
        # USD 7.0007 rounded, the fees it had before the deletion, R13/R14, plus one request).
        live.call(TopUp("acme", "t", FundsKind.CASH, owed + 7 * USD))
        assert live.account_rows()["acme"][:5] == (SUSPENDED, 7 * USD, 0, 0, None)
        assert live.attempt(Reactivate("acme", "r2"))[1] is None
        live.call(AdvanceClock(since + 20 * US_PER_DAY))  # then fees stopped with the config
        assert live.account_rows()["acme"][:5] == (ACTIVE, 0, 0, 0, None)
        assert live.attempt(Reactivate("acme", "r3"))[1] == "NOT_SUSPENDED"


@pytest.mark.parametrize("late_us, reason", [(0, None), (1, "REFUND_WINDOW_PASSED")])
def test_r21_refund_window_is_120_hours_inclusive(late_us, reason):
    """A plan refunds at exactly 120 h after purchase, not 1 µs later; money back as paid."""
    t0 = _us(2027, 3, 10, 2)
    with ledger_at(t0) as live:
        live.call(CreateAccount("acme"))
        live.call(TopUp("acme", "v", FundsKind.VOUCHER, 20 * USD))
        live.call(TopUp("acme", "c", FundsKind.CASH, 50 * USD))
        plan = live.call(PurchasePlan("acme", "p", "month-100k"))
        live.call(AdvanceClock(t0 + REFUND_WINDOW_US + late_us))
        assert live.attempt(RefundPlan(plan.plan_id, "r"))[1] == reason
        balances = live.account_rows()["acme"][1:3]
    assert balances == ((50 * USD, 20 * USD) if reason is None else (10 * USD, 0))


# ---------------------------------------------------------------------------- regressions
# A refund after a restart once refunded a second copy of the plan (fixed in Engine.plan).


def _bought_then_restarted(live: Live) -> str:
    t0 = _us(2027, 3, 10, 2)
    live.call(CreateAccount("acme"))
    live.call(TopUp("acme", "t", FundsKind.CASH, 60 * USD))
    plan_id = live.call(PurchasePlan("acme", "p", "month-100k")).plan_id
    live.restart()
    assert live.clock.now_us() == t0
    return plan_id


def test_r21_a_plan_is_refunded_once_after_a_restart():
    """Refund after a restart, then again: PLAN_REFUNDED, and the price came back once."""
    with ledger_at(_us(2027, 3, 10, 2)) as live:
        plan_id = _bought_then_restarted(live)
        live.call(RefundPlan(plan_id, "r1"))
        second = live.attempt(RefundPlan(plan_id, "r2"))[1]
        cash = live.account_rows()["acme"][1]
    assert (second, cash) == ("PLAN_REFUNDED", 60 * USD)  # actual: (None, 120 USD)


def test_r21_a_plan_refunded_after_a_restart_offsets_nothing():
    """Refund after a restart, then consume: pay-as-you-go, and the plan stays refunded."""
    with ledger_at(_us(2027, 3, 10, 2)) as live:
        plan_id = _bought_then_restarted(live)
        live.call(RefundPlan(plan_id, "r1"))
        out = live.call(consume_cmd("acme", "c", 10, 1))
        refunded_at = live.query("SELECT refunded_at_us FROM plans")[0][0]
    # actual: allocations ((plan_id, 10),), payg 0, and refunded_at_us back to NULL
    assert (out.allocations, out.payg_units, refunded_at is not None) == ((), 10, True)
