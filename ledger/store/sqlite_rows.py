"""The rows a group writes in its SQLite transaction: its journal rows and the derived rows.

A consume group spread over many accounts updates, for each account it touched, one plan
and that plan's offsets for the day; with the journal's block these are most of a group's
statements (issue 19).

- Schema v6: a plan's rowid is its purchase_seq. A plan is written by its rowid alone once
  this process has seen that rowid hold it (inserted it, or written it once with
  ``rowid = ? AND plan_id = ?``), in a group that committed. Were a plan's rowid ever not its
  purchase_seq, its group writes it again by plan_id (the values are absolute).
  ``python -m tests.bench_derived_rows``: a plan found by plan_id 1.53 µs a row, by rowid
  and plan_id 1.31-1.33, by rowid 1.05-1.10 (docs/performance.md).
- Schema v7: a plan's newest day of offsets is in its own row (``offsets_day``,
  ``offsets_units``); older days are rows of ``offsets_past``; ``offsets_daily`` is a view
  of both. A plan whose row this process knows to hold the group's day takes its units and
  the day's offsets in one UPDATE, the day checked in its ``WHERE``: one statement per plan,
  not two (measured in process, 865 plans a transaction: 1.35 µs a plan against 2.05 for
  the two statements by rowid). Any other plan first moves its older day to offsets_past,
  then sets the new day. Were a row's day ever not the one this process wrote, the group
  fails (Unavailable) rather than count units on the wrong day, and the next group confirms
  every day afresh.
"""

from __future__ import annotations

import logging
import sqlite3

from .journal import UnitOfWork

log = logging.getLogger(__name__)

PLAN_COLUMNS = ("plan_id, account_id, spec_id, units_total, units_remaining, units_forfeited,"
                " price_micros, validity, purchased_at_us, expires_at_us, purchase_seq,"
                " paid_voucher_micros, paid_cash_micros, refunded_at_us")
KEYED_ROWIDS_MAX = 1_000_000  # confirmed rowids kept per table; past it, confirmed afresh

_PLAN_BY_ROWID = "UPDATE plans SET units_remaining = ? WHERE rowid = ?"
_PLAN_CHECKED = "UPDATE plans SET units_remaining = ? WHERE rowid = ? AND plan_id = ?"
_PLAN_FULL = ("UPDATE plans SET units_remaining = ?, units_forfeited = ?, refunded_at_us = ?"
              " WHERE rowid = ? AND plan_id = ?")
_PLAN_BY_ID = ("UPDATE plans SET units_remaining = ?, units_forfeited = ?, refunded_at_us = ?"
               " WHERE plan_id = ?")
# Schema v7: a plan's newest day of offsets is in its own row. The common case, a plan this
# process knows to hold the group's day already: its units and its day's offsets in one
# UPDATE by rowid, the day checked.
_PLAN_AND_DAY = ("UPDATE plans SET units_remaining = ?, offsets_units = offsets_units + ?"
                 " WHERE rowid = ? AND offsets_day IS ?")
# Otherwise (the plan's first offsets of a day, or a day this process has not seen it
# hold): its older day, if any, moves to offsets_past; then the new day is set or added to.
_DAY_TO_PAST = ("INSERT INTO offsets_past (account_id, day, plan_id, units)"
                " SELECT account_id, offsets_day, plan_id, offsets_units FROM plans"
                " WHERE plan_id = ?1 AND offsets_units > 0 AND offsets_day IS NOT ?2"
                " ON CONFLICT DO UPDATE SET units = units + excluded.units")
_DAY_SET = ("UPDATE plans SET offsets_units = CASE WHEN offsets_day IS ?2 THEN offsets_units + ?3"
            " ELSE ?3 END, offsets_day = ?2 WHERE plan_id = ?1")


