"""A small consume group on PostgreSQL in one call per account of each schema-v3 function,
and a larger one in one call of schema v6's ``ql_write_group`` (issue 20).

``ql_open_one`` and ``ql_write_one`` run, on the server, the statements that the two
pipelines of a group send one by one. The same lone requests (covered by a plan, paid as
they go, replayed, refused for a reused key, dry runs, two plans in one request) are run
once through the functions and once through the pipelines, each on a fresh database with
the same test clock, and then small groups (batches over a few accounts, one account twice,
more accounts than one call per account takes): the answers and every row written must be
the same (R11, R12, R25).
"""

from __future__ import annotations

import itertools
from typing import Any

import psycopg
import pytest

from ledger import model as m
from ledger import shared
from ledger.catalog import builtin
from ledger.clock import TestClock
from ledger.engine import Engine
from ledger.errors import LedgerError
from ledger.store import open_store, pg_write
from ledger.store.postgres import PgStore
from ledger.writer import Batch, Writer, unwrap

from .test_journal_blocks import T0, consume

_names = itertools.count()
TABLES = {
    "journal": "SELECT node, seq, at_us, kind, account_id, request_id, fingerprint, payload,"
               " hash FROM journal ORDER BY node, seq",
    "plans": "SELECT * FROM plans ORDER BY plan_id",
    "offsets_daily": "SELECT * FROM offsets_daily ORDER BY 1, 2, 3",
    "usage_daily": "SELECT * FROM usage_daily ORDER BY 1, 2, 3",
    "consume_keys": "SELECT * FROM consume_keys ORDER BY 1, 2",
    "accounts": "SELECT account_id, status, cash_micros, version FROM accounts ORDER BY 1",
}


def answer(writer: Writer, cmd: Any) -> Any:
    return outcome_of(writer.call(cmd))


def outcome_of(outcome: Any) -> Any:
    try:
        r = unwrap(outcome)
    except LedgerError as exc:
        return type(exc).__name__, exc.reason
    return ("replayed" if r.replayed else "new", r.allocations, r.payg_units,
            r.payg_amount_micros, r.plan_units_remaining, r.journal_seq)


def run_ledger(url: str) -> tuple[list[Any], dict[str, list[tuple]]]:
    store = open_store(url)
    writer = Writer(Engine(store, TestClock(T0), builtin()))
    writer.start()
    try:
        for a in ("acme", "beta"):
            writer.call(m.CreateAccount(a))
            writer.call(m.TopUp(a, "t", m.FundsKind.CASH, 200_000_000))
        writer.call(m.PurchasePlan("acme", "p1", "month-100k"))
        answers = [answer(writer, c) for c in (
            consume("acme", "r1"),  # a plan pays: plan, offsets, key, version
            consume("acme", "r2", 5),
            consume("acme", "r1"),  # a replay: nothing written
            consume("acme", "r1", 2),  # the key again with other content: refused
            consume("beta", "r1"),  # no plan: pay as you go, no version bump
            consume("beta", "r3", 4, region=2),
            consume("nobody", "r1"),  # no such account
            m.Consume("acme", "dry", m.Region(1), m.CaptchaType(1), m.Architecture(1),
                      m.Step(1), None, 1, True),
        )]
        writer.call(m.PurchasePlan("acme", "p2", "month-100k"))
        answers.append(answer(writer, consume("acme", "big", 100_000)))  # two plans
        answers.append(answer(writer, consume("acme", "after")))
        for i in range(9):
            writer.call(m.CreateAccount(f"c{i}"))
            if i % 2:
                writer.call(m.PurchasePlan(f"c{i}", "p1", "month-100k"))
        for batch in (  # a group each: one call per account, or the statements
                [consume(a, "b1") for a in ("acme", "beta", "c1", "c2")],
                [consume("c3", "b2"), consume("c3", "b3"), consume("c4", "b2")],
                [consume(f"c{i}", "b4") for i in range(9)],
                [consume("c5", "b5"), consume("c5", "b1")]):
            answers.append([outcome_of(o) for o in writer.call(Batch(batch))])
    finally:
        writer.stop()
        store.close()
    with psycopg.connect(url) as conn:
        rows = {t: conn.execute(q).fetchall() for t, q in TABLES.items()}
    return answers, rows


@pytest.fixture
def two_databases(pg_cluster):
    names = [f"one_call_{next(_names)}_{i}" for i in range(2)]
    urls = [pg_cluster.create_database(n) for n in names]
    try:
        yield urls
    finally:
        for n in names:
            pg_cluster.drop_database(n)


def test_a_lone_consume_writes_the_same_rows_through_one_call(two_databases, monkeypatch):
    monkeypatch.setattr(shared, "OPTIMISTIC", False)  # every group opens: count the opens
    taken = {"open": 0, "write": 0, "accounts": 0}
    open_calls, write_calls = PgStore._open_calls, pg_write.write_calls

    def counted_open(self, *a):
        taken["open"] += 1
        return open_calls(self, *a)

    def counted_calls(*a):
        got = write_calls(*a)
        if got is not None:
            taken["write"] += 1
            taken["accounts"] = max(taken["accounts"], len(got))
        return got

    group_call = pg_write.group_call

    def counted_group(*a):
        got = group_call(*a)
        taken["group"] += got is not None
        return got

    monkeypatch.setattr(PgStore, "_open_calls", counted_open)
    monkeypatch.setattr(pg_write, "write_calls", counted_calls)
    monkeypatch.setattr(pg_write, "group_call", counted_group)
    taken["group"] = 0
    one_answers, one_rows = run_ledger(two_databases[0])
    # schema v6's ql_write_group wrote the groups too large for one call per account
    assert taken.pop("group") >= 1, taken
    # the functions did the work: five lone consumes that write, and the batch over four
    # accounts (two plans in one request, one account twice or nine accounts do not)
    assert taken["open"] >= 11 and taken["write"] == 6 and taken["accounts"] == 4, taken
    taken.update(open=0, write=0, accounts=0, group=0)
    monkeypatch.setattr(pg_write, "ONE_CALL", False)
    piped_answers, piped_rows = run_ledger(two_databases[1])
    assert taken == {"open": 0, "write": 0, "accounts": 0, "group": 0}
    assert one_answers == piped_answers
    assert one_answers[2][0] == "replayed"
    assert one_answers[3] == ("AlreadyExists", "IDEMPOTENCY_KEY_REUSED")
    for table, rows in piped_rows.items():
        assert one_rows[table] == rows, table
    assert len(one_rows["consume_keys"]) == 6 + 4 + 3 + 9 + 2 and one_rows["usage_daily"]


def test_group_call_texts_join_each_column_and_refuse_a_value_holding_the_separator():
    rows = [("acme", "day", 7, None), ("beta", "day", 12, 5)]
    assert pg_write._texts(rows, 4) == ["acme\x1fbeta", "day\x1fday", "7\x1f12", "None\x1f5"]
    assert pg_write._texts([], 3) == ["", "", ""]
    assert pg_write._texts([("a\x1fb", 1)], 2) is None  # it would split into two values
