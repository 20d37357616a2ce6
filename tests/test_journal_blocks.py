"""Consume blocks and the key index (issue 9): R12 and R25 on the new journal format.

One journal row per run of consumes (ledger/store/blocks.py); keys found through a memtable,
sorted runs and a filter (ledger/store/keyindex.py). These tests shrink the memtable so that
runs, filter snapshots and restarts happen within a few hundred requests.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from pathlib import Path

import numpy as np
import pytest

from clients.client import LedgerError
from ledger import model as m
from ledger.catalog import builtin
from ledger.clock import TestClock
from ledger.engine import Engine
from ledger.errors import AlreadyExists, Unavailable
from ledger.money import Region
from ledger.store import Store, consume_entries, keyindex, keyruns
from ledger.verify import verify
from ledger.writer import Batch, Writer, unwrap

from .conftest import ServerProcess

FIXTURES = Path(__file__).parent / "fixtures"
T0 = 1_804_636_800_000_000  # 2027-03-10 08:00 UTC+8


class Ledger:
    """One store, engine and writer in process; reopened from the file by restart()."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self._open()

    def _open(self) -> None:
        self.store = Store(self.db)
        self.writer = Writer(Engine(self.store, TestClock(T0), builtin()))
        self.writer.start()

    def restart(self) -> None:
        self.close()
        self._open()

    def close(self) -> None:
        self.writer.stop()
        self.store.close()

    def call(self, cmd):
        return unwrap(self.writer.call(cmd))


def consume(account_id: str, request_id: str, qty: int = 1, region: int = 1) -> m.Consume:
    return m.Consume(account_id, request_id, Region(region), m.CaptchaType(1),
                     m.Architecture(1), m.Step(1), None, qty)


def outcome(r) -> tuple:
    return (r.allocations, r.payg_units, r.payg_amount_micros, r.billing_day, r.recorded_at_us,
            r.plan_units_remaining, r.journal_seq)


@pytest.fixture(params=["whole", "sliced"])
def small_index(monkeypatch, request):
    """Runs every 40 keys, a filter snapshot every 2 runs, a small filter, pages of 8 keys;
    "sliced": a run written 2 pages and the snapshot 1,000 bytes per group commit (issue
    19), so runs and snapshots stay pending across several groups, restarts included."""
    monkeypatch.setattr(keyindex, "MEMTABLE_KEYS_MAX", 40)
    monkeypatch.setattr(keyindex, "FILTER_SNAPSHOT_EVERY_RUNS", 2)
    monkeypatch.setattr(keyindex, "FILTER_KEYS", 10_000)
    monkeypatch.setattr(keyindex, "PAGE_KEYS", 8)
    if request.param == "sliced":
        monkeypatch.setattr(keyindex, "RUN_PAGES_PER_COMMIT", 2)
        monkeypatch.setattr(keyindex, "FILTER_BYTES_PER_COMMIT", 1_000)


def test_r12_keys_replay_from_memtable_runs_and_after_restarts(tmp_path, small_index):
    """Every key replays its first result exactly, whether it sits in the memtable, in a run,
    or is known again after a restart (runs, filter snapshot, memtable from the blocks)."""
    led = Ledger(tmp_path / "l.db")
    try:
        for a in ("acme", "beta"):
            led.call(m.CreateAccount(a))
            led.call(m.TopUp(a, "t", m.FundsKind.CASH, 100_000_000))
        led.call(m.PurchasePlan("acme", "p", "month-100k"))
        keys = [(("acme", "beta")[i % 2], str(uuid.uuid4())) for i in range(250)]
        qty = {key: 1 + i % 3 for i, key in enumerate(keys)}
        first = {}
        for i in range(0, len(keys), 23):  # groups of 23: blocks of several items
            outs = led.writer.call(Batch([consume(*k, qty[k]) for k in keys[i:i + 23]]))
            first.update(zip(keys[i:i + 23], map(unwrap, outs), strict=True))
        runs = led.store.keys.runs
        assert len(runs) >= 4 and led.store.keys.memtable  # both paths are exercised
        for round_ in ("live", "restarted", "restarted twice"):
            if round_ != "live":
                led.restart()
            again = led.writer.call(Batch([consume(*k, qty[k]) for k in keys]))
            for key, r in zip(keys, map(unwrap, again), strict=True):
                assert r.replayed, (round_, key)
                assert outcome(r) == outcome(first[key]), (round_, key)
        with pytest.raises(AlreadyExists) as err:  # the same key, other content (R12)
            led.call(consume(*keys[0], qty=9))
        assert err.value.reason == "IDEMPOTENCY_KEY_REUSED"
    finally:
        led.close()
    assert verify(str(tmp_path / "l.db")).ok


