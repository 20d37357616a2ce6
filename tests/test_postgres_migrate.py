"""`quota-ledger migrate --from PATH.db --to postgresql://...` (issue 11, point 5): a whole
SQLite ledger moves into an empty PostgreSQL database; both sides verify, every old
request_id replays its original result there (R12), and a non-empty target is refused."""

from __future__ import annotations

import shutil

from ledger.verify import verify

from .conftest import T0, ServerProcess, make_account
from .test_journal_blocks import FIXTURES, check_fixture_replays
from .test_verify import _busy_ledger, _run


def test_postgres_migrate_copies_a_busy_ledger_and_old_keys_replay_there(tmp_path, pg_url):
    (tmp_path / "lite").mkdir()
    lite = ServerProcess(tmp_path / "lite").start()
    try:
        with lite.client() as c:
            c.set_time(T0)
            _busy_ledger(c)
            make_account(c, "mover", cash_micros=100_000_000)
            c.purchase_plan("mover", "month-100k")
            before = {f"m-{i}": c.consume("mover", request_id=f"m-{i}") for i in range(20)}
            plans = {p.plan_id for a in ("acme", "mover")
                     for p in c.list_plans(a, include_inactive=True).plans}
    finally:
        lite.stop()
    done = _run("migrate", "--from", str(lite.db), "--to", pg_url)
    assert done.returncode == 0, done.stderr
    assert "both verify" in done.stdout
    assert verify(pg_url).ok
    (tmp_path / "pg").mkdir()
    node = ServerProcess(tmp_path / "pg", db=pg_url).start()
    try:
        with node.client() as c:
            for rid, first in before.items():
                again = c.consume("mover", request_id=rid)
                assert again.replayed
                assert (again.journal_seq, again.plan_units_remaining, again.payg_units,
                        again.recorded_at.ToMicroseconds()) == (
                    first.journal_seq, first.plan_units_remaining, first.payg_units,
                    first.recorded_at.ToMicroseconds())
            c.top_up("mover", 100_000_000, "cash")
            fresh = c.purchase_plan("mover", "month-100k")
            assert fresh.plan_id not in plans
            assert not c.consume("mover", request_id="after-move").replayed
    finally:
        node.stop()
    assert verify(pg_url).ok
    again = _run("migrate", "--from", str(lite.db), "--to", pg_url)
    assert again.returncode == 2 and "already holds a ledger" in again.stderr


def test_postgres_migrate_the_v2_fixture_keeps_its_one_row_consumes_replaying(tmp_path, pg_url):
    """The committed schema-2 fixture (one journal row per consume) moves up too."""
    shutil.copy(FIXTURES / "ledger-v2.db", tmp_path / "ledger.db")
    done = _run("migrate", "--from", str(tmp_path / "ledger.db"), "--to", pg_url)
    assert done.returncode == 0, done.stderr
    (tmp_path / "pg").mkdir()
    node = ServerProcess(tmp_path / "pg", db=pg_url).start()
    try:
        with node.client() as c:
            check_fixture_replays(c)
    finally:
        node.stop()
    assert verify(pg_url).ok
