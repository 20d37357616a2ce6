"""Single consumes grouped on the event loop, committed on a thread (issue 18, design 3).

Under load a unary ``Consume`` used to travel to the writer thread on its own: a queue put,
and a wake-up of the writer for nearly every request, since grpc.aio hands the loop about
one call per pass. Here the loop keeps the single consume rows that arrive while a group of
them is being committed, and runs them through the engine itself as the next group, the
moment that commit ends: one hand-off to the commit thread and one wake-up of the loop a
group, none a request (``python -m tests.bench_designs`` measured the research prototype of
this design at 0.97x the no-op server at 64 in flight, against 0.88x for the writer
thread).

The engine lock is taken (never waited for: the loop must not block) before the group runs
and given back only when its commit has ended and its replies are out, so the writer thread
never sees the engine ahead of the database, and no group is computed on top of one not yet
committed: a failed commit fails its own group only, and the engine reloads (R11: no reply
before its commit). When the writer holds the lock, or due work waits (expiries and
settlements run on the writer), or its queue holds work, the rows go the writer's way
through its queue, as before.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .errors import LedgerError, Unavailable
from .faults import fault
from .threads import name_this_thread

if TYPE_CHECKING:
    from .writer import Writer, _Item

COMMIT_THREAD_NAME = "ledger-commit"


class LoopGroups:
    """The pending single rows of one event loop, and the group in flight."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.pending: list[_Item] = []
        self.busy = False  # a group holds the engine lock, its commit under way
        self.groups = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=COMMIT_THREAD_NAME,
                                        initializer=name_this_thread)

    def add(self, item: _Item, loop: asyncio.AbstractEventLoop) -> None:
        self.pending.append(item)
        if not self.busy:
            self.next(loop)

    def next(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the pending rows as one group and start its commit; or, when the engine is
        the writer's or due work waits, send them to the writer's queue."""
        w = self.writer
        if not self.pending:
            return
        engine = w.engine
        # The writer first when it has work waiting (a batch, a command): the loop would
        # otherwise take the lock back each time it gives it up, and starve it.
        if w._stopping or not w._q.empty() or not w._engine_lock.acquire(blocking=False):
            self._to_queue()
            return
        due = engine.next_due_us()
        if due is not None and due <= engine.clock.now_us():
            w._engine_lock.release()
            self._to_queue()
            return
        group, self.pending = self.pending, []
        self.busy = True
        started = time.perf_counter()
        try:
            engine.begin()
            engine.open([], [item.cmd for item in group])
            shared = engine.consume_rows([item.cmd for item in group])
        except BaseException as exc:  # nothing written; the engine reloads
            engine.abort()
            self._done(loop, group, None, exc)
            if not isinstance(exc, Exception):
                raise
            return
        outcomes = [(shared, j) for j in range(len(group))]
        done = loop.run_in_executor(self._pool, self._commit, len(group), started)
        done.add_done_callback(lambda f: self._done(loop, group, outcomes, f.exception()))

    def _commit(self, n: int, started: float) -> None:
        """On the commit thread: the open group's commit (engine.commit reloads the engine
        when it fails), then the writer's counters."""
        w = self.writer
        t0 = time.perf_counter()
        w.engine.commit()
        fault("after_commit")
        w._count_commit(n, time.perf_counter() - t0, started)

    def _done(self, loop: asyncio.AbstractEventLoop, group: list[_Item],
              outcomes: list[Any] | None, exc: BaseException | None) -> None:
        """On the loop: the group's replies (after its commit), the lock given back, the
        next group started."""
        from .writer import Outcome, _failed_all, _resolve_all

        w = self.writer
        if exc is not None:
            if not isinstance(exc, LedgerError):
                exc = Unavailable(f"internal error: {exc!r}", reason="INTERNAL")
            failed = Outcome(error=exc)
            outcomes = [_failed_all(item, failed) for item in group]
        self.groups += 1
        w._last_items = len(group)
        w._last_done_s = time.perf_counter()
        self.busy = False
        w._engine_lock.release()
        _resolve_all([(item.future, o) for item, o in zip(group, outcomes, strict=True)])
        if self.pending:
            self.next(loop)

    def _to_queue(self) -> None:
        """The pending rows through the writer's queue (its refusal answers them)."""
        from .writer import Outcome, _failed_all, _resolve_all

        pending, self.pending = self.pending, []
        for item in pending:
            try:
                self.writer._put(item)
            except LedgerError as exc:
                _resolve_all([(item.future, _failed_all(item, Outcome(error=exc)))])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
