"""The administrative commands: accounts and their funds (R16, R22), feature configuration
(R13, R14), plan purchases (R6, R7) and refunds (R21), reactivation (R24).

A mixin of :class:`ledger.engine.Engine`: each handler checks everything first, then changes
state, so a refused command changes nothing; each is idempotent by its request_id (R12).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from . import calendar as cal
from . import model as m
from . import notices as nt
from .errors import AlreadyExists, FailedPrecondition, NotFound
from .model import (
    AccountState,
    AccountStatus,
    CreateAccount,
    FundsKind,
    PlanState,
    PurchasePlan,
    Reactivate,
    RefundPlan,
    TopUp,
    UpdateFeatures,
)
from .money import split_payment

REFUND_WINDOW_US = 120 * cal.US_PER_HOUR  # R21: at most 5 days, inclusive


@dataclass(frozen=True, slots=True)
class Replayed:
    """Wraps an administrative result that a retry got again (R12)."""

    value: Any


def suspended(account_id: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"account {account_id!r} is suspended (overdue for more than 7 days, R23); "
        "pay what is outstanding and reactivate it", reason="ACCOUNT_SUSPENDED",
        account_id=account_id)


class AccountCommands:
    """Handlers of the Accounts service's commands."""

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
        # R8 ties go to the plan bought first: its entry's seq, or on a shared store a
        # number drawn under the account's lock (nodes' seqs are not comparable).
        order = self.store.purchase_order(seq)
        plan = PlanState(
            plan_id=f"plan-{order}", account_id=acct.account_id, spec_id=spec.spec_id,
            units_total=spec.units, units_remaining=spec.units, price_micros=spec.price_micros,
            validity=spec.validity, purchased_at=now,
            expires_at=cal.add_months(now, spec.validity.months), purchase_seq=order,
            paid_voucher_micros=from_voucher, paid_cash_micros=from_cash)
        acct.live_plans.append(plan)
        self.plan_index[plan.plan_id] = plan
        self._uow.new_plans[plan.plan_id] = plan
        acct.live_plans.sort(key=lambda p: p.order_key)
        heapq.heappush(self.expiries, (plan.expires_at, order, plan.plan_id, acct.account_id))
        self._uow.plans[plan.plan_id] = plan
        self._touch(acct)
        payload = {"plan_id": plan.plan_id, "spec_id": spec.spec_id, "units": spec.units,
                   "validity": int(spec.validity), "price_micros": spec.price_micros,
                   "paid_voucher_micros": from_voucher, "paid_cash_micros": from_cash,
                   "expires_at_us": plan.expires_at}
        if order != seq:
            payload["purchase_seq"] = order
        self._append(now, "purchase", acct.account_id, payload, c.request_id, c.fingerprint())
        return plan

    def plan(self, plan_id: str) -> PlanState:
        if self.shared and self.uow is not None:
            # bought or changed earlier in this very group: not in the database yet (a
            # retry that joined its own first attempt's group; found by issue 23's checker)
            mine = self.uow.plans.get(plan_id)
            if mine is not None:
                return mine
        held = None if self.shared else self.plan_index.get(plan_id)
        if held is not None:
            return held
        found = self.store.load_plans("WHERE plan_id = ?", (plan_id,))
        if not found:
            raise NotFound(f"no plan {plan_id!r}", reason="PLAN_NOT_FOUND", plan_id=plan_id)
        # One object per plan: loading its account may already hold it among the live plans.
        acct = self.account(found[0].account_id)
        if self.shared:  # the plan as this group holds it, read under the account's lock
            live = next((p for p in acct.live_plans if p.plan_id == plan_id), None)
            return live or self.store.load_plans("WHERE plan_id = ?", (plan_id,))[0]
        return self.plan_index.setdefault(plan_id, found[0])

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
        seq = self._append(now, "reactivate", c.account_id, {}, c.request_id, c.fingerprint())
        self._uow.add_notice(nt.reactivated(c.account_id, now, seq))
        return acct
