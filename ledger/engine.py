"""The engine: the ledger's in-memory state and one handler per command.

Only the writer thread calls it. For each group of commands it opens a UnitOfWork, runs each
handler (check everything first, then change state: a refused command changes nothing), and
hands the UnitOfWork to the store to commit as one transaction. If the commit fails, the
in-memory state is thrown away and reloaded from the database, which rolled back.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import calendar as cal
from . import model as m
from .allocation import take_in_order
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
    Reactivate,
    RefundPlan,
    SettleDay,
    TopUp,
    UpdateFeatures,
)
from .money import Region, payg_cost_micros, split_payment
from .settlement import Bill, make_bill
from .store import Entry, Store, UnitOfWork, bill_row, day_figures, read_bills

log = logging.getLogger("quota_ledger.engine")

CLOCK_META_KEY = "clock_us"
SETTLED_META_KEY = "settled_through"
OVERDUE_SUSPEND_AFTER_US = 168 * cal.US_PER_HOUR  # R23: strictly more than 7 days
REFUND_WINDOW_US = 120 * cal.US_PER_HOUR  # R21: at most 5 days, inclusive


class ConsumeOutcome(NamedTuple):
    """A Consume's result (a NamedTuple: built once per request on the hot path)."""

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
        self.suspensions: list[tuple[int, str, int]] = [
            (since + OVERDUE_SUSPEND_AFTER_US + 1, acct, since)
            for acct, since in self.store.overdue_accounts()]
        heapq.heapify(self.suspensions)
        settled = self.store.meta_get(SETTLED_META_KEY)
        first_at = self.store.first_entry_at()
        self.next_settle_day: str | None = (
            cal.next_day(settled) if settled is not None
            else cal.billing_day(first_at) if first_at is not None else None)

    def begin(self) -> UnitOfWork:
        self.uow = UnitOfWork(last_hash=self.last_hash, next_seq=self.next_seq)
        self._now: int | None = None
        self._looked_up: set[tuple[str, str, str]] = set()
        self._found: dict[tuple[str, str, str], tuple[int, str | None, str, int]] = {}
        return self.uow

    def prefetch_keys(self, cmds: list[Any]) -> None:
        """Look up the idempotency keys of a group's consumes in a few statements, not one
        each; keys claimed later in the group are still seen through the UnitOfWork."""
        keys = [(c.account_id, "consume", c.request_id) for c in cmds if type(c) is Consume]
        self._looked_up.update(keys)
        self._found.update(self.store.find_keys(keys))

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

    def flush(self) -> None:
        """Commit what the open group holds so far (settlement reads committed figures)."""
        self.commit()
        self.begin()

    @property
    def _uow(self) -> UnitOfWork:
        assert self.uow is not None, "commands run inside begin()/commit()"
        return self.uow

    def now(self) -> int:
        """The ledger's time for the open group: read once, shared by the group's entries
        (they commit at one instant); a test-clock step inside the group reads it anew."""
        if self._now is None:
            self._now = self.clock.now_us()
        return self._now

    def _set_clock(self, t_us: int) -> None:
        self.clock.set(t_us)
        self._now = None

    _now: int | None = None
    on_settled: Any = None  # callback(day, bills, seconds), e.g. metrics

    def _billing_day(self, t_us: int) -> str:
        """R1, cached for the current day: the hot path asks once per request."""
        start, end, day = self._day_cache
        if start <= t_us < end:
            return day
        day = cal.billing_day(t_us)
        self._day_cache = (cal.day_start(day), cal.day_end(day), day)
        return day

    _day_cache: tuple[int, int, str] = (0, 0, "")

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
        key = (account_id, kind, request_id)
        seq = uow.keys.get(key)
        if seq is not None:  # claimed earlier in this very group: not yet in the database
            row = uow.rows[seq - uow.rows[0][0]]
            found: tuple[int, str | None, str, int] | None = (seq, row[5], row[6], row[1])
        elif key in self._looked_up:
            found = self._found.get(key)
        else:
            found = self.store.find_key(account_id, kind, request_id)
        if found is None:
            return None
        seq, fp, payload_json, at_us = found
        if fp != fingerprint:
            raise key_reused(kind, request_id)
        return seq, json.loads(payload_json), at_us

    def _append(self, at_us: int, kind: str, account_id: str | None, payload: dict[str, Any],
                request_id: str | None = None, fingerprint: str | None = None) -> int:
        uow = self._uow
        if self.next_settle_day is None:
            self.next_settle_day = cal.billing_day(at_us)
        return uow.append(Entry(uow.next_seq, at_us, kind, account_id, request_id, fingerprint,
                                payload))

    def _touch(self, acct: AccountState) -> None:
        self._uow.accounts[acct.account_id] = acct

    def execute(self, cmd: Any) -> Any:
        handler = self._handlers.get(type(cmd))
        if handler is None:
            raise NotImplementedError(type(cmd).__name__)
        return _snapshot(handler(self, cmd))

    # ------------------------------------------------------------------ due work (R9)

    def _due(self) -> list[tuple[int, int]]:
        """(instant, kind) of the next event of each kind; ties run settlement first."""
        due = []
        if self.next_settle_day is not None:
            due.append((cal.day_end(self.next_settle_day), 0))
        if self.expiries:
            due.append((self.expiries[0][0], 1))
        if self.suspensions:
            due.append((self.suspensions[0][0], 2))
        return due

    def next_due_us(self) -> int | None:
        due = self._due()
        return min(due)[0] if due else None

    def run_due(self, now: int) -> None:
        """Everything that fell due at or before now, in time order: daily settlements (R17),
        plan expiries (R9) and suspensions (R23)."""
        while (due := self._due()) and (nxt := min(due))[0] <= now:
            if nxt[1] == 0:
                self._settle_one(self.next_settle_day)  # type: ignore[arg-type]
            elif nxt[1] == 1:
                expires_at, _, plan_id, account_id = heapq.heappop(self.expiries)
                self._expire(self.account(account_id), plan_id, expires_at, now)
            else:
                _, account_id, since = heapq.heappop(self.suspensions)
                self._suspend(self.account(account_id), since, now)

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
            self._set_clock(max(due, self.now()))
            self.run_due(self.now())
        self._set_clock(cmd.to_us)
        self._uow.meta[CLOCK_META_KEY] = str(cmd.to_us)
        return self.now()

    # ------------------------------------------------------------------ Consume (R3-R11)

    def consume(self, c: Consume) -> ConsumeOutcome:
        now = self.now()
        acct = self.account(c.account_id)
        day = self._billing_day(now)
        fingerprint = c.fingerprint()
        prior = self._claimed(c.account_id, "consume", c.request_id, fingerprint)
        if prior is not None:  # only a billable request claims a key, so this one is too
            return _consume_replay(c.request_id, *prior)
        if not c.billable:  # R3: acknowledged, nothing charged, no state changed, no key
            if acct.status is AccountStatus.SUSPENDED:
                raise suspended(c.account_id)
            return ConsumeOutcome(c.request_id, False, (), 0, 0, False, day, now,
                                  acct.units_remaining_at(now), 0)
        if acct.status is AccountStatus.SUSPENDED:  # R23
            raise suspended(c.account_id)
        takes, payg_units = take_in_order(acct.live_plans, c.quantity, now)  # R8
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
        if takes and takes[0][0].units_remaining == 0:  # R8 order: any emptied plan is first
            acct.live_plans = [p for p in acct.live_plans if p.units_remaining > 0]
        remaining = acct.units_remaining_at(now)
        seq = uow.append_json(now, "consume", c.account_id, c.request_id, fingerprint,
                              consume_payload_json(c, allocations, payg_units, payg_micros, day,
                                                   remaining))
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
        if acct.cash_micros + acct.voucher_micros + c.amount_micros > m.BALANCE_MICROS_MAX:
            raise FailedPrecondition(
                f"a balance may hold at most {m.BALANCE_MICROS_MAX:,} micro-USD; this top-up "
                "would exceed it", reason="BALANCE_LIMIT", account_id=c.account_id)
        now = self.now()
        cash = c.amount_micros if c.kind is FundsKind.CASH else 0
        paid_v, paid_c = self._money_in(acct, c.amount_micros - cash, cash)
        self._touch(acct)
        self._append(now, "top_up", c.account_id,
                     {"kind": int(c.kind), "amount_micros": c.amount_micros,
                      "paid_outstanding_micros": paid_v + paid_c},
                     c.request_id, c.fingerprint())
        return acct

    @staticmethod
    def _money_in(acct: AccountState, voucher_micros: int, cash_micros: int
                  ) -> tuple[int, int]:
        """R22 (clarified 2026-11-29): any money that comes in (a top-up of either kind, a
        refund) pays what is outstanding first, vouchers then cash (R16); the rest goes to
        the balances. Only "nothing outstanding" ends the overdue period; a suspended account
        stays suspended until Reactivate (R24). Returns (paid from vouchers, from cash)."""
        paid_v, paid_c = split_payment(acct.outstanding_micros, voucher_micros, cash_micros)
        acct.voucher_micros += voucher_micros - paid_v
        acct.cash_micros += cash_micros - paid_c
        acct.outstanding_micros -= paid_v + paid_c
        if acct.outstanding_micros == 0:
            acct.overdue_since = None
            if acct.status is AccountStatus.OVERDUE:
                acct.status = AccountStatus.ACTIVE
        return paid_v, paid_c

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
        self._uow.new_plans[plan.plan_id] = plan
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
        # One object per plan: loading its account may already hold it among the live plans.
        self.account(found[0].account_id)
        return self.plan_index.setdefault(plan_id, found[0])

    # ------------------------------------------------------------------ settlement (R17-R20)

    def settle_day(self, c: SettleDay) -> list[Bill]:
        """R17/R19: settle every unsettled ended day up to D, oldest first; D's bills, once."""
        cal.parse_day(c.billing_day)
        now = self.now()
        if now < cal.day_end(c.billing_day):
            raise FailedPrecondition(
                f"day {c.billing_day} has not ended yet (it ends at the next midnight, "
                "UTC+08:00; R17)", reason="DAY_NOT_ENDED",
                billing_day=c.billing_day)
        while self.next_settle_day is not None and self.next_settle_day <= c.billing_day:
            self._settle_one(self.next_settle_day)
        self.flush()
        return read_bills(self.store.conn, "WHERE day = ?", (c.billing_day,))

    def _settle_one(self, day: str) -> None:
        self.flush()
        started = time.perf_counter()
        now = self.now()
        figures = day_figures(self.store.conn, day)
        for account_id in sorted(figures):
            acct = self.account(account_id)
            bill = make_bill(account_id, day, figures[account_id], acct.voucher_micros,
                             acct.cash_micros, now)
            acct.voucher_micros -= bill.paid_voucher_micros
            acct.cash_micros -= bill.paid_cash_micros
            if bill.outstanding_micros:
                self._add_outstanding(acct, bill.outstanding_micros, now)
            self._touch(acct)
            seq = self._append(now, "bill", account_id, bill.to_payload())
            self._uow.bills.append(bill_row(bill, seq))
        self._append(now, "day_settled", None, {"day": day, "bills": len(figures)})
        self._uow.meta[SETTLED_META_KEY] = day
        self.next_settle_day = cal.next_day(day)
        took = time.perf_counter() - started
        log.info("day settled", extra={"event": "settlement", "day": day, "bills": len(figures),
                                       "duration_ms": round(took * 1_000, 3)})
        if self.on_settled is not None:
            self.on_settled(day, len(figures), took)

    def _add_outstanding(self, acct: AccountState, micros: int, now: int) -> None:
        """R22: overdue from the moment the first unpaid amount arose."""
        acct.outstanding_micros += micros
        if acct.overdue_since is None:
            acct.overdue_since = now
            heapq.heappush(self.suspensions,
                           (now + OVERDUE_SUSPEND_AFTER_US + 1, acct.account_id, now))
        if acct.status is AccountStatus.ACTIVE:
            acct.status = AccountStatus.OVERDUE

    def _suspend(self, acct: AccountState, since: int, now: int) -> None:
        """R23: overdue strictly more than 168 hours: suspend, delete configuration."""
        if (acct.overdue_since != since or acct.outstanding_micros == 0
                or acct.status is AccountStatus.SUSPENDED):
            return
        day = cal.billing_day(now)
        self._record_feature_day(acct, day, 0, False)
        deleted = {"scenario_ids": list(acct.scenario_ids),
                   "custom_policy": acct.custom_policy_enabled}
        acct.scenario_ids, acct.custom_policy_enabled = (), False
        acct.status, acct.suspended_at = AccountStatus.SUSPENDED, now
        self._touch(acct)
        log.warning("account suspended", extra={
            "event": "suspension", "account_id": acct.account_id,
            "outstanding_micros": acct.outstanding_micros})
        self._append(now, "account_suspended", acct.account_id,
                     {"overdue_since_us": since, "outstanding_micros": acct.outstanding_micros,
                      "deleted": deleted})

    # ------------------------------------------------------------------ refunds (R21)

    def refund_plan(self, c: RefundPlan) -> PlanState | Replayed:
        plan = self.plan(c.plan_id)
        acct = self.account(plan.account_id)
        if self._claimed(acct.account_id, "refund", c.request_id, c.fingerprint()):
            return Replayed(self.plan(c.plan_id))
        now = self.now()
        if plan.refunded_at is not None:
            raise FailedPrecondition(f"plan {plan.plan_id} was already refunded",
                                     reason="PLAN_REFUNDED", plan_id=plan.plan_id)
        if now - plan.purchased_at > REFUND_WINDOW_US:
            raise FailedPrecondition(
                f"plan {plan.plan_id} was bought more than 5 days (120 hours) ago; "
                "refunds are only possible within 5 days of purchase (R21)",
                reason="REFUND_WINDOW_PASSED", plan_id=plan.plan_id)
        if plan.units_consumed > 0 or plan.units_forfeited > 0:
            raise FailedPrecondition(
                f"plan {plan.plan_id} has already offset {plan.units_consumed} requests; "
                "a used plan cannot be refunded (R21)", reason="PLAN_USED", plan_id=plan.plan_id)
        plan.refunded_at = now
        acct.live_plans = [p for p in acct.live_plans if p is not plan]
        # R21: the price goes back as it was paid; R22: that money pays what is outstanding.
        paid_v, paid_c = self._money_in(acct, plan.paid_voucher_micros, plan.paid_cash_micros)
        self._uow.plans[plan.plan_id] = plan
        self._touch(acct)
        self._append(now, "refund", acct.account_id,
                     {"plan_id": plan.plan_id, "reason": c.reason,
                      "voucher_micros": plan.paid_voucher_micros,
                      "cash_micros": plan.paid_cash_micros,
                      "paid_outstanding_voucher_micros": paid_v,
                      "paid_outstanding_cash_micros": paid_c}, c.request_id, c.fingerprint())
        return plan

    # ------------------------------------------------------------------ reactivation (R24)

    def reactivate(self, c: Reactivate) -> AccountState | Replayed:
        acct = self.account(c.account_id)
        if self._claimed(c.account_id, "reactivate", c.request_id, c.fingerprint()):
            return Replayed(acct)
        if acct.status is not AccountStatus.SUSPENDED:
            raise FailedPrecondition(f"account {c.account_id!r} is not suspended",
                                     reason="NOT_SUSPENDED", account_id=c.account_id)
        if acct.outstanding_micros > 0:
            raise FailedPrecondition(
                f"account {c.account_id!r} still owes {acct.outstanding_micros} micro-USD; "
                "top up to pay it before reactivating (R24)", reason="OUTSTANDING_BALANCE",
                account_id=c.account_id)
        now = self.now()
        acct.status, acct.suspended_at, acct.overdue_since = AccountStatus.ACTIVE, None, None
        self._touch(acct)
        self._append(now, "reactivate", c.account_id, {}, c.request_id, c.fingerprint())
        return acct

    _handlers: dict[type, Any] = {
        Consume: consume,
        CreateAccount: create_account,
        TopUp: top_up,
        UpdateFeatures: update_features,
        PurchasePlan: purchase_plan,
        AdvanceClock: advance_clock,
        SettleDay: settle_day,
        RefundPlan: refund_plan,
        Reactivate: reactivate,
    }


