"""The rows a group writes in its SQLite transaction: its journal rows and the derived rows.

A consume group spread over many accounts updates, for each account it touched, one plan
and that plan's offsets row for the day; with the journal's block these are most of a
group's statements (issue 19). Schema v6 gives both integer keys: a plan's rowid is its
purchase_seq, an offsets row's rowid its plan's purchase_seq * OFFSET_DAY_SLOTS + its day's
number since 1970-01-01. ``python -m tests.bench_derived_rows`` (865 rows in one
transaction; docs/performance.md, load average 0.63 and 0.86): a plan found by plan_id
1.53 µs a row, by rowid and plan_id 1.31-1.33, by rowid 1.05-1.10; an offsets row upserted
by its text key 2.09-2.10, upserted by rowid 1.77-2.44 (the upsert still probes the unique
text key), updated by rowid 0.99-1.30.

So a row is written by its rowid alone once this process has seen that rowid hold that
row: a plan or offsets row it inserted, or one written once with the text key checked too
(a plan: ``rowid = ? AND plan_id = ?``; an offsets row: the upsert's ``WHERE`` on the three
text columns). What a group confirms counts only once it commits. Were a plan's rowid ever
not its purchase_seq, its group writes it again by plan_id (the values are absolute); were
an offsets row's rowid another row's, the group fails (Unavailable) rather than count units
in the wrong row.
"""

from __future__ import annotations

import logging
import sqlite3
from datetime import date

from .journal import UnitOfWork
from .schema import OFFSET_DAY_SLOTS

log = logging.getLogger(__name__)

PLAN_COLUMNS = ("plan_id, account_id, spec_id, units_total, units_remaining, units_forfeited,"
                " price_micros, validity, purchased_at_us, expires_at_us, purchase_seq,"
                " paid_voucher_micros, paid_cash_micros, refunded_at_us")
KEYED_ROWIDS_MAX = 1_000_000  # confirmed rowids kept per table; past it, confirmed afresh
_EPOCH_DAY = date(1970, 1, 1)

_PLAN_BY_ROWID = "UPDATE plans SET units_remaining = ? WHERE rowid = ?"
_PLAN_CHECKED = "UPDATE plans SET units_remaining = ? WHERE rowid = ? AND plan_id = ?"
_PLAN_FULL = ("UPDATE plans SET units_remaining = ?, units_forfeited = ?, refunded_at_us = ?"
              " WHERE rowid = ? AND plan_id = ?")
_PLAN_BY_ID = ("UPDATE plans SET units_remaining = ?, units_forfeited = ?, refunded_at_us = ?"
               " WHERE plan_id = ?")
_OFFSETS_BY_ROWID = "UPDATE offsets_daily SET units = units + ? WHERE rowid = ?"
_OFFSETS_CHECKED = (
    "INSERT INTO offsets_daily (rowid, account_id, day, plan_id, units) VALUES (?,?,?,?,?)"
    " ON CONFLICT DO UPDATE SET units = units + excluded.units"
    " WHERE account_id = excluded.account_id AND day = excluded.day"
    " AND plan_id = excluded.plan_id")


def day_number(day: str) -> int:
    """A billing day's number since 1970-01-01 (the low part of an offsets row's rowid)."""
    return (date.fromisoformat(day) - _EPOCH_DAY).days


