"""R25: rebuild every derived figure from the journal alone.

A pure fold over journal entries, written independently of the engine's incremental updates,
so that ``quota-ledger verify`` compares two paths to the same figures: what the engine wrote
in the derived tables, and what the journal implies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import calendar as cal
from .model import AccountStatus
from .store import blocks


@dataclass
class Derived:
    """Row images keyed like the derived tables' primary keys (see ledger/store.py)."""

    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    usage_daily: dict[tuple[str, str, int], tuple[int, int]] = field(default_factory=dict)
    offsets_daily: dict[tuple[str, str, str], int] = field(default_factory=dict)
    features_daily: dict[tuple[str, str], tuple[int, int, int, int]] = field(default_factory=dict)
    bills: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    settled_through: str | None = None


def rebuild(entries: Iterable[tuple[int, int, str, str | None, dict[str, Any]]]) -> Derived:
    """Fold (seq, at_us, kind, account_id, payload) in journal order into the derived rows."""
    d = Derived()
    for seq, at, kind, account_id, p in entries:
        fold = _FOLDS.get(kind)
        if fold is None:
            raise ValueError(f"journal entry {seq} has an unknown kind {kind!r}")
        fold(d, seq, at, account_id, p)
    return d


def _account_created(d: Derived, seq: int, at: int, a: str, p: dict[str, Any]) -> None:
    d.accounts[a] = {"display_name": p["display_name"], "created_at_us": at,
                     "status": int(AccountStatus.ACTIVE), "cash_micros": 0, "voucher_micros": 0,
                     "outstanding_micros": 0, "overdue_since_us": None, "suspended_at_us": None,
                     "scenario_ids": [], "custom_policy": 0}


def _top_up(d: Derived, seq: int, at: int, a: str, p: dict[str, Any]) -> None:
    acct = d.accounts[a]
    rest = p["amount_micros"] - p["paid_outstanding_micros"]
    acct["cash_micros" if p["kind"] == 1 else "voucher_micros"] += rest
    _paid_outstanding(acct, p["paid_outstanding_micros"])


def _paid_outstanding(acct: dict[str, Any], micros: int) -> None:
    """R22: money in paid this much of what was outstanding; nothing left ends overdue."""
    acct["outstanding_micros"] -= micros
    if acct["outstanding_micros"] == 0:
        acct["overdue_since_us"] = None
        if acct["status"] == AccountStatus.OVERDUE:
            acct["status"] = int(AccountStatus.ACTIVE)


def _feature_day(d: Derived, a: str, at: int, scenarios: int, custom: bool) -> None:
    acct = d.accounts[a]
    key = (a, cal.billing_day(at))
    row = d.features_daily.get(key)
    if row is None:
        start = (len(acct["scenario_ids"]), acct["custom_policy"])
        row = (*start, *start)
    d.features_daily[key] = (row[0], row[1], max(row[2], scenarios), max(row[3], int(custom)))


def _features(d: Derived, seq: int, at: int, a: str, p: dict[str, Any]) -> None:
    _feature_day(d, a, at, len(p["scenario_ids"]), p["custom_policy"])
    d.accounts[a]["scenario_ids"] = list(p["scenario_ids"])
    d.accounts[a]["custom_policy"] = int(p["custom_policy"])


def _purchase(d: Derived, seq: int, at: int, a: str, p: dict[str, Any]) -> None:
    acct = d.accounts[a]
    acct["voucher_micros"] -= p["paid_voucher_micros"]
    acct["cash_micros"] -= p["paid_cash_micros"]
    d.plans[p["plan_id"]] = {
        "account_id": a, "spec_id": p["spec_id"], "units_total": p["units"],
        "units_remaining": p["units"], "units_forfeited": 0, "price_micros": p["price_micros"],
        "validity": p["validity"], "purchased_at_us": at, "expires_at_us": p["expires_at_us"],
        "purchase_seq": p.get("purchase_seq", seq), "paid_voucher_micros": p["paid_voucher_micros"],
        "paid_cash_micros": p["paid_cash_micros"], "refunded_at_us": None}


