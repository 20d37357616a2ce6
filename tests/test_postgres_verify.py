"""R25 on PostgreSQL: the database refuses changes to the journal; `verify` names an
altered entry by its node and seq, reports a tampered derived table, and a node refuses to
start on a corrupted chain (the SQLite versions are in tests/test_verify.py)."""

from __future__ import annotations

import psycopg
import pytest

from ledger.verify import verify

from .conftest import T0, ServerProcess, make_account
from .test_verify import _busy_ledger, _run


@pytest.fixture
def pg_server(tmp_path, pg_url):
    srv = ServerProcess(tmp_path, db=pg_url).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_postgres_journal_refuses_update_and_delete(pg_server):
    with pg_server.client() as c:
        c.set_time(T0)
        make_account(c)
    with psycopg.connect(str(pg_server.db), autocommit=True) as conn:
        for sql in ("UPDATE journal SET kind = 'x'", "DELETE FROM journal"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(sql)


def test_postgres_flipped_payload_byte_is_named_and_the_node_refuses_to_start(
        pg_server, tmp_path):
    with pg_server.client() as c:
        c.set_time(T0)
        _busy_ledger(c)
    pg_server.stop()
    url = str(pg_server.db)
    assert verify(url).ok
    with psycopg.connect(url, autocommit=True) as conn:
        node, seq, payload = conn.execute(
            "SELECT node, seq, payload FROM journal WHERE kind = 'consume_block'"
            " ORDER BY gseq DESC LIMIT 1").fetchone()
        altered = bytearray(payload)
        altered[-1] ^= 1
        conn.execute("ALTER TABLE journal DISABLE TRIGGER journal_no_change")  # an attacker's step
        conn.execute("UPDATE journal SET payload = %s WHERE node = %s AND seq = %s",
                     (bytes(altered), node, seq))
    report = verify(url)
    assert not report.ok and f"node {node}'s entry {seq}:" in report.problems[0]
    done = _run("verify", "--db", url)
    assert done.returncode == 1 and f"node {node}'s entry {seq}" in done.stderr
    (tmp_path / "again").mkdir()
    srv = ServerProcess(tmp_path / "again", db=url)
    with pytest.raises(RuntimeError, match="corrupted journal"):
        srv.start()


def test_postgres_tampered_derived_table_is_reported(pg_server):
    with pg_server.client() as c:
        c.set_time(T0)
        _busy_ledger(c)
    pg_server.stop()
    url = str(pg_server.db)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE accounts SET cash_micros = cash_micros + 1"
                     " WHERE account_id = 'acme'")
    report = verify(url)
    assert len(report.problems) == 1 and "accounts 'acme'.cash_micros" in report.problems[0]
