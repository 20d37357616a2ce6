"""Single consumes grouped on the event loop and committed on a thread (issue 18, design 3):
under load they form groups on the loop, each answered only after its commit (R11), one
request's unit at a time (R8), a retry answered as its first (R12); a failed commit fails its
group alone and the next group runs on a reloaded engine; a busy writer takes them through
its queue as before."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from ledger import catalog
from ledger import model as m
from ledger.clock import TestClock
from ledger.consume_group import row_of
from ledger.engine import Engine
from ledger.errors import Unavailable
from ledger.loop_groups import COMMIT_THREAD_NAME
from ledger.money import Region
from ledger.store import Store
from ledger.writer import Writer

T0_US = 1_805_450_400_000_000  # 2027-03-16 10:00 UTC
CALLS = 200


def row(i: int, account: str = "acme") -> tuple:
    return row_of(m.Consume(account, f"r-{i}", Region.CHINESE_MAINLAND, m.CaptchaType.SLIDER,
                            m.Architecture.V2, m.Step.STEP_3))


@pytest.fixture
def store_writer(tmp_path: Path):
    store = Store(tmp_path / "ledger.db")
    w = Writer(Engine(store, TestClock(T0_US), catalog.builtin()))
    w.start()
    w.call(m.CreateAccount("acme"))
    try:
        yield store, w
    finally:
        w.stop()
        store.close()


def payg_units(store: Store) -> int:
    conn = store.reader()
    return conn.execute("SELECT coalesce(sum(payg_units), 0) FROM usage_daily").fetchone()[0]


async def _answers(w: Writer, rows: list[tuple]) -> list[tuple]:
    futs = [w.submit_async(r) for r in rows]  # all in flight at once, as under load
    return await asyncio.gather(*futs)


def test_concurrent_singles_are_grouped_on_the_loop(store_writer):
    store, w = store_writer

    async def main() -> None:
        answers = await _answers(w, [row(i) for i in range(CALLS)])
        groups = w._loops[asyncio.get_running_loop()].groups
        assert 1 <= groups < CALLS  # grouped, and on the loop
        assert all(not out.errors and out.billable[j] for out, j in answers)
        assert len({out.seq[j] for out, j in answers}) < CALLS  # blocks shared by a group
        # R12: retries of the first 20 are their replays, nothing charged again
        again = await _answers(w, [row(i) for i in range(20)])
        assert all(out.replayed[j] for out, j in again)

    asyncio.run(main())
    assert payg_units(store) == CALLS  # every acknowledged unit recorded, once


def test_a_failed_commit_fails_its_group_alone(store_writer, monkeypatch):
    store, w = store_writer
    real = store.commit
    failures = []

    def failing(uow, *args):
        if not failures:
            failures.append(len(uow.rows))
            raise Unavailable("the journal could not be written: disk full (test)")
        return real(uow, *args)

    async def main() -> None:
        await _answers(w, [row(i) for i in range(3)])  # warm: inline, then a loop group
        monkeypatch.setattr(store, "commit", failing)
        first = await _answers(w, [row(100 + i) for i in range(20)])
        failed = [j for out, j in first if j in out.errors]
        assert failed and all(isinstance(out.errors[j], Unavailable)
                              for out, j in first if j in out.errors)
        # the engine reloaded: the failed requests' units are not spent; retried, they are
        again = await _answers(w, [row(100 + i) for i in range(20)])
        assert all(not out.errors and out.billable[j] for out, j in again)
        assert sum(1 for out, j in again if not out.replayed[j]) == len(failed)

    asyncio.run(main())
    assert payg_units(store) == 3 + 20


def test_a_busy_writer_takes_them_through_its_queue(store_writer):
    store, w = store_writer

    async def main() -> None:
        await _answers(w, [row(i) for i in range(3)])
        groups = w._loops[asyncio.get_running_loop()].groups
        with w._engine_lock:  # the writer thread is in the engine
            futs = [w.submit_async(row(10 + i)) for i in range(5)]
            await asyncio.sleep(0.05)
            assert not any(f.done() for f in futs)
        answers = await asyncio.gather(*futs)
        assert all(not out.errors for out, j in answers)
        assert w._loops[asyncio.get_running_loop()].groups == groups  # none on the loop

    asyncio.run(main())
    assert payg_units(store) == 8


def test_the_commit_runs_on_its_own_thread(store_writer, monkeypatch):
    """The loop computes the group; its commit (and fsync) runs on the commit thread, so
    the loop goes on meanwhile (a lone request to an idle writer is still committed inline)."""
    store, w = store_writer
    real, threads = store.commit, []

    def recording(uow, *args):
        threads.append(threading.current_thread().name)
        return real(uow, *args)

    async def main() -> None:
        await _answers(w, [row(i) for i in range(3)])
        monkeypatch.setattr(store, "commit", recording)
        await _answers(w, [row(10 + i) for i in range(50)])

    asyncio.run(main())
    # the first may find the writer idle and be committed inline, on the loop; the others
    # were grouped on the loop and committed on the commit thread, none by the writer's
    assert threads.count("MainThread") <= 1
    assert [t for t in threads if t != "MainThread"]
    assert all(t.startswith(COMMIT_THREAD_NAME) for t in threads if t != "MainThread")
    assert payg_units(store) == 53


def test_the_writers_work_is_not_starved(store_writer):
    """Singles kept in flight on the loop without a pause: a command for the writer thread
    (here an account to create) still runs soon, since the loop leaves the engine to the
    writer whenever its queue holds work."""
    store, w = store_writer
    in_flight, rounds = 32, 40

    async def main() -> float:
        async def load() -> None:
            for k in range(rounds):  # bounded: rounds x in_flight singles
                await _answers(w, [row(1_000 + k * in_flight + i) for i in range(in_flight)])

        task = asyncio.create_task(load())
        await asyncio.sleep(0.05)  # the loop's groups under way
        t0 = time.perf_counter()
        await asyncio.wrap_future(w.submit(m.CreateAccount("beta")))
        waited = time.perf_counter() - t0
        await task
        return waited

    waited = asyncio.run(main())
    assert waited < 1.0, f"the writer's command waited {waited:.3f} s behind the loop's groups"
    assert payg_units(store) == 32 * 40
