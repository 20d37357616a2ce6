"""The SQLite WAL starts over under steady load (issue 18).

SQLite restarts its WAL only at a write that begins when every frame is checkpointed; the
checkpointer's thread never sees that moment while the writer commits back to back, so the
WAL grew without end and every commit appended to a longer file. The writer now checkpoints
the few frames it wrote since each of the thread's runs, and its next transaction starts
the WAL over: the WAL header's salt (bytes 16-24) changes at each restart.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ledger import catalog
from ledger import model as m
from ledger.clock import TestClock
from ledger.engine import Engine
from ledger.money import Region
from ledger.store.sqlite import Store
from ledger.writer import Writer

T0_US = 1_805_450_400_000_000  # 2027-03-16 10:00 UTC
CHECKPOINTER_RUNS = 4  # the load lasts until the checkpointer ran this often
LOAD_S_MAX = 20.0
WAL_SALT = slice(16, 24)


def _salt(db: Path) -> bytes:
    with open(f"{db}-wal", "rb") as f:
        return f.read(32)[WAL_SALT]


def _steady_load(tmp_path: Path) -> tuple[set[bytes], int]:
    """Consumes committed back to back until the checkpointer ran CHECKPOINTER_RUNS times;
    the WAL salts seen meanwhile, and the commits made."""
    db = tmp_path / "ledger.db"
    store = Store(db)
    writer = Writer(Engine(store, TestClock(T0_US), catalog.builtin()))
    writer.start()
    try:
        writer.call(m.CreateAccount("acme"))
        writer.call(m.TopUp("acme", "t", m.FundsKind.CASH, 10**12))
        assert store._checkpointer is not None
        runs0, salts, i = store._checkpointer.runs, set(), 0
        deadline = time.monotonic() + LOAD_S_MAX
        while (store._checkpointer.runs < runs0 + CHECKPOINTER_RUNS
               and time.monotonic() < deadline):
            writer.call(m.Consume("acme", f"r-{i}", Region.CHINESE_MAINLAND,
                                  m.CaptchaType.SLIDER, m.Architecture.V2, m.Step.STEP_3))
            salts.add(_salt(db))
            i += 1
        assert store._checkpointer.runs >= runs0 + CHECKPOINTER_RUNS, "the load was too short"
        return salts, i
    finally:
        writer.stop()
        store.close()


def test_the_wal_starts_over_under_steady_load(tmp_path: Path):
    salts, commits = _steady_load(tmp_path)
    assert len(salts) >= CHECKPOINTER_RUNS - 1, (len(salts), commits)


def test_without_the_writers_checkpoint_it_would_not(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    """The check above can fail: with the writer's checkpoint taken out, the WAL keeps
    growing under the same load."""
    monkeypatch.setattr(Store, "restart_wal", lambda self: None)
    salts, commits = _steady_load(tmp_path)
    assert len(salts) < CHECKPOINTER_RUNS - 1, (len(salts), commits)
