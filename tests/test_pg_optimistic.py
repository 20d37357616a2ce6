"""Optimistic consume groups on PostgreSQL (issue 20): a group of consumes over cached
accounts is decided without opening its transaction, and its commit checks, under the
accounts' locks, that nothing it was decided on has moved (``ql_check``), in the round
trip that writes it.

- The same requests as the locked path (``test_pg_one_call.run_ledger``: plans, pay as you
  go, a replay, a reused key, dry runs, batches) give the same answers and write the same
  rows, and the optimistic path did the work (R11, R12, R25).
- Two nodes on one database take turns on one account: a node whose cached account the
  other moved loses its optimistic group, writes nothing, runs it again on the locked path
  and answers right; a key the other node claimed is replayed, not charged twice (R12);
  the shared clock moved by one node is seen by the other (R26).
- Requests that claim no key (a dry run, a non-billable request (R3), one on a suspended
  account (R23)) take the locked path, which still finds a key claimed before (R12).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from ledger import model as m
from ledger import shared
from ledger.catalog import builtin
from ledger.clock import TestClock
from ledger.engine import Engine
from ledger.errors import LedgerError, Stale
from ledger.store import open_store
from ledger.store.postgres import PgStore
from ledger.writer import Writer, unwrap

from .test_journal_blocks import T0, consume
from .test_pg_one_call import run_ledger, two_databases  # noqa: F401  (a fixture)

MONTH_UNITS = 100_000  # the units of the built-in "month-100k" plan


def counting(monkeypatch) -> dict[str, int]:
    """Count PgStore's optimistic commits, and those that lost (and why)."""
    seen = {"checked": 0, "lost": 0, "keys": 0, "moved": 0}
    commit = PgStore.commit

    def counted(self, uow, check=None):  # noqa: ANN001, ANN202
        if check is None:
            return commit(self, uow)
        seen["checked"] += 1
        try:
            return commit(self, uow, check)
        except Stale as exc:
            seen["lost"] += 1
            seen["keys"] += exc.key_claimed
            seen["moved"] += len(exc.accounts)
            raise

    monkeypatch.setattr(PgStore, "commit", counted)
    return seen


def test_optimistic_groups_write_what_the_locked_path_writes(two_databases, monkeypatch):  # noqa: F811
    seen = counting(monkeypatch)
    fast_answers, fast_rows = run_ledger(two_databases[0])
    # every consume after the first on a cached account went optimistic; the replay's
    # group (its key claimed before) lost once and was answered from the locked path
    assert seen["checked"] >= 8 and seen["keys"] >= 1 and seen["moved"] == 0, seen
    monkeypatch.setattr(shared, "OPTIMISTIC", False)
    seen.update(checked=0, lost=0, keys=0, moved=0)
    locked_answers, locked_rows = run_ledger(two_databases[1])
    assert seen["checked"] == 0
    assert fast_answers == locked_answers
    assert fast_answers[2][0] == "replayed"
    assert fast_answers[3] == ("AlreadyExists", "IDEMPOTENCY_KEY_REUSED")
    for table, rows in locked_rows.items():
        assert fast_rows[table] == rows, table


@contextmanager
def acme_with_a_plan(pg_url: str) -> Iterator[Writer]:
    """A running writer on ``pg_url`` whose account "acme" holds a month-100k plan."""
    writer = Writer(Engine(open_store(pg_url), TestClock(T0), builtin()))
    writer.start()
    try:
        call(writer, m.CreateAccount("acme"))
        call(writer, m.TopUp("acme", "t", m.FundsKind.CASH, 200_000_000))
        call(writer, m.PurchasePlan("acme", "p1", "month-100k"))
        yield writer
    finally:
        writer.stop()
        writer.engine.store.close()


def call(writer: Writer, cmd: object) -> object:
    return unwrap(writer.call(cmd))


