"""The engine: the ledger's in-memory state and one handler per command.

Only the writer thread calls it. For each group of commands it opens a UnitOfWork, runs each
handler (check everything first, then change state: a refused command changes nothing), and
hands the UnitOfWork to the store to commit as one transaction. If the commit fails, the
in-memory state is thrown away and reloaded from the database, which rolled back.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from typing import Any

from . import calendar as cal
from .allocation import allocate
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, key_reused
from .model import (
    AccountState,
    AccountStatus,
    AdvanceClock,
    Consume,
    CreateAccount,
    FundsKind,
    PlanSpec,
    PlanState,
    PurchasePlan,
    TopUp,
    UpdateFeatures,
)
from .money import Region, payg_cost_micros, split_payment
from .store import Entry, Store, UnitOfWork

CLOCK_META_KEY = "clock_us"


@dataclass(frozen=True, slots=True)
class ConsumeOutcome:
    request_id: str
    billable: bool
    allocations: tuple[tuple[str, int], ...]
    payg_units: int
    payg_amount_micros: int
    replayed: bool
    billing_day: str
    recorded_at_us: int
    plan_units_remaining: int
    journal_seq: int


@dataclass(frozen=True, slots=True)
class Replayed:
    """Wraps an administrative result that a retry got again (R12)."""

    value: Any


def suspended(account_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"account {account_id!r} is suspended (overdue for more than 7 days, R23); "
        "pay what is outstanding and reactivate it", reason="ACCOUNT_SUSPENDED",
        account_id=account_id)


class Engine:
    def __init__(self, store: Store, clock: Any, catalog: dict[str, PlanSpec]) -> None:
        self.store = store
        self.clock = clock
        self.catalog = catalog
        self.uow: UnitOfWork | None = None
        self.reload()

    # ------------------------------------------------------------------ state lifecycle

    def reload(self) -> None:
        """(Re)build in-memory state from the committed database; no journal replay."""
        self.accounts: dict[str, AccountState] = {}
        self.plan_index: dict[str, PlanState] = {}  # every plan object held in memory
        seq, last_hash, last_at = self.store.journal_tail()
        self.next_seq, self.last_hash = seq + 1, last_hash
        self.clock.floor(last_at)
        saved = self.store.meta_get(CLOCK_META_KEY)
        if saved is not None:
            self.clock.floor(int(saved))
        self.expiries: list[tuple[int, int, str, str]] = [
            (p.expires_at, p.purchase_seq, p.plan_id, p.account_id)
            for p in self.store.load_plans("WHERE refunded_at_us IS NULL AND units_remaining > 0")
        ]
        heapq.heapify(self.expiries)

    def begin(self) -> UnitOfWork:
        self.uow = UnitOfWork(last_hash=self.last_hash, next_seq=self.next_seq)
        return self.uow

    def commit(self) -> None:
        """Commit the open group; on failure reload state and re-raise (Unavailable)."""
        uow = self._uow
        if uow.rows or uow.meta:
            try:
                self.store.commit(uow)
            except Exception:
                self.uow = None
                self.reload()
                raise
        self.last_hash, self.next_seq = uow.last_hash, uow.next_seq
        self.uow = None

    @property
    def _uow(self) -> UnitOfWork:
        assert self.uow is not None, "commands run inside begin()/commit()"
        return self.uow

    def now(self) -> int:
        return self.clock.now_us()

    # ------------------------------------------------------------------ helpers

    def account(self, account_id: str) -> AccountState:
        acct = self.accounts.get(account_id)
        if acct is None:
            acct = self.store.load_account(account_id)
            if acct is None:
                raise NotFound(f"no account {account_id!r}; create it first",
                               reason="ACCOUNT_NOT_FOUND", account_id=account_id)
            self.accounts[account_id] = acct
            self.plan_index.update((p.plan_id, p) for p in acct.live_plans)
        return acct

    def _claimed(self, account_id: str, kind: str, request_id: str, fingerprint: str
                 ) -> tuple[int, dict[str, Any], int] | None:
        """R12: the earlier entry for this key, if any; refuses a key reused for other content."""
        uow = self._uow
        seq = uow.keys.get((account_id, kind, request_id))
        if seq is not None:  # claimed earlier in this very group: not yet in the database
            row = uow.rows[seq - uow.rows[0][0]]
            found: tuple[int, str | None, dict[str, Any], int] | None = (
                seq, row[5], json.loads(row[6]), row[1])
        else:
            found = self.store.find_key(account_id, kind, request_id)
        if found is None:
            return None
        seq, fp, payload, at_us = found
        if fp != fingerprint:
            raise key_reused(kind, request_id)
        return seq, payload, at_us

    def _append(self, at_us: int, kind: str, account_id: str | None, payload: dict[str, Any],
                request_id: str | None = None, fingerprint: str | None = None) -> int:
        uow = self._uow
        return uow.append(Entry(uow.next_seq, at_us, kind, account_id, request_id, fingerprint,
                                payload))

    def _touch(self, acct: AccountState) -> None:
        self._uow.accounts[acct.account_id] = acct

    def execute(self, cmd: Any) -> Any:
        handler = self._handlers.get(type(cmd))
        if handler is None:
            raise NotImplementedError(type(cmd).__name__)
        return handler(self, cmd)

    # ------------------------------------------------------------------ due work (R9)

    def next_due_us(self) -> int | None:
        return self.expiries[0][0] if self.expiries else None

    def run_due(self, now: int) -> None:
        """Everything that fell due at or before now, in time order: plan expiries (R9)."""
        while self.expiries and self.expiries[0][0] <= now:
            expires_at, _, plan_id, account_id = heapq.heappop(self.expiries)
            self._expire(self.account(account_id), plan_id, expires_at, now)

    def _expire(self, acct: AccountState, plan_id: str, expires_at: int, now: int) -> None:
        plan = next((p for p in acct.live_plans if p.plan_id == plan_id), None)
        if plan is None or plan.units_remaining == 0 or plan.refunded_at is not None:
            return
        forfeited = plan.units_remaining
        plan.units_forfeited += forfeited
        plan.units_remaining = 0
        acct.live_plans.remove(plan)
        self._uow.plans[plan.plan_id] = plan
        self._append(now, "plan_expired", acct.account_id,
                     {"plan_id": plan.plan_id, "expires_at_us": expires_at,
                      "units_forfeited": forfeited})

    def advance_clock(self, cmd: AdvanceClock) -> int:
        """Test clock: stop at each due instant on the way so entries carry their own time."""
        while (due := self.next_due_us()) is not None and due <= cmd.to_us:
            self.clock.set(max(due, self.now()))
            self.run_due(self.now())
        self.clock.set(cmd.to_us)
        self._uow.meta[CLOCK_META_KEY] = str(cmd.to_us)
        return self.now()

    # ------------------------------------------------------------------ Consume (R3-R11)

    def consume(self, c: Consume) -> ConsumeOutcome:
        now = self.now()
        acct = self.account(c.account_id)
        day = cal.billing_day(now)
        if not c.billable:  # R3: acknowledged, nothing charged, no state changed, no key
            if acct.status is AccountStatus.SUSPENDED:
                raise suspended(c.account_id)
            return ConsumeOutcome(c.request_id, False, (), 0, 0, False, day, now,
                                  acct.units_remaining_at(now), 0)
        prior = self._claimed(c.account_id, "consume", c.request_id, c.fingerprint())
        if prior is not None:
            return _consume_replay(c.request_id, *prior)
        if acct.status is AccountStatus.SUSPENDED:  # R23
            raise suspended(c.account_id)
        takes, payg_units = allocate(acct.live_plans, c.quantity, now)
        payg_micros = payg_cost_micros(c.region, payg_units)
        allocations = tuple((p.plan_id, n) for p, n in takes)
        if c.dry_run:
            after = acct.units_remaining_at(now) - (c.quantity - payg_units)
            return ConsumeOutcome(c.request_id, True, allocations, payg_units, payg_micros,
                                  False, day, now, after, 0)
        uow = self._uow
        for plan, n in takes:
            assert 0 < n <= plan.units_remaining, "no plan goes below zero (R11)"
            plan.units_remaining -= n
            uow.plans[plan.plan_id] = plan
            key = (c.account_id, day, plan.plan_id)
            uow.offsets[key] = uow.offsets.get(key, 0) + n
        if payg_units:
            acc = uow.usage.setdefault((c.account_id, day, int(c.region)), [0, 0])
            acc[0] += payg_units
            acc[1] += payg_micros
        if takes and takes[-1][0].units_remaining == 0:
            acct.live_plans = [p for p in acct.live_plans if p.units_remaining > 0]
        remaining = acct.units_remaining_at(now)
        payload = {"region": int(c.region), "type": int(c.captcha_type),
                   "arch": int(c.architecture), "step": int(c.step), "qty": c.quantity,
                   "alloc": [list(a) for a in allocations], "payg_units": payg_units,
                   "payg_micros": payg_micros, "day": day, "remaining": remaining}
        if c.scenario_id:
            payload["scenario"] = c.scenario_id
        if c.client_timestamp_us is not None:
            payload["client_ts_us"] = c.client_timestamp_us
        seq = self._append(now, "consume", c.account_id, payload, c.request_id, c.fingerprint())
        return ConsumeOutcome(c.request_id, True, allocations, payg_units, payg_micros, False,
                              day, now, remaining, seq)

    # ------------------------------------------------------------------ accounts

    def create_account(self, c: CreateAccount) -> AccountState:
        if c.account_id in self.accounts or self.store.load_account(c.account_id) is not None:
            raise AlreadyExists(f"account {c.account_id!r} already exists",
                                reason="ACCOUNT_EXISTS", account_id=c.account_id)
        now = self.now()
        acct = AccountState(c.account_id, c.display_name, now)
        self.accounts[c.account_id] = acct
        self._touch(acct)
        self._append(now, "account_created", c.account_id, {"display_name": c.display_name})
        return acct

    def top_up(self, c: TopUp) -> AccountState | Replayed:
        acct = self.account(c.account_id)
        if self._claimed(c.account_id, "top_up", c.request_id, c.fingerprint()):
            return Replayed(acct)
        now = self.now()
        # R22: a top-up pays what is outstanding first.
        to_outstanding = min(c.amount_micros, acct.outstanding_micros)
        rest = c.amount_micros - to_outstanding
        if c.kind is FundsKind.CASH:
            acct.cash_micros += rest
        else:
            acct.voucher_micros += rest
        acct.outstanding_micros -= to_outstanding
        if acct.outstanding_micros == 0 and acct.status is AccountStatus.OVERDUE:
            acct.status, acct.overdue_since = AccountStatus.ACTIVE, None
        self._touch(acct)
        self._append(now, "top_up", c.account_id,
                     {"kind": int(c.kind), "amount_micros": c.amount_micros,
                      "paid_outstanding_micros": to_outstanding},
                     c.request_id, c.fingerprint())
        return acct

    def update_features(self, c: UpdateFeatures) -> AccountState | Replayed:
        acct = self.account(c.account_id)
        if self._claimed(c.account_id, "features", c.request_id, c.fingerprint()):
            return Replayed(acct)
        if acct.status is AccountStatus.SUSPENDED:
            raise suspended(c.account_id)
        now = self.now()
        day = cal.billing_day(now)
        self._record_feature_day(acct, day, len(c.scenario_ids), c.custom_policy_enabled)
        acct.scenario_ids = tuple(sorted(set(c.scenario_ids)))
        acct.custom_policy_enabled = c.custom_policy_enabled
        self._touch(acct)
        self._append(now, "features", c.account_id,
                     {"scenario_ids": list(acct.scenario_ids),
                      "custom_policy": c.custom_policy_enabled}, c.request_id, c.fingerprint())
        return acct

    def _record_feature_day(self, acct: AccountState, day: str, scenarios: int, custom: bool
                            ) -> None:
        """R13/R14: keep, per day, the configuration at its start and the most it ever had."""
        key = (acct.account_id, day)
        row = self._uow.features.get(key) or self.store.feature_day(*key)
        if row is None:
            start_s, start_c = len(acct.scenario_ids), int(acct.custom_policy_enabled)
            row = (start_s, start_c, start_s, start_c)
        self._uow.features[key] = (row[0], row[1], max(row[2], scenarios),
                                   max(row[3], int(custom)))

    # ------------------------------------------------------------------ plans (R6, R16)

    def purchase_plan(self, c: PurchasePlan) -> PlanState | Replayed:
        acct = self.account(c.account_id)
        prior = self._claimed(c.account_id, "purchase", c.request_id, c.fingerprint())
        if prior is not None:
            return Replayed(self.plan(prior[1]["plan_id"]))
        spec = self.catalog.get(c.spec_id)
        if spec is None:
            raise NotFound(f"no plan spec {c.spec_id!r}; see ListPlanSpecs",
                           reason="SPEC_NOT_FOUND", spec_id=c.spec_id)
        if acct.voucher_micros + acct.cash_micros < spec.price_micros:  # R16
            raise FailedPrecondition(
                f"vouchers plus cash ({acct.voucher_micros + acct.cash_micros} micro-USD) cannot "
                f"pay {spec.spec_id} ({spec.price_micros} micro-USD); top up first (R16)",
                reason="INSUFFICIENT_FUNDS", account_id=c.account_id)
        now = self.now()
        from_voucher, from_cash = split_payment(spec.price_micros, acct.voucher_micros,
                                                acct.cash_micros)
        acct.voucher_micros -= from_voucher
        acct.cash_micros -= from_cash
        seq = self._uow.next_seq
        plan = PlanState(
            plan_id=f"plan-{seq}", account_id=acct.account_id, spec_id=spec.spec_id,
            units_total=spec.units, units_remaining=spec.units, price_micros=spec.price_micros,
            validity=spec.validity, purchased_at=now,
            expires_at=cal.add_months(now, spec.validity.months), purchase_seq=seq,
            paid_voucher_micros=from_voucher, paid_cash_micros=from_cash)
        acct.live_plans.append(plan)
        self.plan_index[plan.plan_id] = plan
        acct.live_plans.sort(key=lambda p: p.order_key)
        heapq.heappush(self.expiries, (plan.expires_at, seq, plan.plan_id, acct.account_id))
        self._uow.plans[plan.plan_id] = plan
        self._touch(acct)
        self._append(now, "purchase", acct.account_id,
                     {"plan_id": plan.plan_id, "spec_id": spec.spec_id, "units": spec.units,
                      "validity": int(spec.validity), "price_micros": spec.price_micros,
                      "paid_voucher_micros": from_voucher, "paid_cash_micros": from_cash,
                      "expires_at_us": plan.expires_at}, c.request_id, c.fingerprint())
        return plan

    def plan(self, plan_id: str) -> PlanState:
        held = self.plan_index.get(plan_id)
        if held is not None:
            return held
        found = self.store.load_plans("WHERE plan_id = ?", (plan_id,))
        if not found:
            raise NotFound(f"no plan {plan_id!r}", reason="PLAN_NOT_FOUND", plan_id=plan_id)
        return found[0]

    _handlers: dict[type, Any] = {
        Consume: consume,
        CreateAccount: create_account,
        TopUp: top_up,
        UpdateFeatures: update_features,
        PurchasePlan: purchase_plan,
        AdvanceClock: advance_clock,
    }


def _consume_replay(request_id: str, seq: int, p: dict[str, Any], at_us: int) -> ConsumeOutcome:
    return ConsumeOutcome(request_id, True, tuple((a[0], a[1]) for a in p["alloc"]),
                          p["payg_units"], p["payg_micros"], True, p["day"], at_us,
                          p["remaining"], seq)


__all__ = ["ConsumeOutcome", "Engine", "Region", "Replayed", "InvalidArgument"]
