"""Deliberate groups (issue 9): a lone submission to an idle writer is committed inline and
comes back answered; a busy writer queues it; after a group of several, the writer waits
(bounded) for as many before committing; after a lone one, it never waits."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ledger import catalog
from ledger import model as m
from ledger.clock import TestClock
from ledger.consume_group import row_of
from ledger.engine import Engine
from ledger.errors import NotFound
from ledger.money import Region
from ledger.store import Store
from ledger.writer import GATHER_FROM, Writer

T0_US = 1_805_450_400_000_000  # 2027-03-16 10:00 UTC
LINGER_S = 0.05  # the gathering writer's linger (after a group of fewer than 8)
GATHER_S = 0.3  # its bound on a group's whole wait after a group of GATHER_FROM or more


def consume(i: int) -> m.Consume:
    return m.Consume("acme", f"r-{i}", Region.CHINESE_MAINLAND, m.CaptchaType.SLIDER,
                     m.Architecture.V2, m.Step.STEP_3)


@pytest.fixture
def writer(tmp_path: Path):
    store = Store(tmp_path / "ledger.db")
    w = Writer(Engine(store, TestClock(T0_US), catalog.builtin()), linger_s_max=2.0)
    w.start()
    w.call(m.CreateAccount("acme"))
    try:
        yield w
    finally:
        w.stop()
        store.close()


def test_lone_submission_is_committed_inline(writer):
    """Idle writer: answered on return, no hop; a held engine (busy writer) queues it."""
    async def main() -> None:
        await asyncio.sleep(0.01)  # the set-up's commit is long over: idle
        fut = writer.submit_async(consume(1))
        assert fut.done() and fut.result().error is None and fut.result().value.journal_seq
        assert writer.stats.inline == 1
        with writer._engine_lock:  # the writer thread is busy with a group
            await asyncio.sleep(0.01)
            fut = writer.submit_async(consume(2))
            assert not fut.done()
        assert (await fut).value.journal_seq
        assert writer.stats.inline == 1

    asyncio.run(main())


def test_r12_an_inline_groups_after_commit_work_follows_its_reply(writer):
    """Issue 18: an inline group's reply does not wait for what follows its COMMIT (the
    keys into the key index, the commit's metrics): the loop does that on its next pass.
    Any later group does it first, so a retry that comes before the loop has run still
    replays (R12) instead of being charged again."""
    store = writer.engine.store

    async def main() -> None:
        await asyncio.sleep(0.01)  # idle
        commits = writer.stats.commits
        first = writer.submit_async(consume(40))
        assert first.done() and first.result().error is None and writer.stats.inline == 1
        assert store._unfinished is not None and writer.stats.commits == commits  # deferred
        await asyncio.sleep(0)  # the loop's next pass
        assert store._unfinished is None and writer.stats.commits == commits + 1
        assert ("acme", "r-40") in store.keys.memtable
        time.sleep(0.001)  # idle (INLINE_GAP_S)
        second = writer.submit_async(consume(41))
        assert second.done() and store._unfinished is not None
        # the retry queues (the loop has a callback ready); the engine is held while the
        # loop passes, so the writer thread's group must finish the work before its lookup
        with writer._engine_lock:
            retry = writer.submit_async(consume(41))
            await asyncio.sleep(0)
            assert not retry.done() and store._unfinished is not None
        again = (await retry).value
        assert again.replayed and again.journal_seq == second.result().value.journal_seq
        assert writer.stats.inline == 2

    asyncio.run(main())
    assert store.commits == 3  # the account, r-40 and r-41: the retry wrote nothing


@pytest.mark.parametrize("inline", [True, False], ids=["deferred", "on-the-writer-thread"])
def test_r12_keys_a_failed_after_commit_lost_are_rebuilt_from_the_journal(writer, inline):
    """The bookkeeping after a COMMIT fails (here the key index's add, as a full disk could
    make it): the committed group's key may be missing from the index, so the store
    rebuilds the index from the journal before the next lookup, and a retry replays."""
    store = writer.engine.store
    real_add, failed = store.keys.add, []

    def add_failing_once(claimed):  # noqa: ANN001, ANN202
        if not failed:
            failed.append(claimed)
            raise OSError("no space left on device (simulated)")
        return real_add(claimed)

    store.keys.add = add_failing_once

    async def main() -> None:
        await asyncio.sleep(0.01)  # idle
        if inline:
            first = writer.submit_async(consume(60))
            assert first.done() and first.result().error is None  # committed, answered
            await asyncio.sleep(0)  # the deferred work runs, and fails
        else:
            writer.inline = False
            await writer.submit_async(consume(60))  # committed; its reply may be an error
        assert failed  # (the writer thread may rebuild the index at once: not checked here)
        time.sleep(0.001)  # idle again
        retry = (await writer.submit_async(consume(60))).value
        assert retry.replayed and not store._keys_stale

    asyncio.run(main())
    assert store.commits == 2  # the account and r-60: the retry wrote nothing


def test_a_lone_consume_row_is_run_now_or_left_to_submit(writer):
    """Issue 18's lean path: an idle writer runs a single Consume's row at once and hands
    back its group's columns; a refusal comes back as the row's error; a held engine
    (a busy writer) or a loop with callbacks ready leaves it to ``submit_async``."""
    async def main() -> None:
        await asyncio.sleep(0.01)  # idle
        out, j = writer.consume_now(row_of(consume(50)))
        assert j == 0 and not out.errors and out.billable[0] and out.seq[0]
        assert writer.consume_now(row_of(consume(51))) is None  # its callback is ready
        await asyncio.sleep(0.01)
        out, _ = writer.consume_now(row_of(m.Consume(
            "nobody", "r-52", Region.CHINESE_MAINLAND, m.CaptchaType.SLIDER,
            m.Architecture.V2, m.Step.STEP_3)))
        assert isinstance(out.errors[0], NotFound) and not out.seq[0]
        await asyncio.sleep(0.01)
        with writer._engine_lock:
            assert writer.consume_now(row_of(consume(53))) is None
        assert writer.stats.inline == 2

    asyncio.run(main())


def test_linger_only_after_a_group_of_several(writer):
    """After a group of 3 the writer waits for 3 submissions (up to its linger) and commits
    them together; after a group of 1 it commits at once."""
    writer.inline = False
    with writer._engine_lock:  # hold the writer while three pile up: one group of 3
        futs = [writer.submit(consume(10 + i)) for i in range(3)]
        time.sleep(0.05)
    assert [f.result(10).value.journal_seq for f in futs]
    commits = writer.stats.commits
    first = writer.submit(consume(20))
    time.sleep(0.2)
    assert not first.done()  # lingering for the other two callers
    started = time.perf_counter()
    late = [writer.submit(consume(21 + i)) for i in range(2)]
    assert all(f.result(10).error is None for f in [first, *late])
    # the submission that completes the group wakes the writer: no sleep to the linger's end
    assert time.perf_counter() - started < 1.0
    assert writer.stats.commits == commits + 1  # one commit for the three
    lone = writer.submit(consume(30))  # previous group was 3: waits; then a group of 1
    lone.result(10)
    started = time.perf_counter()
    writer.submit(consume(31)).result(10)  # previous group was 1: no wait
    assert time.perf_counter() - started < 1.0


@pytest.fixture
def gathering(tmp_path: Path):
    """A writer whose waits are long enough (GATHER_S, LINGER_S; in service GATHER_S_MAX is
    3 ms, LINGER_S_MAX 1 ms) that the test sees what ends a group, not the clock."""
    store = Store(tmp_path / "ledger.db")
    w = Writer(Engine(store, TestClock(T0_US), catalog.builtin()), linger_s_max=LINGER_S,
               gather_s_max=GATHER_S)
    w.start()
    w.call(m.CreateAccount("acme"))
    w.inline = False
    try:
        yield w
    finally:
        w.stop()
        store.close()


async def _group_of_many(w: Writer, first: int) -> None:
    """Hold the writer while GATHER_FROM submissions pile up: one group of that many."""
    with w._engine_lock:
        futs = [w.submit_async(consume(first + i)) for i in range(GATHER_FROM)]
        await asyncio.sleep(0.05)
    assert all(o.error is None for o in await asyncio.gather(*futs))
    await asyncio.sleep(0.05)  # the writer counts a commit after its replies


def test_issue_18_after_many_a_group_gathers_while_the_loop_is_busy(gathering):
    """After a group of GATHER_FROM submissions, a group that has as many keeps gathering
    while the submitting loop has callbacks waiting (requests about to be submitted): the
    two that come 50 ms later join it, one commit for all. Once the loop is quiet, the
    group closes without waiting for the rest of its GATHER_S."""
    w = gathering

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await _group_of_many(w, 100)
        commits = w.stats.commits
        busy = True

        def spin() -> None:  # keeps a callback in the loop's ready queue
            if busy:
                loop.call_soon(spin)

        loop.call_soon(spin)
        futs = [w.submit_async(consume(200 + i)) for i in range(GATHER_FROM)]
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in futs)  # as many as last time, still gathering
        futs += [w.submit_async(consume(300 + i)) for i in range(2)]
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        busy = False
        assert all(o.error is None for o in await asyncio.gather(*futs))
        assert time.perf_counter() - started < GATHER_S / 3  # closed by the quiet loop
        await asyncio.sleep(0.05)  # the writer counts a commit after its replies
        assert w.stats.commits == commits + 1  # one commit for the ten

    asyncio.run(main())


def test_issue_18_a_quiet_loop_closes_the_group_at_as_many_as_last_time(gathering):
    """The same, the loop quiet: the group closes once it has as many as the previous one
    (no gathering), and a later lone submission is a commit of its own. Waiting for as many
    as the group of many before it, it waits at most GATHER_S (not for ever, and after a
    group of fewer, at most LINGER_S)."""
    w = gathering

    async def main() -> None:
        await _group_of_many(w, 400)
        commits = w.stats.commits
        futs = [w.submit_async(consume(500 + i)) for i in range(GATHER_FROM)]
        started = time.perf_counter()
        assert all(o.error is None for o in await asyncio.gather(*futs))
        assert time.perf_counter() - started < GATHER_S / 3  # closed at as many, no wait
        await asyncio.sleep(0.05)  # the writer counts a commit after its replies
        assert w.stats.commits == commits + 1
        started = time.perf_counter()
        late = await w.submit_async(consume(600))
        assert GATHER_S * 0.9 <= time.perf_counter() - started < GATHER_S * 3
        await asyncio.sleep(0.05)
        assert late.error is None and w.stats.commits == commits + 2
        started = time.perf_counter()  # the previous group was 1: no wait at all
        assert (await w.submit_async(consume(601))).error is None
        assert time.perf_counter() - started < LINGER_S

    asyncio.run(main())
