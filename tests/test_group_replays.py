"""A retry that lands in the same commit group as its own first attempt (the first one's
reply was lost while it waited in the queue, and the client sent it again) is a replay
of what the group did so far, on both backends. On PostgreSQL a purchase's replay answered
NOT_FOUND, and a refund's the plan as the database still had it: the plan was looked up
in the database, which did not have the group's rows yet. Issue 23's history checker
found it (seed 102)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger import catalog
from ledger import model as m
from ledger.clock import TestClock
from ledger.engine import Engine, Replayed
from ledger.model import FundsKind
from ledger.store import open_store
from ledger.writer import Writer

T0_US = 1_805_450_400_000_000  # 2027-03-16 10:00 UTC


@pytest.fixture
def writer(db: str):
    store = open_store(db)
    w = Writer(Engine(store, TestClock(T0_US), catalog.builtin()))
    w.inline = False
    w.start()
    w.call(m.CreateAccount("acme"))
    w.call(m.TopUp("acme", "up", FundsKind.CASH, 200_000_000))
    try:
        yield w
    finally:
        w.stop()
        store.close()


def one_group(writer: Writer, cmds: list) -> list:
    """Submit every command while the writer is held: they commit as one group."""
    with writer._engine_lock:
        futures = [writer.submit(c) for c in cmds]
    return [f.result(30) for f in futures]


def test_a_purchase_retried_in_its_own_group_replays_it(writer: Writer, tmp_path: Path):
    buy = m.PurchasePlan("acme", "buy-1", "month-100k")
    first, again = one_group(writer, [buy, buy])
    assert first.error is None and again.error is None, again.error
    assert isinstance(again.value, Replayed)
    assert again.value.value.plan_id == first.value.plan_id


def test_a_refund_retried_in_its_own_group_replays_it(writer: Writer):
    plan = writer.call(m.PurchasePlan("acme", "buy-2", "month-100k")).value
    refund = m.RefundPlan(plan.plan_id, "refund-1")
    first, again = one_group(writer, [refund, refund])
    assert first.error is None and again.error is None, again.error
    assert isinstance(again.value, Replayed)
    assert again.value.value.refunded_at is not None  # the group's refund, not the database's
