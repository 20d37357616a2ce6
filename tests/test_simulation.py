"""Seeded simulation over the wire against an in-memory reference ledger (issue "Trust").

:func:`simulate` (tests/sim_driver.py) draws from ``random.Random(seed)`` a run of every kind of
request (tests/sim_ops.py), clock moves and graceful and SIGKILL restarts, and sends each one
through :class:`LedgerClient` to a real ``--test-clock`` server and to :class:`RefLedger`
(tests/sim_model.py), a model that restates RULES.md and docs/decisions.md and imports nothing
from ``ledger``. Every answer and, after every step, every figure is compared; after a seed's
run the journal must pass ``ledger.verify`` (R25). The rules' numbers and the calendar are in
tests/sim_rules.py, the reply views and comparisons in tests/sim_compare.py.

A failure raises ``AssertionError("simulation diverged: seed=S step=N ...")`` with the last steps
and the command that replays it:

    SIM_SEED=S SIM_STEPS=N+1 .venv/bin/python -m pytest -q \
        tests/test_simulation.py::test_simulation_seeds

(add ``-k sqlite`` or ``-k postgres`` for one backend). Knobs: ``SIM_SEED`` (run that one seed),
``SIM_STEPS`` (steps per seed), ``SIM_SEEDS`` (how many seeds the long run draws; setting it
also enables that run, as does ``-m slow``).

Every test runs on both backends (issue 11) through the ``db`` fixture: an SQLite file, or a
fresh PostgreSQL database. Restarts (graceful and SIGKILL) come back on the same database; a
test that needs several fresh ledgers in turn takes a new SQLite file for each, or empties the
PostgreSQL database between them (:func:`fresh_ledger`).
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

import pytest

from ledger.store import is_pg_url
from ledger.verify import verify

from .conftest import ServerProcess, empty_pg_ledger
from .sim_driver import run_ops, run_seed, simulate_log
from .sim_model import CReq
from .sim_ops import Advance, Consume, Create, Features, Purchase, Refund, TopUp
from .sim_rules import ACTIVE, CASH, MAINLAND, OUTSIDE, OVERDUE, PAYG_PRICE, TZ8, VOUCHER, to_us

SIM_STEPS = int(os.environ.get("SIM_STEPS", "60"))
FAST_SEEDS = [int(os.environ["SIM_SEED"])] if os.environ.get("SIM_SEED") else [1, 2, 3, 4, 5, 6]


def fresh_ledger(db: str, tmp: Path) -> str:
    """A new, empty ledger for one more run of a test: a new SQLite file under ``tmp``, or
    the test's PostgreSQL database emptied (no server may be running on it)."""
    if is_pg_url(db):
        empty_pg_ledger(db)
        return db
    return str(tmp / "ledger.db")


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_simulation_seeds(tmp_path: Path, db: str, seed: int) -> None:
    """R1-R24 over the wire: 60 seeded random steps, restarts too, equal the reference model."""
    run_seed(tmp_path, seed, SIM_STEPS, db)


def test_simulation_seed_replays_the_same_run(tmp_path: Path, db: str) -> None:
    """A seed is a replay: the same seed on a fresh server takes the same steps, same answers."""
    logs = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        srv = ServerProcess(tmp_path / run, db=fresh_ledger(db, tmp_path / run)).start()
        try:
            logs.append(simulate_log(99, 25, srv))
        finally:
            srv.stop()
    assert len(logs[0]) == 25 and logs[0] == logs[1]


def test_simulation_reports_a_divergence_with_its_steps(tmp_path: Path, db: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong model (mainland USD 0.0008) is caught at the step, with the seed and the log."""
    monkeypatch.setitem(PAYG_PRICE, MAINLAND, 800)
    srv = ServerProcess(tmp_path, db=db).start()
    ops = [Create("acme", ""), Consume(CReq("acme", "c1", MAINLAND, qty=10))]
    try:
        with pytest.raises(AssertionError) as caught:
            run_ops(ops, srv, to_us(datetime(2027, 3, 10, 10, tzinfo=TZ8)), "seed=0")
    finally:
        srv.stop()
    text = str(caught.value)
    assert text.startswith("simulation diverged: seed=0 step=1: Consume")
    assert "payg_amount: server 7000 != model 8000" in text
    assert "SIM_SEED=0 SIM_STEPS=2" in text and "Create(acct='acme'" in text


def test_simulation_refunds_to_overdue_accounts_pay_outstanding(tmp_path: Path, db: str) -> None:
    """R21 + R22 (clarified) over the wire: refunds to an overdue account (one that covers
    the debt, one that covers part of it) agree with the model step by step, then verify."""
    srv = ServerProcess(tmp_path, db=db).start()
    usd = 1_000_000
    # A plan is named by its purchase order: on SQLite its journal entry's number, on
    # PostgreSQL the purchase_order sequence shared by the nodes (1, 2).
    p1, p2 = ("plan-1", "plan-2") if srv.backend == "postgres" else ("plan-6", "plan-7")
    ops = [Create("full", ""), Create("part", ""),  # journal entries 1, 2
           TopUp("full", "t1", CASH, 60 * usd),  # 3
           Consume(CReq("part", "c1", OUTSIDE, qty=100_000)),  # 4: USD 100, before any plan
           TopUp("part", "t2", VOUCHER, 60 * usd),  # 5
           Purchase("full", "p1", "month-100k"), Purchase("part", "p2", "month-100k"),  # 6, 7
           Features("full", "f1", (), True),  # USD 5 for D, nothing left to pay it
           Advance(6 * 3_600), Advance(3_600),  # D ends at 00:00 UTC+8: both owe
           Refund(p1, "r1"), Refund(p2, "r2"), Refund(p1, "r1")]
    try:
        model = run_ops(ops, srv, to_us(datetime(2027, 3, 10, 18, tzinfo=TZ8)), "refunds")
    finally:
        srv.stop()
    assert model.refunds_paying_outstanding == 2
    full, part = model.accounts["full"], model.accounts["part"]
    assert (full.status, full.cash, full.outstanding) == (ACTIVE, 55 * usd, 0)
    assert (part.status, part.voucher, part.outstanding) == (OVERDUE, 0, 40 * usd)
    assert verify(str(srv.db)).ok


@pytest.mark.slow
def test_simulation_many_seeds(tmp_path: Path, db: str, request: pytest.FixtureRequest) -> None:
    """R1-R24 over the wire, long run: SIM_SEEDS (100) seeds x SIM_STEPS (150) steps each."""
    markexpr = request.config.getoption("markexpr") or ""
    if "SIM_SEEDS" not in os.environ and not re.search(r"(?<!not )\bslow\b", markexpr):
        pytest.skip("long run: select it with -m slow or SIM_SEEDS=N")
    count = int(os.environ.get("SIM_SEEDS", "100"))
    steps = int(os.environ.get("SIM_STEPS", "150"))
    failures = []
    for seed in range(1_000, 1_000 + count):
        (tmp_path / str(seed)).mkdir()
        try:
            run_seed(tmp_path / str(seed), seed, steps,
                     fresh_ledger(db, tmp_path / str(seed)))
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {count} seeds diverged; the first:\n{failures[0]}"
