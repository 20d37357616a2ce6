"""Killing the server during a settlement: each bill and each payment exactly once (R19)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ledger.money import round_half_up_to_cent
from ledger.verify import verify

from .conftest import T0, ServerProcess, end_day_and_die

ACCOUNTS = 60
DAY = "2027-03-10"  # T0 is 18:00 UTC+8 on this day
CASH_MICROS = 5_000_000


def _prepare(srv: ServerProcess) -> None:
    with srv.client() as c:
        c.set_time(T0)
        for i in range(ACCOUNTS):
            acct = f"s{i:03d}"
            c.create_account(acct)
            c.top_up(acct, CASH_MICROS, request_id="fund")
            c.consume_batch([c.consume_request(acct, quantity=1_000 + i, request_id=f"c{i}")])


def _bills_and_balances(srv: ServerProcess) -> tuple[list[tuple], dict[str, int]]:
    conn = srv.read_conn()
    try:
        bills = conn.execute("SELECT account_id, day, amount_due_micros, paid_cash_micros"
                             " FROM bills ORDER BY account_id").fetchall()
        cash = dict(conn.execute("SELECT account_id, cash_micros FROM accounts").fetchall())
        entries = conn.execute("SELECT count(*) FROM journal WHERE kind = 'bill'").fetchone()[0]
    finally:
        conn.close()
    assert entries == len(bills)  # one journal entry per bill, no more
    return bills, cash


@pytest.mark.parametrize("point", ["before_commit", "during_commit", "after_commit"])
def test_r19_kill_during_settlement_bills_and_pays_once(tmp_path, monkeypatch, point, db):
    """SIGKILL inside the settlement's commit, restart, settle: one bill and one payment each."""
    srv = ServerProcess(tmp_path, db=db).start()
    _prepare(srv)
    srv.stop()
    end_day_and_die(srv, monkeypatch, point)
    srv.start()
    with srv.client() as c:
        c.set_time(T0 + timedelta(days=1))  # a no-op if the settlement was already durable
        again = c.settle_day(DAY)
        assert len(again.bills) == ACCOUNTS
    srv.stop()
    bills, cash = _bills_and_balances(srv)
    assert len(bills) == ACCOUNTS and len({b[0] for b in bills}) == ACCOUNTS
    for account_id, _day, due, paid_cash in bills:
        i = int(account_id[1:])
        assert due == round_half_up_to_cent((1_000 + i) * 700) == paid_cash  # R15
        assert cash[account_id] == CASH_MICROS - due  # paid exactly once
    report = verify(str(srv.db))
    assert report.ok, report.problems
