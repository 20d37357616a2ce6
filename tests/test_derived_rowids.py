"""Derived rows found by integer keys (SQLite schema v6, issue 19), a plan's newest day of
offsets in its own row (schema v7), and the consume group's shortcut for an account's
remaining units.

A plan's rowid is its purchase_seq; the consume group updates it by rowid. Since v7 a plan's
row also holds its newest day of offsets, older days are rows of offsets_past, and
offsets_daily is a view of both. These tests hold the invariants on new rows and on
migrated ones (a plan at its rowid; each plan's day in exactly one place, the newest in its
row), across midnight, and show what happens when they do not hold: a plan is still updated
(by plan_id), and a plan whose row holds another day than the one the writer wrote fails its
group rather than count units on the wrong day.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import model as m
from ledger.errors import Unavailable
from ledger.store import Store
from ledger.store.schema import MIGRATIONS, _statements
from ledger.verify import verify
from ledger.writer import Batch, unwrap

from .test_journal_blocks import FIXTURES, T0, Ledger, consume

DAY_US = 86_400_000_000


def assert_keyed(db: Path) -> None:
    """Every plan sits at the rowid the consume group looks for; each plan's days of offsets
    are each in one place, the newest in the plan's own row."""
    conn = sqlite3.connect(db)
    try:
        plans = conn.execute("SELECT rowid, purchase_seq FROM plans").fetchall()
        assert plans and all(r == s for r, s in plans), plans
        past = conn.execute("SELECT o.plan_id, o.day, p.offsets_day FROM offsets_past o"
                            " LEFT JOIN plans p USING (plan_id)").fetchall()
        for plan_id, day, newest in past:
            assert newest is not None and day < newest, (plan_id, day, newest)
        keys = conn.execute("SELECT account_id, day, plan_id FROM offsets_daily").fetchall()
        assert keys, "the test must write offsets"
        assert len(keys) == len(set(keys)), "a plan's day in two places"
        empty = conn.execute("SELECT count(*) FROM plans WHERE offsets_day IS NOT NULL"
                             " AND offsets_units <= 0").fetchone()[0]
        assert empty == 0
    finally:
        conn.close()


def offsets_units(db: Path) -> dict[tuple[str, str, str], int]:
    conn = sqlite3.connect(db)
    try:
        return {(a, d, p): u for a, d, p, u in conn.execute("SELECT * FROM offsets_daily")}
    finally:
        conn.close()


def plan_of(db: Path, account_id: str) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT plan_id FROM plans WHERE account_id = ?", (account_id,)
                            ).fetchone()[0]
    finally:
        conn.close()


def two_plans(led: Ledger) -> None:
    for a in ("acme", "beta"):
        led.call(m.CreateAccount(a))
        led.call(m.TopUp(a, "t", m.FundsKind.CASH, 200_000_000))
    led.call(m.PurchasePlan("acme", "p1", "month-100k"))
    led.call(m.PurchasePlan("beta", "p1", "month-100k"))


def test_new_plans_and_offsets_rows_sit_at_their_integer_keys(tmp_path):
    led = Ledger(tmp_path / "l.db")
    try:
        two_plans(led)
        led.call(m.PurchasePlan("acme", "p2", "month-100k"))  # a second plan, same expiry
        outs = led.writer.call(Batch([consume(a, f"r{i}", 3) for i in range(20)
                                      for a in ("acme", "beta")]))
        assert all(not isinstance(o, Exception) for o in outs)
        led.call(consume("acme", "single", 2))
    finally:
        led.close()
    assert_keyed(tmp_path / "l.db")
    units = offsets_units(tmp_path / "l.db")
    assert sum(u for (a, _, _), u in units.items() if a == "acme") == 62
    assert sum(u for (a, _, _), u in units.items() if a == "beta") == 60
    assert verify(str(tmp_path / "l.db")).ok


def test_migration_v6_keys_old_rows_and_keeps_their_units(tmp_path):
    """The committed v2 fixture, migrated to v7 in place: its plan takes its purchase_seq as
    rowid and its newest day of offsets, units unchanged; it verifies."""
    db = tmp_path / "ledger.db"
    shutil.copy(FIXTURES / "ledger-v2.db", db)
    before = offsets_units(db)
    assert before
    Store(db).close()
    assert offsets_units(db) == before
    assert_keyed(db)
    assert verify(str(db)).ok


def test_migration_v7_moves_each_plans_newest_day_into_its_row(tmp_path):
    """A schema-v6 database whose plans have offsets on one, two or three days: after the
    migration each plan's newest day is in its row, the older ones in offsets_past, and
    offsets_daily (now a view) reads exactly the rows it had."""
    from .bench_derived_rows import DAY, build

    db = tmp_path / "ledger.db"
    conn, seqs = build(str(db))  # v6: 1,000 plans, each with one offsets row on DAY
    conn.executemany("INSERT INTO offsets_daily (account_id, day, plan_id, units)"
                     " VALUES (?, ?, ?, ?)",
                     [(f"acct-{i:05d}", day, f"plan-{seqs[i]}", 10 + i)
                      for i in range(0, 30, 3) for day in ("2026-12-01", "2026-12-09")]
                     + [(f"acct-{i:05d}", "2026-11-30", f"plan-{seqs[i]}", 5)
                        for i in range(1, 30, 3)])
    conn.execute("PRAGMA user_version = 6")
    before = dict(((a, d, p), u) for a, d, p, u in conn.execute("SELECT * FROM offsets_daily"))
    conn.close()
    Store(db).close()
    assert offsets_units(db) == before
    assert_keyed(db)
    conn = sqlite3.connect(db)
    try:
        newest = dict(conn.execute("SELECT plan_id, offsets_day FROM plans"))
        assert newest[f"plan-{seqs[0]}"] == "2026-12-09"
        assert newest[f"plan-{seqs[1]}"] == DAY
        assert conn.execute("SELECT count(*) FROM offsets_past").fetchone()[0] == 10 * 2 + 10
    finally:
        conn.close()