def _snapshot(result: Any) -> Any:
    """Results leave the writer thread: hand out copies of live state, never the objects the
    writer goes on changing (a reply is converted on the event loop's thread)."""
    if isinstance(result, Replayed):
        return Replayed(_snapshot(result.value))
    if isinstance(result, AccountState):
        return dataclasses.replace(result, live_plans=[])
    if isinstance(result, PlanState):
        return dataclasses.replace(result)
    return result


def consume_payload_json(c: Consume, allocations: tuple[tuple[str, int], ...], payg_units: int,
                         payg_micros: int, day: str, remaining: int) -> str:
    """A consume entry's payload, rendered directly (json.dumps costs more than the rest of
    the hot path). Only the scenario id is caller text, so only it goes through json.dumps."""
    alloc = ",".join(f'["{plan_id}",{n}]' for plan_id, n in allocations)
    text = (f'{{"region":{c.region:d},"type":{c.captcha_type:d},"arch":{c.architecture:d},'
            f'"step":{c.step:d},"qty":{c.quantity},"alloc":[{alloc}],"payg_units":{payg_units},'
            f'"payg_micros":{payg_micros},"day":"{day}","remaining":{remaining}')
    if c.scenario_id:
        text += f',"scenario":{json.dumps(c.scenario_id)}'
    if c.client_timestamp_us is not None:
        text += f',"client_ts_us":{c.client_timestamp_us}'
    return text + "}"


def _consume_replay(request_id: str, seq: int, p: dict[str, Any], at_us: int) -> ConsumeOutcome:
    return ConsumeOutcome(request_id, True, tuple((a[0], a[1]) for a in p["alloc"]),
                          p["payg_units"], p["payg_micros"], True, p["day"], at_us,
                          p["remaining"], seq)


__all__ = ["ConsumeOutcome", "Engine", "Region", "Replayed", "InvalidArgument"]