def test_r12_lone_keys_are_probed_one_by_one_as_in_a_group(tmp_path, small_index,
                                                           monkeypatch):
    """A lone call's key is hashed and probed in the filter without numpy (issue 18): old
    keys still replay from the memtable, a run or after a restart, new keys stay new."""
    probes = []
    one = keyruns.Filter.contains
    monkeypatch.setattr(keyruns.Filter, "contains",
                        lambda self, h: probes.append(h) or one(self, h))
    led = Ledger(tmp_path / "l.db")
    try:
        led.call(m.CreateAccount("acme"))
        led.call(m.TopUp("acme", "t", m.FundsKind.CASH, 100_000_000))
        led.call(m.PurchasePlan("acme", "p", "month-100k"))
        keys = [("acme", str(uuid.uuid4())) for _ in range(130)]
        first = {k: led.call(consume(*k)) for k in keys}  # lone calls, groups of one
        assert len(led.store.keys.runs) >= 2 and led.store.keys.memtable
        for round_ in ("live", "restarted"):
            if round_ != "live":
                led.restart()
            for k in keys[::7]:
                r = led.call(consume(*k))
                assert r.replayed and outcome(r) == outcome(first[k]), (round_, k)
            assert not led.call(consume("acme", str(uuid.uuid4()))).replayed
        assert probes  # the one-hash probe answered them
    finally:
        led.close()


@pytest.mark.parametrize("history", [60, 0], ids=["with-runs", "empty-index"])
def test_r12_a_key_that_cannot_be_hashed_fails_alone(tmp_path, small_index, history):
    """A request id that cannot be encoded (the in-process API does not validate) fails its
    own group before its commit, whether or not the index has runs to probe yet: nothing
    of it is written, the index stays in step, and the next key is charged once and
    replays."""
    led = Ledger(tmp_path / "l.db")
    try:
        led.call(m.CreateAccount("acme"))
        led.call(m.TopUp("acme", "t", m.FundsKind.CASH, 100_000_000))
        for i in range(history):
            led.call(consume("acme", f"h{i}"))
        assert bool(led.store.keys.runs) == bool(history)
        with pytest.raises(Unavailable):
            led.call(consume("acme", "bad\ud800"))
        assert led.store.commits == 2 + history  # the bad key's group wrote nothing
        first = led.call(consume("acme", "new-1"))
        again = led.call(consume("acme", "new-1"))
        assert not first.replayed and again.replayed and outcome(again) == outcome(first)
    finally:
        led.close()
    conn = sqlite3.connect(tmp_path / "l.db")
    try:
        assert sum(e[3] == "new-1" for e in consume_entries(conn)) == 1
    finally:
        conn.close()


def test_one_hash_probe_agrees_with_the_vectorized_filter():
    """``Filter.contains`` (one hash, pure Python) answers as ``contains_many`` does, for
    the hashes a filter holds and for others, at every filter size."""
    rng = np.random.default_rng(7)
    for keys_max in (1, 50, 5_000):
        f = keyruns.Filter(keys_max=keys_max)
        added = rng.integers(-2**63, 2**63 - 1, size=keys_max, dtype=np.int64)
        f.add_many(added)
        probe = np.concatenate([added, rng.integers(-2**63, 2**63 - 1, size=2_000,
                                                    dtype=np.int64)])
        one = [f.contains(int(h)) for h in probe]
        assert one == f.contains_many(probe).tolist()
        assert all(one[:keys_max]) and not all(one)  # no false negative; not all maybes


def test_r12_hash_collisions_are_told_apart_by_the_journal(tmp_path, small_index, monkeypatch):
    """With every key hashing alike, new keys are still new and old ones still replay."""
    monkeypatch.setattr(keyindex, "hash_keys",
                        lambda keys: np.full(len(list(keys)), 7, dtype=np.int64))
    monkeypatch.setattr(keyindex, "hash_ints", lambda keys: [7] * len(list(keys)))
    led = Ledger(tmp_path / "l.db")
    try:
        led.call(m.CreateAccount("acme"))
        firsts = [led.call(consume("acme", f"k{i}")) for i in range(100)]
        assert all(not r.replayed for r in firsts)
        led.restart()
        for i in (0, 41, 99):
            r = led.call(consume("acme", f"k{i}"))
            assert r.replayed and outcome(r) == outcome(firsts[i])
        assert not led.call(consume("acme", "k100")).replayed
    finally:
        led.close()


