"""The single writer: group commit behind a bounded queue.

Every state-changing command goes through one engine, one group at a time. The writer
thread takes whatever is waiting (up to ``GROUP_REQUESTS_MAX`` requests), runs each through
the engine, commits them all in one transaction and one fsync, and only then answers them:
no reply before its commit (R11). A full queue fails fast with ``Overloaded`` instead of
waiting without limit.

Groups are formed on purpose (issue 9): when the previous group held several submissions,
their callers are about to come back, so the writer waits for as many, at most
``LINGER_S_MAX``, asleep until the submission that completes them wakes it; after a lone
submission it never waits. After many (``GATHER_FROM``), it also keeps gathering while the
submitting event loop has callbacks waiting to run (issue 18). And a lone submission to an
idle writer (1 in flight) does not travel at all: it is run and committed on the submitting
thread, under the same engine lock, so only the commit stands between it and its reply.

A single Consume is submitted as its consume row (a plain tuple, issue 18): the group's
single rows run through the engine as one consume group, and each caller gets the group's
columns and its own index, ``(GroupResult, j)``. A ConsumeBatch's ``ConsumeRows`` run as a
group of their own; administrative commands run one by one.

Answers go back in one hop per group: asyncio futures are resolved through one
``call_soon_threadsafe`` per event loop (directly when committed on the loop's own thread);
``concurrent.futures`` futures directly.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from .consume_group import ConsumeRows, GroupResult
from .engine import Engine
from .errors import LedgerError, Overloaded, Stale, Unavailable
from .faults import PLANT_COMMIT_DELAY_S, fault
from .threads import name_this_thread
from .writer_inline import (  # noqa: F401
    _EARLY_REPLIES,
    INLINE_GAP_S,
    InlineGroups,
    callbacks_waiting,
)

log = logging.getLogger("quota_ledger.writer")

# The garbage collector (issue 19): a consume group allocates thousands of small containers,
# so CPython's default (a young collection every 700) ran 7 collections a group, and full
# ones paused the writer 40 ms. The state loaded at start is frozen out of every collection,
# and the thresholds are raised: nothing on the hot path makes reference cycles.
GC_THRESHOLDS = (50_000, 20, 10)
QUEUE_DEPTH_MAX = 10_000  # queued submissions (a batch counts once)
GROUP_REQUESTS_MAX = 4_096  # requests committed together at most
IDLE_WAKE_S = 0.5  # how often an idle writer looks for due work (expiries, settlements)
LINGER_S_MAX = 0.001  # under load, how long a group waits at most for its callers to return
# Gathering (issue 18): after a group of at least GATHER_FROM submissions (many callers), a
# group waits for as many as last time and then, while the loop that submits still has
# callbacks waiting to run (handlers about to submit), for more, looking every GATHER_GAP_S;
# the whole wait ends about GATHER_S_MAX after it began (each look takes the GIL back, so a
# busy loop may stretch that a little). Waiting for as many for only LINGER_S_MAX there
# lost the gain: groups shrank back (docs/performance.md, sixteenth sitting). A commit costs
# the writer about 500-800 µs of CPU whatever its size (GIL handoffs with the loop, the
# fsync): at 64 in flight, groups of about 22 instead of 12 took a quarter off the writer's
# CPU a call and a sixth off the server's (docs/performance.md, sixteenth sitting). With
# fewer callers the loop goes quiet and the group closes.
GATHER_FROM = 8
GATHER_GAP_S = 0.0002
GATHER_S_MAX = 0.003


class Batch(list):
    """Several commands submitted as one queue item; answered with :class:`BatchOutcomes`."""


class BatchOutcomes(list):
    """A batch's outcomes in order, with ``at_us``: the ledger's instant of the transaction
    that ran the batch (0 when it never ran, e.g. the commit failed)."""

    at_us = 0


@dataclass(slots=True)
class Outcome:
    value: Any = None
    error: BaseException | None = None


@dataclass(slots=True)
class _Item:
    cmd: Any
    future: Any  # asyncio.Future or concurrent.futures.Future
    size: int = 1


def tune_gc() -> None:
    """Before the writer starts: collect once, freeze what is loaded, raise the thresholds
    (GC_THRESHOLDS). The server does it, and so does any bench that measures the writer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass
