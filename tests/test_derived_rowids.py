"""Derived rows found by integer keys (SQLite schema v6, issue 19), and the consume group's
shortcut for an account's remaining units.

A plan's rowid is its purchase_seq; an offsets_daily row's rowid is its plan's purchase_seq
* OFFSET_DAY_SLOTS + its day's number since 1970-01-01. The consume group updates both by
rowid; these tests hold the invariant on new rows and on migrated ones, and show what
happens when it does not hold: a plan is still updated (by plan_id), and an offsets row in
the wrong place fails its group (Unavailable) rather than count units in another row.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from datetime import date
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import model as m
from ledger.errors import Unavailable
from ledger.store import Store
from ledger.store.schema import MIGRATIONS, OFFSET_DAY_SLOTS, _statements
from ledger.verify import verify
from ledger.writer import Batch, unwrap

from .test_journal_blocks import FIXTURES, Ledger, consume


def day_number(day: str) -> int:
    return (date.fromisoformat(day) - date(1970, 1, 1)).days


def assert_keyed(db: Path) -> None:
    """Every plan and offsets row sits at the rowid the consume group looks for."""
    conn = sqlite3.connect(db)
    try:
        plans = conn.execute("SELECT rowid, purchase_seq FROM plans").fetchall()
        assert plans and all(r == s for r, s in plans), plans
        offsets = conn.execute("SELECT o.rowid, p.purchase_seq, o.day FROM offsets_daily o"
                               " JOIN plans p USING (plan_id)").fetchall()
        assert offsets, "the test must write offsets rows"
        for rowid, seq, day in offsets:
            assert rowid == seq * OFFSET_DAY_SLOTS + day_number(day), (rowid, seq, day)
        n = conn.execute("SELECT count(*) FROM offsets_daily").fetchone()[0]
        assert n == len(offsets), "no offsets row without its plan"
    finally:
        conn.close()


def offsets_units(db: Path) -> dict[tuple[str, str, str], int]:
    conn = sqlite3.connect(db)
    try:
        return {(a, d, p): u for a, d, p, u in conn.execute("SELECT * FROM offsets_daily")}
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
    """The committed v2 fixture, migrated to v6 in place: its plan takes its purchase_seq as
    rowid, its offsets row the key of its plan and day, units unchanged; it verifies."""
    db = tmp_path / "ledger.db"
    shutil.copy(FIXTURES / "ledger-v2.db", db)
    before = offsets_units(db)
    assert before
    Store(db).close()
    assert offsets_units(db) == before
    assert_keyed(db)
    assert verify(str(db)).ok


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


def test_an_offsets_row_in_another_rows_place_fails_its_group(tmp_path):
    """beta's offsets row for the day moved to the rowid acme's row will take: acme's first
    consume of the day then conflicts with a row of another plan; the group fails, and
    neither row changes."""
    db = tmp_path / "l.db"
    led = Ledger(db)
    try:
        two_plans(led)
        led.call(consume("beta", "b1", 4))
    finally:
        led.close()
    conn = sqlite3.connect(db)
    seq, = conn.execute("SELECT purchase_seq FROM plans WHERE account_id = 'acme'").fetchone()
    day, = conn.execute("SELECT day FROM offsets_daily").fetchone()
    conn.execute("UPDATE offsets_daily SET rowid = ? WHERE account_id = 'beta'",
                 (seq * OFFSET_DAY_SLOTS + day_number(day),))
    conn.commit()
    conn.close()
    before = offsets_units(db)
    led = Ledger(db)
    try:
        with pytest.raises(Unavailable):
            unwrap(led.writer.call(consume("acme", "a1", 3)))
    finally:
        led.close()
    assert offsets_units(db) == before


def test_rowids_of_a_rolled_back_group_are_not_taken_as_confirmed(tmp_path, monkeypatch):
    """A group whose commit fails confirms nothing: beta's offsets row it would have
    inserted is not there, so the next group must insert it (checked), not update it."""
    from ledger.store import sqlite as sqlite_store

    db = tmp_path / "l.db"
    led = Ledger(db)
    try:
        two_plans(led)
        led.call(consume("acme", "a1", 2))
        failing = {"left": 1}

        def fault(point: str) -> None:
            if point == "during_commit" and failing["left"]:
                failing["left"] -= 1
                raise sqlite3.OperationalError("disk I/O error (planted)")

        monkeypatch.setattr(sqlite_store, "fault", fault)
        with pytest.raises(Unavailable):
            unwrap(led.writer.call(consume("beta", "b1", 3)))
        led.call(consume("acme", "a2", 1))  # a group that commits, beta not in it
        seq, = led.store.conn.execute("SELECT purchase_seq FROM plans WHERE account_id = 'beta'"
                                      ).fetchone()
        day, = led.store.conn.execute("SELECT day FROM offsets_daily").fetchone()
        assert seq * OFFSET_DAY_SLOTS + day_number(day) not in led.store.rows.offsets_keyed
        assert unwrap(led.writer.call(consume("beta", "b1", 3))).plan_units_remaining == (
            100_000 - 3)
        led.call(consume("beta", "b2", 1))  # now by rowid alone
    finally:
        led.close()
    assert_keyed(db)
    units = offsets_units(db)
    assert sorted(units.values()) == [3, 4]


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