def v5_database(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None)
    for script in MIGRATIONS[:5]:
        for stmt in _statements(script):
            conn.execute(stmt)
    conn.execute("PRAGMA user_version = 5")
    return conn


def test_migration_v6_refuses_an_offsets_row_of_no_plan(tmp_path):
    """Its rowid could not be computed: the migration stops and applies nothing."""
    db = tmp_path / "ledger.db"
    conn = v5_database(db)
    conn.execute("INSERT INTO offsets_daily VALUES ('acme', '2027-03-10', 'plan-404', 7)")
    conn.close()
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        Store(db)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
        assert conn.execute("SELECT * FROM offsets_daily").fetchall() == [
            ("acme", "2027-03-10", "plan-404", 7)]
    finally:
        conn.close()


def test_a_plan_off_its_rowid_is_still_updated(tmp_path, caplog):
    """Were a plan's rowid not its purchase_seq, the group writes it by plan_id instead."""
    db = tmp_path / "l.db"
    led = Ledger(db)
    try:
        two_plans(led)
    finally:
        led.close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE plans SET rowid = rowid + 1000000 WHERE account_id = 'acme'")
    conn.commit()
    conn.close()
    led = Ledger(db)
    try:
        with caplog.at_level(logging.WARNING, logger="ledger.store.sqlite_rows"):
            out = led.call(consume("acme", "r1", 5))
        assert out.plan_units_remaining == 100_000 - 5
        assert "written by plan_id" in caplog.text
    finally:
        led.close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT units_remaining FROM plans WHERE account_id = 'acme'"
                            ).fetchone() == (100_000 - 5,)
    finally:
        conn.close()


def test_a_plans_day_changed_behind_the_writer_fails_its_group_then_heals(tmp_path):
    """acme's row is made to hold another day than the writer wrote in it (by hand, as no
    ledger code does): acme's next consume, which would add to the day by rowid, finds no
    row and fails its group (nothing changes); the group after it confirms the day afresh."""
    db = tmp_path / "l.db"
    led = Ledger(db)
    try:
        two_plans(led)
        led.call(consume("acme", "a1", 2))  # sets the day, confirmed at commit
        led.call(consume("acme", "a2", 1))  # by rowid, the day checked
        side = sqlite3.connect(db)
        side.execute("UPDATE plans SET offsets_day = '2027-03-09' WHERE account_id = 'acme'")
        side.commit()
        before = offsets_units(db)
        with pytest.raises(Unavailable):
            unwrap(led.writer.call(consume("acme", "a3", 4)))
        assert offsets_units(db) == before
        assert led.call(consume("acme", "a3", 4)).plan_units_remaining == 100_000 - 7
        side.close()
    finally:
        led.close()
    units = offsets_units(db)
    plan = plan_of(db, "acme")
    assert units == {("acme", "2027-03-09", plan): 3, ("acme", "2027-03-10", plan): 4}


def test_a_plans_days_across_midnight(tmp_path):
    """R2: the ledger's clock decides each consume's billing day, and never goes back. A
    plan's consumes on two days: the older day moves to offsets_past when the newer day's
    first consume comes, in separate groups and inside one group (a Batch that advances
    the clock between two consumes); every figure verifies."""
    db = tmp_path / "l.db"
    led = Ledger(db)
    try:
        two_plans(led)
        led.call(consume("acme", "d1", 2))
        led.call(consume("acme", "d1b", 1))
        led.call(m.AdvanceClock(T0 + DAY_US))
        led.call(consume("acme", "d2", 5))
        outs = led.writer.call(Batch([consume("beta", "e1", 3), m.AdvanceClock(T0 + 2 * DAY_US),
                                      consume("beta", "e2", 4), consume("acme", "d3", 6)]))
        assert all(not isinstance(o.error, Exception) for o in outs), outs
        led.call(consume("beta", "e3", 1))
    finally:
        led.close()
    a, b = plan_of(db, "acme"), plan_of(db, "beta")
    assert offsets_units(db) == {
        ("acme", "2027-03-10", a): 3, ("acme", "2027-03-11", a): 5, ("acme", "2027-03-12", a): 6,
        ("beta", "2027-03-11", b): 3, ("beta", "2027-03-12", b): 5}
    assert_keyed(db)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM offsets_past").fetchone()[0] == 3
    finally:
        conn.close()
    assert verify(str(db)).ok


@settings(max_examples=300, deadline=None)
@given(plans=st.lists(st.tuples(st.integers(0, 5), st.booleans(), st.integers(0, 20),
                                st.integers(0, 20)), min_size=0, max_size=3),
       t=st.integers(0, 25))
def test_units_remaining_at_agrees_with_each_plans_can_offset_at(plans, t):
    """The one-plan shortcut of AccountState.units_remaining_at (issue 19) gives what the
    definition gives: the units of the plans that can offset at t (refunded, not yet
    purchased, expired and empty plans give none)."""
    acct = m.AccountState("acme", "Acme", created_at=0)
    for i, (units, refunded, bought, lasts) in enumerate(plans):
        acct.live_plans.append(m.PlanState(
            f"plan-{i}", "acme", "spec", 5, units, 1, m.Validity.ONE_MONTH, bought,
            bought + lasts, i, refunded_at=bought if refunded else None))
    assert acct.units_remaining_at(t) == sum(p.units_remaining for p in acct.live_plans
                                             if p.can_offset_at(t))