class WriterStats:
    commits: int = 0
    requests: int = 0
    last_commit_s: float = 0.0
    inline: int = 0  # groups committed inline (an idle writer's lone submission)
    group_s: float = 0.0  # groups' time from their opening to their commit's end, in all


class Writer(InlineGroups):
    def __init__(self, engine: Engine, *, queue_depth_max: int = QUEUE_DEPTH_MAX,
                 group_requests_max: int = GROUP_REQUESTS_MAX,
                 on_commit: Callable[[int, float], None] | None = None,
                 linger_s_max: float = LINGER_S_MAX, gather_s_max: float = GATHER_S_MAX) -> None:
        self.engine = engine
        # A SimpleQueue (C): a put costs the loop a fraction of queue.Queue's Python-level
        # locks and condition. The bound is checked against its size before each put, so
        # threads putting at the same instant may pass it by one item each.
        self._q: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self.queue_depth_max = queue_depth_max
        self.group_requests_max = group_requests_max
        self.linger_s_max = linger_s_max
        self.gather_s_max = gather_s_max
        self.on_commit = on_commit
        self.stats = WriterStats()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._stopping = False
        self._last_items = 0  # submissions in the previous group: the callers under load
        self._last_done_s = 0.0  # when the previous commit ended (perf_counter)
        self._engine_lock = threading.Lock()  # one thread in the engine: writer or inline
        self.inline = True
        # A lingering writer sleeps until as many submissions as it waits for are queued
        # (``_need``, set by it; the submitter that reaches it wakes it once), not once per
        # submission: each wake-up of the thread is a GIL handoff (issue 18).
        self._enough = threading.Event()
        self._need = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Answer everything already queued, then stop."""
        self._stopping = True
        self._q.put(None)
        self._enough.set()
        self._thread.join(timeout_s)
        if self._engine_lock.acquire(timeout=timeout_s):  # an inline group's deferred work
            try:
                self._finish()
            finally:
                self._engine_lock.release()
        else:
            log.warning("the writer did not stop within %.1f s", timeout_s)

    def depth(self) -> int:
        return self._q.qsize()

    # ------------------------------------------------------------------ submitting

    def submit_async(self, cmd: Any) -> asyncio.Future[Any]:
        """The answer comes back through the future; an idle writer's lone submission is
        committed here, on the caller's thread, and comes back already answered."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        item = _Item(cmd, fut, len(cmd) if isinstance(cmd, list) else 1)
        if not self._inline(item, loop):
            self._put(item)
        return fut

    def _finish(self) -> None:
        """Under the engine lock: a deferred group's after-commit work and its metrics.
        Never fails the group that runs it: a failure is logged, and the store rebuilds
        its key index before the next lookup (or fails that group, writing nothing)."""
        try:
            self.engine.finish()
        except Exception:
            log.exception("after-commit work failed")
        done, self._unreported = self._unreported, None
        if done is not None:
            self._report(*done)

    _unreported: tuple[int, float] | None = None

    def submit(self, cmd: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self._put(_Item(cmd, fut, len(cmd) if isinstance(cmd, list) else 1))
        return fut

    def call(self, cmd: Any, timeout_s: float = 30.0) -> Any:
        """Blocking helper for tools and tests."""
        return self.submit(cmd).result(timeout_s)

    def _put(self, item: _Item) -> None:
        if self._stopping:
            raise Unavailable("the ledger is shutting down", reason="SHUTTING_DOWN")
        if self._q.qsize() >= self.queue_depth_max:
            raise Overloaded(
                f"the ledger's write queue is full ({self.queue_depth_max} waiting); retry"
                " shortly", reason="QUEUE_FULL")
        self._q.put(item)
        need = self._need
        if need and self._q.qsize() >= need:  # the lingering writer's group is here
            self._need = 0
            self._enough.set()

    # ------------------------------------------------------------------ the loop

    def _take_group(self) -> tuple[list[_Item], bool]:
        with self._engine_lock:
            self._finish()  # an inline group's, if the loop's callback found the lock taken
            due = self.engine.next_due_us()
        wait = IDLE_WAKE_S
        if due is not None and not self.engine.clock.is_test_clock and not self.engine.shared:
            wait = max(0.0, min(wait, (due - self.engine.clock.now_us()) / 1e6))
        try:
            first = self._q.get(timeout=wait)
        except queue.Empty:
            return [], False
        if first is None:
            return [], True
        group, size, stop = [first], first.size, False
        # Deliberate groups: when the previous group held several submissions, their callers
        # are coming back; wait for as many (at most LINGER_S_MAX) so that one commit serves
        # them all. After a lone submission (idle, 1 in flight), commit at once. After many,
        # keep gathering while more are on their way (:func:`_submitters_busy`).
        want, deadline = self._last_items, 0.0
        gather = want >= GATHER_FROM
        while size < self.group_requests_max:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                now = time.perf_counter()
                if not deadline:  # after many, the whole wait is bounded by gather_s_max
                    deadline = now + (self.gather_s_max if gather else self.linger_s_max)
                if len(group) >= want:
                    if not gather or now >= deadline or not _submitters_busy(first):
                        break
                    time.sleep(min(GATHER_GAP_S, deadline - now))
                    continue
                if now >= deadline:
                    break
                self._enough.clear()
                self._need = want - len(group)
                if self._q.qsize() < self._need:  # else they came meanwhile
                    self._enough.wait(deadline - now)
                self._need = 0
                continue
            if item is None:
                stop = True
                break
            group.append(item)
            size += item.size
        self._last_items = len(group)
        return group, stop

    def _run(self) -> None:
        name_this_thread()
        stop = False
        while not stop:
            group, stop = self._take_group()
            try:
                with self._engine_lock:
                    if group or not self.engine.shared:
                        self._process(group)
                    else:
                        self._finish()
                    self._due_shared()
            except Exception:  # never let the writer die: answer and go on
                log.exception("writer group failed")
            finally:
                self._last_done_s = time.perf_counter()
        self._drain_after_stop()

    def _due_shared(self) -> None:
        """A shared store (several nodes): expiries, settlements and suspensions run in a
        group of their own, at most every IDLE_WAKE_S, by whichever node gets there first
        (the others find the settlement lock taken and go on)."""
        engine = self.engine
        if (not engine.shared or engine.clock.is_test_clock
                or time.perf_counter() - self._last_due_s < IDLE_WAKE_S):
            return
        self._last_due_s = time.perf_counter()
        engine.begin()
        try:
            if engine.open_due():
                engine.run_due(engine.now())
                engine.commit()
            else:
                engine.uow = None
        except LedgerError as exc:
            engine.abort()
            log.warning("due work failed", extra={"event": "due_failed", "error": str(exc)})
        except BaseException:
            engine.abort()
            raise

    _last_due_s = 0.0

    def _drain_after_stop(self) -> None:
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                with self._engine_lock:
                    self._process([item])

    def _process(self, group: list[_Item], direct: bool = False, defer: bool = False) -> None:
        """Run and commit one group, then answer it (``direct``: on the futures' own loop;
        ``defer``: its after-commit work and metrics wait for :meth:`_finish`)."""
        engine = self.engine
        self._finish()  # the previous group's, if it was deferred
        started = time.perf_counter()
        engine.begin()
        outcomes: list[Any] = []
        replied = False
        try:
            engine.open(*_flatten(group))
            if not engine.clock.is_test_clock and not engine.shared:  # shared: _due_shared
                engine.run_due(engine.now())
            # Single consumes (a row tuple each: the unary hot path, issue 18) run as one
            # consume group, first: they were all in flight at once, so no order among them
            # or against the group's other commands was ever promised; each gets its
            # (columns, index).
            singles = [item.cmd for item in group if type(item.cmd) is tuple]
            shared = engine.consume_rows(singles) if singles else None
            j = 0
            for item in group:
                if type(item.cmd) is tuple:
                    outcomes.append((shared, j))
                    j += 1
                elif type(item.cmd) is ConsumeRows:  # one call for the batch
                    outcomes.append(engine.consume_rows(item.cmd))
                elif isinstance(item.cmd, Batch):
                    done = BatchOutcomes([self._one(c) for c in item.cmd])
                    done.at_us = engine.now()
                    outcomes.append(done)
                else:
                    outcomes.append(self._one(item.cmd))
            if _EARLY_REPLIES:  # planted bug "reply_before_commit" (issue 23): R11 broken
                self._deliver(group, outcomes, direct)
                replied = True
                time.sleep(PLANT_COMMIT_DELAY_S)
            t0 = time.perf_counter()
            engine.commit(defer)
            done = time.perf_counter()
            elapsed = done - t0
            self.stats.group_s += done - started
        except Stale:  # an optimistic group lost to another node: nothing written or sent
            if replied:
                raise
            self.stats.group_s += time.perf_counter() - started  # the lost attempt's time
            self._process(group, direct, defer)  # again, on the locked path (shared.lost)
            return
        except LedgerError as exc:  # the commit failed: nothing of this group is written
            engine.abort()
            failed = Outcome(error=exc)
            if not replied:
                self._deliver(group, [_failed_all(i, failed) for i in group], direct)
            return
        except BaseException as exc:
            engine.abort()
            failed = Outcome(error=Unavailable(f"internal error: {exc!r}", reason="INTERNAL"))
            if not replied:
                self._deliver(group, [_failed_all(i, failed) for i in group], direct)
            raise
        fault("after_commit")
        if not replied:
            self._deliver(group, outcomes, direct)
        if not group:  # an idle wake-up (due work only): not a group commit
            return
        n = sum(i.size for i in group)
        if defer:
            self._unreported = (n, elapsed)
        else:
            self._report(n, elapsed)

    def _report(self, n: int, elapsed: float) -> None:
        self.stats.commits += 1
        self.stats.requests += n
        self.stats.last_commit_s = elapsed
        if self.on_commit is not None:
            self.on_commit(n, elapsed)

    def _one(self, cmd: Any) -> Outcome:
        try:
            return Outcome(value=self.engine.execute(cmd))
        except LedgerError as exc:
            return Outcome(error=exc)

    @staticmethod
    def _deliver(group: list[_Item], outcomes: list[Any], direct: bool = False) -> None:
        per_loop: dict[Any, list[tuple[asyncio.Future[Any], Any]]] = defaultdict(list)
        for item, outcome in zip(group, outcomes, strict=True):
            if isinstance(item.future, Future):
                item.future.set_result(outcome)
            elif direct:
                _resolve_all([(item.future, outcome)])
            else:
                per_loop[item.future.get_loop()].append((item.future, outcome))
        for loop, pairs in per_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, pairs)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass


