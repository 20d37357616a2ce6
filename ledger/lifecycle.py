"""The ledger's due work and daily settlement: plan expiries (R9), settlement (R17-R20),
overdue (R22) and suspension (R23).

A mixin of :class:`ledger.engine.Engine`: it runs on the writer thread, inside the engine's
open group, with the engine's state and helpers (``account``, ``_append``, ``_touch``).
"""

from __future__ import annotations

import heapq
import logging
import time
from typing import Any

from . import calendar as cal
from . import notices as nt
from . import runway as rw
from .errors import FailedPrecondition
from .model import AccountState, AccountStatus, AdvanceClock, SettleDay
from .settlement import Bill, make_bill
from .store import (
    accounts_with_live_plans,
    bill_row,
    day_figures,
    existing_notices,
    read_bills,
    read_runway_window,
)

log = logging.getLogger("quota_ledger.engine")

CLOCK_META_KEY = "clock_us"
SETTLED_META_KEY = "settled_through"
OVERDUE_SUSPEND_AFTER_US = nt.OVERDUE_SUSPEND_AFTER_US  # R23: strictly more than 7 days


class Lifecycle:
    """Expiries, settlements and suspensions, each at its own instant, in time order."""

    expiries: list[tuple[int, int, str, str]]
    suspensions: list[tuple[int, str, int]]
    warnings: list[tuple[int, str, int]]  # (instant, account, overdue since): R23 ahead
    notice_limits: nt.Thresholds = nt.Thresholds()
    next_settle_day: str | None
    on_settled: Any = None  # callback(day, bills, seconds), e.g. metrics

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
        if self.warnings:
            due.append((self.warnings[0][0], 3))
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
            elif nxt[1] == 2:
                _, account_id, since = heapq.heappop(self.suspensions)
                self._suspend(self.account(account_id), since, now)
            else:
                at, account_id, since = heapq.heappop(self.warnings)
                self._warn(self.account(account_id), since, at)

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
        self._hold(sorted(figures))
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
            self._uow.add_notice(nt.bill_issued(account_id, now, bill.to_payload()))
        self._forecast(now)
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
            heapq.heappush(self.suspensions, (nt.suspends_at(now), acct.account_id, now))
            for at in nt.warning_instants(now):
                heapq.heappush(self.warnings, (at, acct.account_id, now))
            self._uow.add_notice(nt.overdue(acct.account_id, now, acct.outstanding_micros))
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
        self._uow.add_notice(nt.suspended(acct.account_id, now, since, acct.outstanding_micros))

    # ------------------------------------------------------------------ notices (issue 22)

    def _warn(self, acct: AccountState, since: int, at: int) -> None:
        """R23 is coming: the 72 h or 24 h warning due at ``at``, if the account still owes
        what it owed since ``since`` (a payment or a suspension makes it moot)."""
        if (acct.overdue_since != since or acct.outstanding_micros == 0
                or acct.status is AccountStatus.SUSPENDED):
            return
        for n in nt.suspension_warnings(acct.account_id, since, acct.outstanding_micros, at):
            if n.at_us == at:
                self._uow.add_notice(n)

    def _forecast(self, now: int) -> None:
        """Once per settled day, in settlement's transaction: ``plan_low`` and
        ``forfeit_ahead`` from each account's runway (docs/runway.md). The ids are per plan,
        so a warning already given is kept once (the outbox ignores it)."""
        conn = self.store.conn
        for account_id in accounts_with_live_plans(conn, now):
            acct = self.account(account_id)
            plans = [p for p in acct.live_plans if p.refunded_at is None
                     and p.units_remaining > 0 and p.expires_at > now]
            window = read_runway_window(conn, account_id, acct.created_at, now,
                                        rw.RUNWAY_WINDOW_DAYS_DEFAULT)
            if not plans or window is None:
                continue
            runway = rw.project(now, acct.status, window, plans)
            for n in nt.forecast(account_id, runway, {p.plan_id: p.units_total for p in plans},
                                 self.notice_limits):
                self._uow.add_notice(n)

    def _pending_warnings(self) -> list[tuple[int, str, int]]:
        """The R23 warnings still to give, from the overdue accounts (``suspensions``):
        those ahead, and those whose instant passed without their notice being written (a
        restart in between), found with one read of the outbox, not written again."""
        now = self.clock.now_us()
        ahead, past = [], {}
        for _, account_id, since in self.suspensions:
            ahead += [(at, account_id, since) for at in nt.warning_instants(since) if at > now]
            for n in nt.suspension_warnings(account_id, since, 0, now):
                past[n.notice_id] = (n.at_us, account_id, since)
        have = existing_notices(self.store.conn, list(past)) if past else set()
        return ahead + [w for nid, w in past.items() if nid not in have]