class GroupRows:
    """Writes a group's rows on the writer's connection; remembers the plans' rowids and
    offsets days it confirmed (only once their group commits)."""

    def __init__(self) -> None:
        self.plans_keyed: set[int] = set()
        self.plan_days: dict[int, str] = {}  # a plan's rowid -> the day its row holds
        self._pending_plans: list[int] = []
        self._pending_days: list[tuple[int, str]] = []

    def committed(self) -> None:
        keyed, days = self.plans_keyed, self.plan_days
        if len(keyed) + len(self._pending_plans) > KEYED_ROWIDS_MAX:
            keyed.clear()
        if len(days) + len(self._pending_days) > KEYED_ROWIDS_MAX:
            days.clear()
        keyed.update(self._pending_plans)
        days.update(self._pending_days)
        self._pending_plans.clear()
        self._pending_days.clear()

    def rolled_back(self) -> None:
        self._pending_plans.clear()
        self._pending_days.clear()

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
        if uow.plans or uow.offsets:  # offsets of no changed plan fail the group there
            self._update_plans(c, uow)
        if uow.usage:
            c.executemany(
                "INSERT INTO usage_daily VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET"
                " payg_units = payg_units + excluded.payg_units,"
                " payg_micros = payg_micros + excluded.payg_micros",
                [(*k, v[0], v[1]) for k, v in uow.usage.items()])
        if uow.features:
            c.executemany("INSERT OR REPLACE INTO features_daily VALUES (?,?,?,?,?,?)",
                          [(*k, *v) for k, v in uow.features.items()])
        if uow.bills:
            c.executemany("INSERT INTO bills VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", uow.bills)
        if uow.meta:
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)", list(uow.meta.items()))
        if uow.notices:
            c.executemany("INSERT OR IGNORE INTO notices VALUES (?,?,?,?,?)", uow.notices)

    def _update_plans(self, c: sqlite3.Connection, uow: UnitOfWork) -> None:  # noqa: C901
        """Only three columns of a plan ever change, and its day's offsets; an UPDATE of
        them leaves the indexes alone. A plan never forfeited nor refunded (nearly every one
        a consume changes) has two of them at their first values for good: when its row
        already holds the group's day, its UPDATE sets units_remaining and adds the day's
        offsets, one statement."""
        new, keyed, days = uow.new_plans, self.plans_keyed, self.plan_days
        if not new and len(uow.offsets) == len(uow.plans) and self._both_at_once(c, uow):
            return
        offsets: dict[str, list[tuple[str, int]]] = {}
        for (_, day, plan_id), units in uow.offsets.items():
            offsets.setdefault(plan_id, []).append((day, units))
        both, known, checked, full, dated = [], [], [], [], []
        for plan_id, p in uow.plans.items():
            seq = p.purchase_seq
            o = offsets.pop(plan_id, None)
            if o is not None:
                if (len(o) == 1 and seq in keyed and days.get(seq) == o[0][0]
                        and not p.units_forfeited and p.refunded_at is None
                        and plan_id not in new):
                    both.append((p.units_remaining, o[0][1], seq, o[0][0]))
                    continue
                dated.append((plan_id, seq, sorted(o)))
            if plan_id in new:
                continue
            if p.units_forfeited or p.refunded_at is not None:
                full.append((p.units_remaining, p.units_forfeited, p.refunded_at, seq, plan_id))
            elif seq in keyed:
                known.append((p.units_remaining, seq))
            else:
                checked.append((p.units_remaining, seq, plan_id))
        if offsets:
            raise sqlite3.IntegrityError(f"offsets of plan {next(iter(offsets))}, which the "
                                         "group did not change")
        if both:
            self._write_both(c, both)
        self._write_plans(c, uow, known, checked, full)
        for plan_id, seq, o in dated:  # a day over a group spanning midnight: in day order
            for day, units in o:
                c.execute(_DAY_TO_PAST, (plan_id, day))
                if c.execute(_DAY_SET, (plan_id, day, units)).rowcount != 1:
                    raise sqlite3.IntegrityError(f"plan {plan_id} is not in the plans table")
            self._pending_days.append((seq, o[-1][0]))

    def _both_at_once(self, c: sqlite3.Connection, uow: UnitOfWork) -> bool:
        """The common consume group (issue 19): each changed plan took offsets on one day,
        the day its row holds, and was never forfeited nor refunded; then every plan is one
        row of ``_PLAN_AND_DAY``, built straight from the offsets (no regrouping by plan).
        False, having written nothing, when any plan is otherwise (the general path)."""
        plans, keyed, days = uow.plans, self.plans_keyed, self.plan_days
        both = []
        for (_, day, plan_id), units in uow.offsets.items():
            p = plans.get(plan_id)
            if p is None:
                return False
            seq = p.purchase_seq
            if (seq not in keyed or days.get(seq) != day or p.units_forfeited
                    or p.refunded_at is not None):
                return False
            both.append((p.units_remaining, units, seq, day))
        # As many offsets as changed plans, each naming a changed plan: one each, unless a
        # plan took offsets on two days (then another took none: the general path).
        if len({row[2] for row in both}) != len(both):
            return False
        self._write_both(c, both)
        return True

    def _write_both(self, c: sqlite3.Connection, both: list[tuple]) -> None:
        if c.executemany(_PLAN_AND_DAY, both).rowcount != len(both):
            self.plan_days.clear()  # the next group confirms every day afresh
            raise sqlite3.IntegrityError("a plan's row does not hold the offsets day this "
                                         "ledger wrote in it")

    def _write_plans(self, c: sqlite3.Connection, uow: UnitOfWork, known: list[tuple],
                     checked: list[tuple], full: list[tuple]) -> None:
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
        rows = uow.changed_plan_rows()
        if c.executemany(_PLAN_BY_ID, rows).rowcount != len(rows):
            raise sqlite3.IntegrityError("a plan to update is not in the plans table")