def _flatten(group: list[_Item]) -> tuple[list[Any], list[tuple]]:
    """A group's commands, and its consume rows (a lone batch's list itself, no copy)."""
    cmds: list[Any] = []
    rows: list[tuple] = []
    for item in group:
        cmd = item.cmd
        if type(cmd) is tuple:  # one consume row (a single Consume)
            rows.append(cmd)
        elif type(cmd) is ConsumeRows:
            if rows:
                rows += cmd
            else:
                rows = cmd if len(group) == 1 else list(cmd)
        elif isinstance(cmd, Batch):
            cmds += cmd
        else:
            cmds.append(cmd)
    return cmds, rows


def _submitters_busy(item: _Item) -> bool:
    """Whether the event loop that submitted ``item`` has callbacks waiting to run (read
    from the writer's thread): handlers of requests that are about to be submitted. False
    for a thread's submission or a loop that is not asyncio's."""
    get_loop = getattr(item.future, "get_loop", None)
    return get_loop is not None and callbacks_waiting(get_loop(), unknown=False)


def _failed_all(item: _Item, failed: Outcome) -> Any:
    """The same failure for a request, or for every request of a batch."""
    if type(item.cmd) is tuple:
        return GroupResult.failed(1, failed.error), 0  # type: ignore[arg-type]
    if type(item.cmd) is ConsumeRows:
        return GroupResult.failed(len(item.cmd), failed.error)  # type: ignore[arg-type]
    return BatchOutcomes([failed] * len(item.cmd)) if isinstance(item.cmd, Batch) else failed


def _resolve_all(pairs: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for fut, outcome in pairs:
        if not fut.done():
            fut.set_result(outcome)


def unwrap(outcome: Outcome) -> Any:
    if outcome.error is not None:
        raise outcome.error
    return outcome.value
