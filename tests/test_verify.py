"""The verifiable journal: hash chain, rebuild from the journal (R25), backups, tampering."""

import shutil
import sqlite3
import subprocess
import sys
from datetime import timedelta

import pytest

from ledger.verify import verify

from .conftest import ROOT, T0, ServerProcess, make_account


def _busy_ledger(client) -> None:
    """Every kind of journal entry: purchases, consumes, features, bills, expiry, refunds."""
    make_account(client, cash_micros=100_000_000, voucher_micros=5_000_000)
    make_account(client, "late-payer")
    plan = client.purchase_plan("acme", "month-100k")
    client.top_up("acme", 60_000_000, "voucher")
    client.refund_plan(client.purchase_plan("acme", "month-100k").plan_id, "test")
    client.update_features("acme", ["a", "b", "c", "d", "e"], True)
    client.update_features("late-payer", ["x"], True)
    client.consume("acme", quantity=99_000)
    client.consume("acme", quantity=5_000, region="outside")
    client.consume("late-payer", quantity=50)
    client.set_time(T0 + timedelta(days=40))  # settles 40 days, expires the plan, suspends
    assert client.list_plans("acme", include_inactive=True).plans[0].plan_id == plan.plan_id


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=120)


def test_r25_rebuild_from_journal_equals_derived_tables(server, client):
    """After every kind of activity, verify finds the chain intact and every figure equal."""
    _busy_ledger(client)
    assert client.get_account("late-payer").status == 3  # suspended: its entries are in too
    server.stop()
    report = verify(str(server.db))
    assert report.ok, report.problems
    assert report.entries == server.journal_rows()
    done = _run("verify", "--db", str(server.db))
    assert done.returncode == 0 and "ok:" in done.stdout


@pytest.mark.sqlite_only  # PostgreSQL: tests/test_postgres_verify.py
def test_r25_flipped_payload_byte_is_named_and_refused(server, client, tmp_path):
    """One byte changed in an entry's payload: verify names that entry; the server won't start."""
    _busy_ledger(client)
    server.stop()
    copy = tmp_path / "copy" / "ledger.db"
    copy.parent.mkdir()
    shutil.copy(server.db, copy)
    with sqlite3.connect(copy) as conn:
        seq, payload = conn.execute(
            "SELECT seq, payload FROM journal WHERE kind = 'consume_block' LIMIT 1").fetchone()
        altered = bytearray(payload)
        altered[-1] ^= 1  # the last item's units remaining, one bit off
        conn.execute("DROP TRIGGER journal_no_update")  # what an attacker would have to do
        conn.execute("UPDATE journal SET payload = ? WHERE seq = ?", (bytes(altered), seq))
    report = verify(str(copy))
    assert not report.ok and f"journal entry {seq}:" in report.problems[0]
    done = _run("verify", "--db", str(copy))
    assert done.returncode == 1 and f"journal entry {seq}" in done.stderr
    srv = ServerProcess(copy.parent)
    srv.db = copy
    try:
        srv.start()
    except RuntimeError as exc:
        assert "corrupted journal" in str(exc) and f"entry {seq}" in str(exc)
    else:
        srv.stop()
        raise AssertionError("the server started on a corrupted journal")


@pytest.mark.sqlite_only  # PostgreSQL: tests/test_postgres_verify.py
def test_r25_tampered_derived_table_is_reported(server, client, tmp_path):
    """A balance changed behind the journal's back is a divergence verify reports."""
    _busy_ledger(client)
    server.stop()
    with sqlite3.connect(server.db) as conn:
        conn.execute("UPDATE accounts SET cash_micros = cash_micros + 1 WHERE account_id='acme'")
    report = verify(str(server.db))
    assert report.problems == [report.problems[0]] and "accounts 'acme'.cash_micros" in (
        report.problems[0])


@pytest.mark.sqlite_only  # PostgreSQL: tests/test_postgres_verify.py
def test_journal_refuses_update_and_delete(server, client):
    """R25: the database itself refuses to change or remove a journal entry."""
    make_account(client)
    with sqlite3.connect(server.db) as conn:
        for sql in ("UPDATE journal SET kind = 'x'", "DELETE FROM journal"):
            try:
                conn.execute(sql)
            except sqlite3.DatabaseError as exc:
                assert "append-only" in str(exc)
            else:
                raise AssertionError(f"{sql} was allowed")


@pytest.mark.sqlite_only  # PostgreSQL: tests/test_postgres_verify.py
def test_online_backup_while_writing_verifies_clean(server, client, tmp_path):
    """A backup taken while the server writes is a consistent ledger that verifies clean."""
    make_account(client, cash_micros=100_000_000)
    client.purchase_plan("acme", "month-100k")
    for _ in range(20):
        client.consume("acme", quantity=7)
    target = tmp_path / "backup.db"
    done = _run("backup", "--db", str(server.db), "--to", str(target))
    assert done.returncode == 0, done.stderr
    client.consume("acme")
    report = verify(str(target))
    assert report.ok, report.problems
    assert report.entries >= 23