class GroupRows:
    """Writes a group's rows on the writer's connection; remembers the rowids it confirmed."""

    def __init__(self) -> None:
        self.plans_keyed: set[int] = set()
        self.offsets_keyed: set[int] = set()
        self._pending_plans: list[int] = []
        self._pending_offsets: list[int] = []

    def committed(self) -> None:
        for keyed, pending in ((self.plans_keyed, self._pending_plans),
                               (self.offsets_keyed, self._pending_offsets)):
            if len(keyed) + len(pending) > KEYED_ROWIDS_MAX:
                keyed.clear()
            keyed.update(pending)
            pending.clear()

    def rolled_back(self) -> None:
        self._pending_plans.clear()
        self._pending_offsets.clear()

    def write(self, c: sqlite3.Connection, uow: UnitOfWork) -> None:
        c.executemany("INSERT INTO journal VALUES (?,?,?,?,?,?,?,?)", uow.rows)
        if uow.accounts:
            c.executemany("INSERT OR REPLACE INTO accounts VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                          uow.account_rows())
        if uow.new_plans:  # a plan's rowid is its purchase_seq (schema v6)
            rows = [(r[10], *r) for r in uow.new_plan_rows()]
            c.executemany(f"INSERT INTO plans (rowid, {PLAN_COLUMNS}) VALUES"
                          " (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            self._pending_plans += [r[0] for r in rows]
        if uow.plans:
            self._update_plans(c, uow)
        if uow.usage:
            c.executemany(
                "INSERT INTO usage_daily VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET"
                " payg_units = payg_units + excluded.payg_units,"
                " payg_micros = payg_micros + excluded.payg_micros",
                [(*k, v[0], v[1]) for k, v in uow.usage.items()])
        if uow.offsets:
            self._write_offsets(c, uow)
        if uow.features:
            c.executemany("INSERT OR REPLACE INTO features_daily VALUES (?,?,?,?,?,?)",
                          [(*k, *v) for k, v in uow.features.items()])
        if uow.bills:
            c.executemany("INSERT INTO bills VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", uow.bills)
        if uow.meta:
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)", list(uow.meta.items()))
        if uow.notices:
            c.executemany("INSERT OR IGNORE INTO notices VALUES (?,?,?,?,?)", uow.notices)

    def _update_plans(self, c: sqlite3.Connection, uow: UnitOfWork) -> None:
        """Only three columns of a plan ever change; an UPDATE leaves the indexes alone. A
        plan never forfeited nor refunded (nearly every one a consume changes) has two of
        them at their first values for good: its UPDATE sets units_remaining alone."""
        new, keyed = uow.new_plans, self.plans_keyed
        known, checked, full = [], [], []
        for plan_id, p in uow.plans.items():
            if plan_id in new:
                continue
            seq = p.purchase_seq
            if p.units_forfeited or p.refunded_at is not None:
                full.append((p.units_remaining, p.units_forfeited, p.refunded_at, seq, plan_id))
            elif seq in keyed:
                known.append((p.units_remaining, seq))
            else:
                checked.append((p.units_remaining, seq, plan_id))
        n = len(known) + len(checked) + len(full)
        if not n:
            return
        got = c.executemany(_PLAN_BY_ROWID, known).rowcount if known else 0
        if checked:
            got += c.executemany(_PLAN_CHECKED, checked).rowcount
        if full:
            got += c.executemany(_PLAN_FULL, full).rowcount
        if got == n:
            self._pending_plans += [r[1] for r in checked]
            return
        log.warning("a plan's rowid is not its purchase_seq; the group's plans are written "
                    "by plan_id")
        if c.executemany(_PLAN_BY_ID, uow.changed_plan_rows()).rowcount != n:
            raise sqlite3.IntegrityError("a plan to update is not in the plans table")

    def _write_offsets(self, c: sqlite3.Connection, uow: UnitOfWork) -> None:
        plans, keyed, days = uow.plans, self.offsets_keyed, {}
        known, checked = [], []
        for (account_id, day, plan_id), units in uow.offsets.items():
            d = days.get(day)
            if d is None:
                d = days[day] = day_number(day)
            plan = plans.get(plan_id)
            if plan is None:
                raise sqlite3.IntegrityError(f"offsets of plan {plan_id}, which the group did "
                                             "not change")
            rowid = plan.purchase_seq * OFFSET_DAY_SLOTS + d
            if rowid in keyed:
                known.append((units, rowid))
            else:
                checked.append((rowid, account_id, day, plan_id, units))
        if known and c.executemany(_OFFSETS_BY_ROWID, known).rowcount != len(known):
            raise sqlite3.IntegrityError("an offsets row this ledger wrote is gone")
        if checked:
            if c.executemany(_OFFSETS_CHECKED, checked).rowcount != len(checked):
                raise sqlite3.IntegrityError("an offsets row's rowid holds another plan's or "
                                             "day's row")
            self._pending_offsets += [r[0] for r in checked]
