"""Notices (issue 22): facts a customer should hear about before they bill, forfeit or
suspend. Pure: ids, payloads and the forecast rules; the outbox and delivery live elsewhere.

Every notice has a stable id built from the fact it reports, never from when it was
noticed, so that settling a day again (R19), a restart or a second node can only produce
the same id again, which the outbox keeps once:

=====================  ==========================================  =====================
kind                   fact                                        id
=====================  ==========================================  =====================
``bill_issued``        the bill of day D (R18)                     account/D
``overdue``            an unpaid amount from instant S (R22)       account/S
``suspension_ahead``   R23 suspends at S + 168 h: 72 h, 24 h ahead  account/S/72h or 24h
``suspended``          suspended at instant T (R23)                account/T
``reactivated``        reactivated by journal entry N (R24)        account/N
``plan_low``           plan P's projected use-up within D days,    account/P
                       or its units below P% of the plan
``forfeit_ahead``      plan P expires within D days with a         account/P
                       projected forfeit (R9)
=====================  ==========================================  =====================

A plan gets at most one ``plan_low`` and one ``forfeit_ahead``: the warning is the point,
not a daily repetition of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .calendar import US_PER_DAY, US_PER_HOUR
from .runway import Runway

KINDS = ("plan_low", "forfeit_ahead", "bill_issued", "overdue", "suspension_ahead",
         "suspended", "reactivated")
SUSPENSION_WARNINGS_H = (72, 24)  # R23: hours before suspension a warning is due
OVERDUE_SUSPEND_AFTER_US = 168 * US_PER_HOUR  # R23: suspended once overdue strictly longer

# Forecast thresholds: defaults, and the ranges configuration may set them in.
PLAN_LOW_DAYS_DEFAULT = 7
PLAN_LOW_PERCENT_DEFAULT = 10
FORFEIT_AHEAD_DAYS_DEFAULT = 7
THRESHOLD_DAYS_MAX = 90
THRESHOLD_PERCENT_MAX = 99


@dataclass(frozen=True, slots=True)
class Thresholds:
    plan_low_days: int = PLAN_LOW_DAYS_DEFAULT
    plan_low_percent: int = PLAN_LOW_PERCENT_DEFAULT
    forfeit_ahead_days: int = FORFEIT_AHEAD_DAYS_DEFAULT

    def problems(self) -> list[str]:
        """What is out of range, in words (empty when all is well)."""
        out = []
        for name in ("plan_low_days", "forfeit_ahead_days"):
            if not 1 <= getattr(self, name) <= THRESHOLD_DAYS_MAX:
                out.append(f"{name} must be 1..{THRESHOLD_DAYS_MAX}; got {getattr(self, name)}")
        if not 0 <= self.plan_low_percent <= THRESHOLD_PERCENT_MAX:
            out.append(f"plan_low_percent must be 0..{THRESHOLD_PERCENT_MAX}; got "
                       f"{self.plan_low_percent}")
        return out


@dataclass(frozen=True, slots=True)
class Notice:
    notice_id: str
    account_id: str
    kind: str
    at_us: int  # the ledger's instant of the fact's entry (R2)
    data: dict  # the kind's own fields: integers and strings only

    @property
    def payload(self) -> dict:
        return {"id": self.notice_id, "kind": self.kind, "account_id": self.account_id,
                "at_us": self.at_us, "data": self.data}


def notice(kind: str, account_id: str, at_us: int, fact: tuple, data: dict) -> Notice:
    assert kind in KINDS, kind
    return Notice("/".join((kind, account_id, *map(str, fact))), account_id, kind, at_us, data)


def suspends_at(overdue_since: int) -> int:
    """R23: the first instant overdue strictly more than 168 hours."""
    return overdue_since + OVERDUE_SUSPEND_AFTER_US + 1


def warning_instants(overdue_since: int) -> list[int]:
    """When R23's warnings fall due: 72 h, then 24 h, before the suspension."""
    return [suspends_at(overdue_since) - h * US_PER_HOUR for h in SUSPENSION_WARNINGS_H]


def suspension_warnings(account_id: str, overdue_since: int, outstanding_micros: int,
                        now: int) -> list[Notice]:
    """R23 suspends after strictly more than 168 h overdue; each warning whose instant has
    come (72 h or 24 h before) is due, stamped at its own instant."""
    suspend_at = suspends_at(overdue_since)
    out = []
    for hours, at in zip(SUSPENSION_WARNINGS_H, warning_instants(overdue_since), strict=True):
        if at <= now:
            out.append(notice("suspension_ahead", account_id, at, (overdue_since, f"{hours}h"), {
                "overdue_since_us": overdue_since, "suspends_at_us": suspend_at,
                "hours_ahead": hours, "outstanding_micros": outstanding_micros}))
    return out


def forecast(account_id: str, runway: Runway, units_total: dict[str, int],
             limits: Thresholds) -> list[Notice]:
    """``plan_low`` and ``forfeit_ahead`` from one runway (evaluated once per settled day)."""
    if not runway.estimated:
        return []
    now, out = runway.now, []
    for p in runway.plans:
        total = units_total.get(p.plan_id, p.units_remaining)
        soon = p.used_up_at is not None and p.used_up_at - now <= limits.plan_low_days * US_PER_DAY
        low = p.units_remaining * 100 < total * limits.plan_low_percent
        if soon or low:
            out.append(notice("plan_low", account_id, now, (p.plan_id,), {
                "plan_id": p.plan_id, "units_remaining": p.units_remaining,
                "units_total": total, "used_up_at_us": p.used_up_at}))
        if p.forfeit_units and p.expires_at - now <= limits.forfeit_ahead_days * US_PER_DAY:
            out.append(notice("forfeit_ahead", account_id, now, (p.plan_id,), {
                "plan_id": p.plan_id, "expires_at_us": p.expires_at,
                "forfeit_units": p.forfeit_units, "units_remaining": p.units_remaining}))
    return out


# -- event notices: built where the entry that causes them is appended ------------------------
def bill_issued(account_id: str, at_us: int, bill: dict) -> Notice:
    """R18: the day's bill, with what vouchers and cash paid and what is left owed."""
    return notice("bill_issued", account_id, at_us, (bill["day"],), {
        k: bill[k] for k in ("day", "bill_date", "total_micros", "amount_due_micros",
                             "paid_voucher_micros", "paid_cash_micros", "outstanding_micros")})


def overdue(account_id: str, since_us: int, outstanding_micros: int) -> Notice:
    """R22: an amount went unpaid; R23 suspends 168 h later unless it is paid."""
    return notice("overdue", account_id, since_us, (since_us,), {
        "overdue_since_us": since_us, "outstanding_micros": outstanding_micros,
        "suspends_at_us": suspends_at(since_us)})


def suspended(account_id: str, at_us: int, overdue_since_us: int, outstanding_micros: int
              ) -> Notice:
    return notice("suspended", account_id, at_us, (at_us,), {
        "overdue_since_us": overdue_since_us, "outstanding_micros": outstanding_micros})


def reactivated(account_id: str, at_us: int, journal_seq: int) -> Notice:
    return notice("reactivated", account_id, at_us, (journal_seq,), {"journal_seq": journal_seq})
