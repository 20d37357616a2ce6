"""The simulation's steps and the seeded generator that draws them (tests/test_simulation.py).

One frozen dataclass per kind of step: CreateAccount, TopUp (cash, voucher), PurchasePlan,
RefundPlan, UpdateFeatures, Consume (every region / type / architecture / step, billable or not,
dry runs, replays of an earlier key with the same content and with other content, bad input),
ConsumeBatch and ConsumeStream (a key twice in one call too), Reactivate, SettleDay (ended, not
ended, before the first day, malformed), AdvanceTime / SetTime (minutes to weeks, exact day
boundaries +-1 us, the suspension, refund window and expiry instants +-1 us, backwards) and
graceful and SIGKILL restarts. :class:`Gen` draws them from ``random.Random(seed)``, looking at
the reference model (tests/sim_model.py) for sensible targets.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from .sim_model import CReq, RefLedger
from .sim_rules import (
    ADVANCE_MAX_US,
    AMOUNT_MAX,
    BILLABLE,
    CASH,
    CATALOG,
    EPOCH,
    MAINLAND,
    OUTSIDE,
    REFUND_WINDOW_US,
    STEP_3,
    STEP_4_1,
    SUSPEND_AFTER_US,
    SUSPENDED,
    TZ8,
    US_PER_S,
    USD,
    V2,
    V3,
    VOUCHER,
    day_end,
    shift_day,
    to_us,
)

ACCOUNTS = ("acme", "beta", "gamma")
GHOST = "ghost"  # never created: every call for it is ACCOUNT_NOT_FOUND
SCENARIO_POOL = tuple(f"scn-{i}" for i in range(8))


# ---------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class Create:
    acct: str
    name: str


@dataclass(frozen=True)
class TopUp:
    acct: str
    rid: str
    kind: int
    amount: int


@dataclass(frozen=True)
class Purchase:
    acct: str
    rid: str
    spec: str


@dataclass(frozen=True)
class Refund:
    plan_id: str
    rid: str
    reason: str = ""


@dataclass(frozen=True)
class Features:
    acct: str
    rid: str
    ids: tuple[str, ...]
    custom: bool


@dataclass(frozen=True)
class Consume:
    req: CReq


@dataclass(frozen=True)
class Batch:
    """ConsumeBatch, or with ``stream`` the same requests on one ConsumeStream."""

    items: tuple[CReq, ...]
    stream: bool = False


@dataclass(frozen=True)
class Reactivate:
    acct: str
    rid: str


@dataclass(frozen=True)
class Settle:
    day: str


@dataclass(frozen=True)
class Advance:
    seconds: int


@dataclass(frozen=True)
class SetTime:
    to_us: int
    why: str = ""

    def __repr__(self) -> str:
        local = (EPOCH + timedelta(microseconds=self.to_us)).astimezone(TZ8)
        return f"SetTime({self.to_us} = {local.isoformat()} {self.why})"


@dataclass(frozen=True)
class Restart:
    crash: bool


Op = Any


# ---------------------------------------------------------------------------- the generator

# Starts on the edges of UTC+8 days, months and years (local times in comments).
EDGE_STARTS = (
    to_us(datetime(2027, 3, 10, 23, 59, 59, 999_999, tzinfo=TZ8)),
    to_us(datetime(2027, 3, 11, tzinfo=TZ8)),
    to_us(datetime(2027, 1, 31, 10, tzinfo=TZ8)),  # a month plan expires 28 Feb 10:00 (R6)
    to_us(datetime(2028, 2, 29, 9, tzinfo=TZ8)),  # a year plan expires 28 Feb 2029 (R6)
    to_us(datetime(2027, 12, 31, 23, 30, tzinfo=TZ8)),
)
START_RANGE = (to_us(datetime(2027, 1, 1, tzinfo=UTC)), to_us(datetime(2029, 6, 30, tzinfo=UTC)))
SPEC_WEIGHTS = (("month-100k", 40), ("year-1m", 18), ("month-1m", 14), ("year-10m", 5),
                ("year-100m", 2), ("no-such-spec", 3))
# Weighted step kinds.
KINDS = (("create", 4), ("top_up", 12), ("purchase", 9), ("refund", 5), ("features", 6),
         ("consume", 22), ("batch", 6), ("reactivate", 3), ("settle", 5), ("time", 22),
         ("restart", 2), ("crash", 2))


def pick_weighted(rng: random.Random, table: Sequence[tuple[Any, int]]) -> Any:
    return rng.choices([k for k, _ in table], [w for _, w in table])[0]


def start_instant(rng: random.Random, not_before_us: int) -> int:
    start = rng.choice(EDGE_STARTS) if rng.random() < 0.4 else rng.randrange(*START_RANGE)
    while start < not_before_us:  # a test clock already past 2027: keep the calendar's shape
        start += to_us(datetime(1974, 1, 1, tzinfo=UTC))  # 4 years (one leap day)
    return start


class Gen:
    """Draws the next request from the rng, looking at the model for sensible targets."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.sent: dict[str, list[Any]] = {}

    def remember(self, kind: str, item: Any) -> Any:
        self.sent.setdefault(kind, []).append(item)
        return item

    def earlier(self, kind: str, p: float) -> Any | None:
        """With probability p, something sent before (to replay it)."""
        old = self.sent.get(kind)
        if old and self.rng.random() < p:
            return self.rng.choice(old[-30:])
        return None

    def account(self, m: RefLedger) -> str:
        if m.accounts and self.rng.random() < 0.93:
            return self.rng.choice(sorted(m.accounts))
        return self.rng.choice((*ACCOUNTS, GHOST))

    def next(self, n: int, m: RefLedger) -> Op:
        rng = self.rng
        kinds = list(KINDS)
        if len(m.accounts) < 1:
            kinds.append(("create", 60))
        elif len(m.accounts) < 2:
            kinds.append(("create", 6))
        kind = pick_weighted(rng, kinds)
        return getattr(self, f"gen_{kind}")(n, m)

    def gen_create(self, n: int, m: RefLedger) -> Op:
        acct = self.rng.choice(ACCOUNTS)
        return Create(acct, self.rng.choice(["", f"{acct} Inc.", f"{acct} #{n}"]))

    def gen_top_up(self, n: int, m: RefLedger) -> Op:
        rng = self.rng
        old = self.earlier("top_up", 0.12)
        if old is not None:
            if rng.random() < 0.6:
                return old  # the same key and content: a replay
            return self.remember("top_up", replace(old, amount=old.amount + 1))
        acct = self.account(m)
        kind = rng.choice((CASH, VOUCHER))
        owed = m.accounts[acct].outstanding if acct in m.accounts else 0
        r = rng.random()
        if owed and r < 0.25:
            amount = owed + rng.choice((0, 0, 1, 5_000, 7 * USD))  # pays it off (R22)
        elif r < 0.35:
            amount = rng.randint(1, 10 * USD)
        elif r < 0.38:
            amount = rng.choice((0, -5, AMOUNT_MAX + 1))  # refused: INVALID_ARGUMENT
        elif r < 0.46:
            amount = 5_000 * USD
        else:
            amount = rng.randint(50 * USD, 3_000 * USD)
        return self.remember("top_up", TopUp(acct, f"t{n}", kind, amount))

    def gen_purchase(self, n: int, m: RefLedger) -> Op:
        rng = self.rng
        old = self.earlier("purchase", 0.12)
        if old is not None:
            if rng.random() < 0.6:
                return old
            other = "month-100k" if old.spec != "month-100k" else "year-1m"
            return self.remember("purchase", replace(old, spec=other))
        acct = self.account(m)
        spec = pick_weighted(rng, SPEC_WEIGHTS)
        if rng.random() < 0.6:  # mostly what some account can pay for (R16)
            funds = {a: s.cash + s.voucher for a, s in m.accounts.items()}
            can = sorted((a, sid) for a in funds for sid, w in SPEC_WEIGHTS
                         if sid in CATALOG and CATALOG[sid][3] <= funds[a] for _ in range(w))
            if can:
                acct, spec = rng.choice(can)
        return self.remember("purchase", Purchase(acct, f"p{n}", spec))

    def gen_refund(self, n: int, m: RefLedger) -> Op:
        rng = self.rng
        old = self.earlier("refund", 0.12)
        named = [p for p in m.plans if p.plan_id != "?"]
        if old is not None:
            if rng.random() < 0.6 or not named:
                return old
            owner = next((p.account_id for p in named if p.plan_id == old.plan_id), None)
            same_owner = [p.plan_id for p in named if p.account_id == owner]
            return self.remember("refund", replace(old, plan_id=rng.choice(  # other content
                same_owner or [p.plan_id for p in named])))
        untouched = [p for p in named if p.left == p.units and p.refunded_at is None
                     and m.now - p.bought <= REFUND_WINDOW_US]
        if not named or rng.random() < 0.06:
            plan_id = "plan-999999"
        elif untouched and rng.random() < 0.5:
            plan_id = rng.choice(untouched).plan_id
        elif rng.random() < 0.5:
            plan_id = named[-1].plan_id
        else:
            plan_id = rng.choice(named).plan_id
        return self.remember("refund", Refund(plan_id, f"rf{n}", rng.choice(["", "changed mind"])))

    def gen_features(self, n: int, m: RefLedger) -> Op:
        rng = self.rng
        old = self.earlier("features", 0.1)
        if old is not None:
            if rng.random() < 0.6:
                return old
            return self.remember("features", replace(old, custom=not old.custom))
        ids = tuple(rng.sample(SCENARIO_POOL, rng.choice((0, 1, 3, 4, 4, 5, 6, 8))))
        if ids and rng.random() < 0.04:
            ids = (*ids, ids[0])  # the same scenario twice: INVALID_ARGUMENT
        return self.remember("features", Features(self.account(m), f"f{n}", ids,
                                                  rng.random() < 0.4))

    def gen_reactivate(self, n: int, m: RefLedger) -> Op:
        old = self.earlier("reactivate", 0.15)
        if old is not None:
            return old
        suspended = sorted(a for a, s in m.accounts.items() if s.status == SUSPENDED)
        acct = self.rng.choice(suspended) if suspended and self.rng.random() < 0.7 \
            else self.account(m)
        return self.remember("reactivate", Reactivate(acct, f"ra{n}"))

    def creq(self, m: RefLedger, rid: str) -> CReq:
        rng = self.rng
        acct = self.account(m)
        if rng.random() < 0.7:
            arch, ctype, step = rng.choice(sorted(BILLABLE))
        else:
            arch, ctype, step = rng.choice((V2, V3)), rng.randint(1, 5), rng.choice((1, 2))
        r = rng.random()
        if r < 0.45:
            qty = rng.randint(1, 20)
        elif r < 0.5:
            qty = 0  # means 1 (R5)
        elif r < 0.7:
            qty = rng.randint(21, 5_000)
        elif r < 0.85:
            qty = rng.randint(5_000, 120_000)
        elif r < 0.96:
            qty = rng.choice((99_999, 100_000, 100_001))
        elif r < 0.97:
            qty = 1_000_000
        else:
            qty = rng.randint(120_000, 600_000)
        req = CReq(acct, rid, rng.choice((MAINLAND, OUTSIDE)), ctype, arch, step, qty,
                   "scn-1" if rng.random() < 0.1 else None, rng.random() < 0.07)
        if rng.random() < 0.03:  # bad input: refused alone
            req = replace(req, **rng.choice(({"region": 0}, {"qty": -1}, {"qty": 1_000_001},
                                             {"arch": 0}, {"step": 3})))
        return req

    def consume_req(self, n: int, m: RefLedger, rid: str) -> CReq:
        rng = self.rng
        old = self.earlier("consume", 0.15)
        if old is not None:
            if rng.random() < 0.6:
                return replace(old, dry=rng.random() < 0.2)  # same content (dry_run is not)
            return self.remember("consume", replace(old, **rng.choice(
                ({"qty": old.qty + 1}, {"region": MAINLAND + OUTSIDE - old.region},
                 {"step": STEP_3 + STEP_4_1 - old.step}, {"scenario": "scn-2"}))))
        return self.remember("consume", self.creq(m, rid))

    def gen_consume(self, n: int, m: RefLedger) -> Op:
        return Consume(self.consume_req(n, m, f"c{n}"))

    def gen_batch(self, n: int, m: RefLedger) -> Op:
        items: list[CReq] = []
        for i in range(self.rng.randint(2, 6)):
            if items and self.rng.random() < 0.1:  # a key twice in one batch
                items.append(items[-1])
            else:
                items.append(self.consume_req(n, m, f"b{n}.{i}"))
        return Batch(tuple(items), stream=self.rng.random() < 0.3)

    def gen_settle(self, n: int, m: RefLedger) -> Op:
        rng = self.rng
        today = m.day()
        r = rng.random()
        if m.settled and r < 0.5:
            return Settle(rng.choice(m.settled))
        if r < 0.65:
            return Settle(shift_day(today, -1))
        if r < 0.8:
            return Settle(today)  # not ended (R17)
        if r < 0.87:
            return Settle(shift_day(today, rng.randint(1, 40)))
        if r < 0.94:
            return Settle(shift_day(m.first_day or today, -rng.randint(1, 400)))
        return Settle(rng.choice(("2027-02-30", "2027-13-01", "yesterday", "2027-3-1")))

    def gen_time(self, n: int, m: RefLedger) -> Op:
        rng = self.rng
        now = m.now
        r = rng.random()
        if r < 0.2:
            return Advance(rng.randint(1, 180) * 60)
        if r < 0.4:
            return Advance(rng.randint(1, 36) * 3_600 + rng.randint(0, 59))
        if r < 0.52:
            return Advance(rng.randint(1, 9) * 86_400 + rng.randint(0, 86_399))
        if r < 0.55:
            return Advance(rng.randint(20, 45) * 86_400)
        if r < 0.57:
            return Advance(rng.choice((0, -1)))
        if r < 0.59 and now > 0:
            return SetTime(now - rng.randint(1, 3_600) * US_PER_S, "backwards")
        if r < 0.7:
            overdue = sorted(a.overdue_since + SUSPEND_AFTER_US for a in m.accounts.values()
                             if a.overdue_since is not None and a.status != SUSPENDED
                             and a.overdue_since + SUSPEND_AFTER_US >= now)
            if overdue:
                edge = rng.choice((0, 1))
                return SetTime(overdue[0] + edge, f"suspension edge +{edge}us (R23)")
        elif r < 0.78:
            fresh = sorted(p.bought + REFUND_WINDOW_US for p in m.plans
                           if p.refunded_at is None and p.bought + REFUND_WINDOW_US >= now)
            if fresh:
                edge = rng.choice((0, 1))
                return SetTime(fresh[0] + edge, f"refund window edge +{edge}us (R21)")
        elif r < 0.84:
            expiries = sorted(p.expires for p in m.plans if p.refunded_at is None
                              and p.left > 0 and now <= p.expires - 1
                              and p.expires + 1 - now <= ADVANCE_MAX_US)
            if expiries:
                edge = rng.choice((-1, 0, 1))
                return SetTime(expiries[0] + edge, f"expiry {edge:+d}us (R6, R9)")
        days = rng.choice((0, 0, 0, 1, 2))
        edge = rng.choice((0, 0, 0, -1, 1))
        to = max(now, day_end(shift_day(m.day(), days)) + edge)
        return SetTime(to, f"day boundary {edge:+d}us (R1, R17)")

    def gen_restart(self, n: int, m: RefLedger) -> Op:
        return Restart(crash=False)

    def gen_crash(self, n: int, m: RefLedger) -> Op:
        return Restart(crash=True)