def test_two_nodes_taking_turns_on_one_account(pg_url, monkeypatch):
    seen = counting(monkeypatch)
    monkeypatch.setattr(shared, "OPTIMISTIC_BACKOFF_GROUPS", 0)  # lose, then try again at once
    writers = [Writer(Engine(open_store(pg_url), TestClock(T0), builtin())) for _ in range(2)]
    for w in writers:
        w.start()
    one, two = writers
    try:
        call(one, m.CreateAccount("acme"))
        call(one, m.TopUp("acme", "t", m.FundsKind.CASH, 200_000_000))
        call(one, m.PurchasePlan("acme", "p1", "month-100k"))
        left = [call(one, consume("acme", "r1")).plan_units_remaining]  # optimistic
        left.append(call(two, consume("acme", "r2")).plan_units_remaining)  # loads acme
        left.append(call(two, consume("acme", "r3")).plan_units_remaining)  # optimistic
        assert seen == {"checked": 2, "lost": 0, "keys": 0, "moved": 0}, seen
        # node one's copy of acme is two consumes old: its group loses, writes nothing,
        # and is run again on the locked path, which reloads acme
        left.append(call(one, consume("acme", "r4")).plan_units_remaining)
        assert seen["lost"] == 1 and seen["moved"] == 1, seen
        assert one.engine.reloads == 1
        # node two's copy is now old too, and its retry of r4 is r4's replay (R12)
        again = call(two, consume("acme", "r4"))
        assert again.replayed and again.plan_units_remaining == left[-1]
        assert left == [MONTH_UNITS - n for n in (1, 2, 3, 4)], left
        # node one steps the shared test clock: node two's next group, decided on the old
        # clock, loses and is decided again at the new one (R26)
        call(one, m.AdvanceClock(T0 + 3_600_000_000))
        lost = seen["lost"]
        r5 = call(two, consume("acme", "r5"))
        assert seen["lost"] == lost + 1
        assert r5.recorded_at_us >= T0 + 3_600_000_000 and r5.plan_units_remaining == 99_995
        assert call(one, consume("acme", "r6")).plan_units_remaining == 99_994
    finally:
        for w in writers:
            w.stop()
            w.engine.store.close()
    with psycopg.connect(pg_url) as conn:
        (units,) = conn.execute("SELECT units_remaining FROM plans").fetchone()
        (keys,) = conn.execute("SELECT count(*) FROM consume_keys").fetchone()
        (offset,) = conn.execute("SELECT sum(units) FROM offsets_daily").fetchone()
    assert (units, keys, offset) == (MONTH_UNITS - 6, 6, 6)


def test_a_node_answers_many_retries_of_one_request(pg_url):
    """Each retry's optimistic group loses at its key's INSERT, and its pipeline is
    aborted there: the statements queued after it (prepared on first use: psycopg marks one
    prepared at its threshold even when an aborted pipeline skipped it) still run after."""
    with acme_with_a_plan(pg_url) as writer:
        first = call(writer, consume("acme", "once"))
        for i in range(RETRIES):
            again = call(writer, consume("acme", "once"))
            assert again.replayed and again.journal_seq == first.journal_seq, i
            fresh = call(writer, consume("acme", f"new-{i}"))  # an optimistic group each
            assert not fresh.replayed and fresh.plan_units_remaining == MONTH_UNITS - 2 - i


RETRIES = 12  # past psycopg's default prepare threshold (5) twice


def test_requests_that_claim_no_key_still_find_a_claimed_one(pg_url):
    """A dry run and a non-billable request (R3) claim no key, so no INSERT would find a key
    claimed before: their groups take the locked path, which reads the key (R12)."""
    with acme_with_a_plan(pg_url) as writer:
        first = call(writer, consume("acme", "k1"))
        dry = call(writer, m.Consume("acme", "k1", m.Region(1), m.CaptchaType(1),
                                     m.Architecture(1), m.Step(1), None, 1, True))
        assert dry.replayed and dry.journal_seq == first.journal_seq
        free = m.Consume("acme", "k1", m.Region(1), m.CaptchaType(1), m.Architecture.V2,
                         m.Step.STEP_4_1, None, 1)  # not billable (R3)
        try:
            unwrap(writer.call(free))
            raise AssertionError("a claimed key reused by a non-billable request was accepted")
        except LedgerError as exc:
            assert exc.reason == "IDEMPOTENCY_KEY_REUSED"


DAY_US = 86_400_000_000


def test_a_suspended_accounts_retry_is_still_its_replay(pg_url):
    """A request on a suspended account (R23) claims no key either: its group takes the
    locked path, which finds the key claimed before the suspension and replays it (R12)."""
    with acme_with_a_plan(pg_url) as writer:
        call(writer, m.CreateAccount("poor"))
        first = call(writer, consume("poor", "k1", 1_000))  # pay as you go, unpaid: overdue
        call(writer, m.AdvanceClock(T0 + 10 * DAY_US))  # settled, then suspended (R23)
        try:
            unwrap(writer.call(consume("poor", "k2")))
            raise AssertionError("a suspended account's new request was accepted")
        except LedgerError as exc:
            assert exc.reason == "ACCOUNT_SUSPENDED"
        again = call(writer, consume("poor", "k1", 1_000))
        assert again.replayed and again.journal_seq == first.journal_seq