def test_r25_a_block_never_spans_another_entry(tmp_path):
    """Consume, purchase, consume in one group: the purchase splits the block, so the
    journal keeps the order of application and rebuilds the same figures."""
    led = Ledger(tmp_path / "l.db")
    try:
        led.call(m.CreateAccount("acme"))
        led.call(m.TopUp("acme", "t", m.FundsKind.CASH, 100_000_000))
        before, bought, after = led.writer.call(Batch([
            consume("acme", "c1", 5), m.PurchasePlan("acme", "p", "month-100k"),
            consume("acme", "c2", 5)]))
        assert unwrap(before).payg_units == 5 and unwrap(after).allocations == (
            (unwrap(bought).plan_id, 5),)
    finally:
        led.close()
    conn = sqlite3.connect(tmp_path / "l.db")
    kinds = [k for (k,) in conn.execute("SELECT kind FROM journal ORDER BY seq")]
    assert kinds[-3:] == ["consume_block", "purchase", "consume_block"]
    assert [e[3] for e in consume_entries(conn)] == ["c1", "c2"]
    conn.close()
    assert verify(str(tmp_path / "l.db")).ok


def test_migration_fixture_old_entries_verify_and_old_keys_replay(tmp_path):
    """A database written by schema version 2 (one row per consume, committed as a fixture)
    migrates in place: it verifies, and its request_ids replay their original results."""
    shutil.copy(FIXTURES / "ledger-v2.db", tmp_path / "ledger.db")
    srv = ServerProcess(tmp_path).start()
    try:
        with srv.client() as c:
            check_fixture_replays(c)
    finally:
        srv.stop()
    assert verify(str(tmp_path / "ledger.db")).ok


def check_fixture_replays(c) -> None:
    """Every request recorded in the v2 fixture replays its original result exactly (R12);
    its key reused for other content is refused; a new request applies."""
    recorded = json.loads((FIXTURES / "ledger-v2.json").read_text())
    for name, r in recorded.items():
        account_id, request_id = name.split("/")
        got = c.consume(account_id, request_id=request_id, quantity=r["qty"],
                        region=r["region"], scenario_id=r["scenario"])
        assert got.replayed, name
        assert ([[a.plan_id, a.units] for a in got.allocations], got.payg_units,
                got.payg_amount_micros, got.billing_day, got.plan_units_remaining,
                got.journal_seq, got.recorded_at.ToMicroseconds()) == (
            r["alloc"], r["payg_units"], r["payg_micros"], r["day"], r["remaining"],
            r["seq"], r["at_us"]), name
    with pytest.raises(LedgerError) as err:
        c.consume("acme", request_id="c-3", quantity=21)
    assert err.value.reason == "IDEMPOTENCY_KEY_REUSED"
    fresh = c.consume("acme", request_id="c-new", quantity=2)
    assert not fresh.replayed and fresh.payg_units == 2


def test_r25_start_rehashes_a_bounded_tail_of_blocks(tmp_path):
    """At start the newest rows are re-hashed, bounded in rows and payload bytes (a block
    holds many requests): a change there is refused; an older one is verify's to find."""
    from ledger.verify import ChainBroken, check_tail

    led = Ledger(tmp_path / "l.db")
    try:
        led.call(m.CreateAccount("acme"))
        for g in range(3):
            led.writer.call(Batch([consume("acme", f"g{g}-{i}") for i in range(50)]))
    finally:
        led.close()
    conn = sqlite3.connect(tmp_path / "l.db")
    blocks_ = conn.execute("SELECT seq, length(payload) FROM journal"
                           " WHERE kind = 'consume_block' ORDER BY seq").fetchall()
    assert len(blocks_) == 3
    conn.execute("DROP TRIGGER journal_no_update")
    first, last = blocks_[0][0], blocks_[-1][0]
    conn.execute("UPDATE journal SET at_us = at_us + 1 WHERE seq = ?", (first,))
    conn.commit()
    check_tail(conn, bytes_max=blocks_[-1][1])  # only the newest block: unchanged, passes
    with pytest.raises(ChainBroken):
        check_tail(conn)  # the whole (small) journal
    conn.execute("UPDATE journal SET at_us = at_us + 1 WHERE seq = ?", (last,))
    conn.commit()
    with pytest.raises(ChainBroken):
        check_tail(conn, bytes_max=blocks_[-1][1])
    conn.close()
    assert not verify(str(tmp_path / "l.db")).ok