def _consume(d: Derived, seq: int, at: int, a: str, p: dict[str, Any]) -> None:
    day = p["day"]
    for plan_id, units in p["alloc"]:
        d.plans[plan_id]["units_remaining"] -= units
        key = (a, day, plan_id)
        d.offsets_daily[key] = d.offsets_daily.get(key, 0) + units
    if p["payg_units"]:
        key2 = (a, day, p["region"])
        units0, micros0 = d.usage_daily.get(key2, (0, 0))
        d.usage_daily[key2] = (units0 + p["payg_units"], micros0 + p["payg_micros"])


def _consume_block(d: Derived, seq: int, at: int, a: str | None,
                   block: tuple[str, list[list[Any]]]) -> None:
    """A run of consumes written as one block (ledger/store/blocks.py), item by item."""
    day, items = block
    for item in items:
        _consume(d, seq, at, item[blocks.ACCOUNT], blocks.entry_payload(day, item))


def _plan_expired(d: Derived, seq: int, at: int, a: str, p: dict[str, Any]) -> None:
    plan = d.plans[p["plan_id"]]
    plan["units_remaining"] -= p["units_forfeited"]
    plan["units_forfeited"] += p["units_forfeited"]


def _bill(d: Derived, seq: int, at: int, a: str, p: dict[str, Any]) -> None:
    acct = d.accounts[a]
    acct["voucher_micros"] -= p["paid_voucher_micros"]
    acct["cash_micros"] -= p["paid_cash_micros"]
    if p["outstanding_micros"]:
        acct["outstanding_micros"] += p["outstanding_micros"]
        if acct["overdue_since_us"] is None:
            acct["overdue_since_us"] = at
        if acct["status"] == AccountStatus.ACTIVE:
            acct["status"] = int(AccountStatus.OVERDUE)
    d.bills[(a, p["day"])] = {**p, "issued_at_us": at, "journal_seq": seq}


def _day_settled(d: Derived, seq: int, at: int, a: str | None, p: dict[str, Any]) -> None:
    d.settled_through = p["day"]


def _suspended(d: Derived, seq: int, at: int, a: str, p: dict[str, Any]) -> None:
    _feature_day(d, a, at, 0, False)
    acct = d.accounts[a]
    acct.update(scenario_ids=[], custom_policy=0, status=int(AccountStatus.SUSPENDED),
                suspended_at_us=at)


def _refund(d: Derived, seq: int, at: int, a: str, p: dict[str, Any]) -> None:
    """R21 and R22 (clarified 2026-11-29). A refund written before that change has no
    paid_outstanding_* fields: it paid nothing outstanding, and keeps that meaning."""
    d.plans[p["plan_id"]]["refunded_at_us"] = at
    acct = d.accounts[a]
    paid_v = p.get("paid_outstanding_voucher_micros", 0)
    paid_c = p.get("paid_outstanding_cash_micros", 0)
    acct["voucher_micros"] += p["voucher_micros"] - paid_v
    acct["cash_micros"] += p["cash_micros"] - paid_c
    if paid_v or paid_c:
        _paid_outstanding(acct, paid_v + paid_c)


def _reactivate(d: Derived, seq: int, at: int, a: str, p: dict[str, Any]) -> None:
    d.accounts[a].update(status=int(AccountStatus.ACTIVE), suspended_at_us=None,
                         overdue_since_us=None)


_FOLDS = {
    "account_created": _account_created, "top_up": _top_up, "features": _features,
    "purchase": _purchase, "consume": _consume, blocks.BLOCK_KIND: _consume_block,
    "plan_expired": _plan_expired, "bill": _bill,
    "day_settled": _day_settled, "account_suspended": _suspended, "refund": _refund,
    "reactivate": _reactivate,
}