def test_key_filter_snapshot_is_written_and_read_back_in_chunks(tmp_path, monkeypatch):
    """R12's key filter: its snapshot (written with every FILTER_SNAPSHOT_EVERY_RUNS-th run,
    a chunk row per group commit, never as one 20 MB row) comes back bit for bit, and the
    keys of newer runs are added on top at start."""
    ki = keyindex
    monkeypatch.setattr(ki, "MEMTABLE_KEYS_MAX", 1_000)
    store = Store(tmp_path / "l.db")
    index = store.keys
    for run in range(ki.FILTER_SNAPSHOT_EVERY_RUNS + 1):
        index.add({("acme", f"r{run}-{i}"): (run + 1, i) for i in range(1_000)})
        index.flush()
    bits, through = index.filter.bits.copy(), index.filter_through_run
    store.close()
    assert through == ki.FILTER_SNAPSHOT_EVERY_RUNS
    again = Store(tmp_path / "l.db")
    try:
        assert again.keys.filter_through_run == through
        assert np.array_equal(again.keys.filter.bits, bits)
        assert again.keys.filter.contains_many([ki.key_hash("acme", "r8-999")]).tolist() == [True]
    finally:
        again.close()


def test_key_runs_written_as_rows_are_converted_to_pages_at_start(tmp_path, small_index):
    """A journal of schema 3 kept a run as a row per key (consume_keys); at start each such
    run becomes pages, fences and a filter of its own, and its keys still replay (R12)."""
    led = Ledger(tmp_path / "l.db")
    try:
        led.call(m.CreateAccount("acme"))
        firsts = {f"k{i}": led.call(consume("acme", f"k{i}")) for i in range(100)}
    finally:
        led.close()
    conn = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    runs = conn.execute("SELECT run FROM key_runs ORDER BY run").fetchall()
    assert len(runs) >= 2
    conn.execute("BEGIN")
    for (run,) in runs:  # as schema 3 wrote it: a row per key, no pages
        for data in [d for (d,) in conn.execute(
                "SELECT data FROM key_pages WHERE run = ? ORDER BY page", (run,))]:
            hs, ls = keyindex.page_arrays(data)
            conn.executemany("INSERT INTO consume_keys VALUES (?,?,?,?)", [
                (run, h, *keyindex.unpack(loc)) for h, loc in zip(hs.tolist(), ls.tolist(),
                                                                  strict=True)])
    conn.execute("DELETE FROM key_pages")
    conn.execute("UPDATE key_runs SET fences = NULL, filter = NULL")
    # and its filter's snapshot as one row, its coverage in the row's own columns
    (cover,) = conn.execute("SELECT value FROM meta WHERE key = ?",
                            (keyindex.FILTER_META_KEY,)).fetchone()
    bits = b"".join(b for (b,) in conn.execute(
        "SELECT bits FROM key_filter_chunks ORDER BY chunk"))
    through_run, keys = map(int, cover.split(":"))
    conn.execute("INSERT INTO key_filter VALUES (1, ?, ?, ?)", (through_run, keys, bits))
    conn.execute("DELETE FROM key_filter_chunks")
    conn.execute("DELETE FROM meta WHERE key = ?", (keyindex.FILTER_META_KEY,))
    conn.execute("COMMIT")
    conn.close()
    led = Ledger(tmp_path / "l.db")
    try:
        assert len(led.store.keys.runs) == len(runs)
        assert led.store.keys.filter_through_run == through_run >= 2
        for rid, first in firsts.items():
            again = led.call(consume("acme", rid))
            assert again.replayed and outcome(again) == outcome(first), rid
    finally:
        led.close()
    conn = sqlite3.connect(tmp_path / "l.db")
    assert conn.execute("SELECT count(*) FROM consume_keys").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM key_runs WHERE fences IS NULL").fetchone()[0] == 0
    conn.close()


def test_key_hash_is_fixed_blake2b_of_the_key():
    """Written key runs hold these hashes: the function must never change, or a database's
    recorded keys would stop being found (R12). BLAKE2b-64 of ``account\\0request``, UTF-8,
    big-endian signed; the many-key and few-key paths agree."""
    keys = [("acme", "r-1"), ("b", "é")]
    expected = [1085221765995904548, 8787617527441001616]
    assert keyruns.hash_keys(keys).tolist() == expected
    assert keyruns.hash_ints(keys * (keyruns.SMALL_KEYS_MAX + 1))[:2] == expected
    assert [keyruns.key_hash(a, r) for a, r in keys] == expected
