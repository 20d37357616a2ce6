"""The writer's inline path (issue 9, issue 18): a lone submission to an idle writer is run
and committed on the event loop's own thread, under the engine lock, so only its commit
(its fsync) stands between it and its reply; what the reply does not need is left for the
loop's next pass. A mixin of :class:`ledger.writer.Writer`, which holds the state it uses
(the queue, the engine lock, the last group's size and end)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .consume_group import GroupResult
from .errors import LedgerError, Stale, Unavailable
from .faults import fault, planted

if TYPE_CHECKING:
    from .writer import _Item

log = logging.getLogger("quota_ledger.writer")

_EARLY_REPLIES = planted("reply_before_commit")
# A submission this soon after the previous commit ended was waiting behind it (load): it
# goes through the queue. One that comes later, to an idle writer, is committed inline.
INLINE_GAP_S = 0.0002
_NO_CMDS: list[Any] = []  # a lone consume row's group has no commands


def callbacks_waiting(loop: asyncio.AbstractEventLoop, unknown: bool) -> bool:
    """Whether ``loop`` has callbacks waiting to run: asyncio's own queue of ready
    callbacks (``_ready``, a private deque; one ``len``, safe from another thread under the
    GIL). ``unknown`` for a loop without it. Both the inline path (issue 9) and a gathering
    group (issue 18) read the loop's backlog through here."""
    return bool(getattr(loop, "_ready", unknown))


class InlineGroups:
    """The loop-side entry points of :class:`ledger.writer.Writer` for a lone submission."""

    engine: Any
    inline: bool
    stats: Any
    _engine_lock: Any
    _last_done_s: float
    _last_items: int
    _q: Any
    _stopping: bool
    _unreported: tuple[int, float] | None
    _process: Callable[..., None]  # Writer's: run, commit and answer a group
    _finish: Callable[[], None]  # Writer's: a deferred group's after-commit work

    def _inline(self, item: _Item, loop: asyncio.AbstractEventLoop) -> bool:
        """At 1 in flight nothing but the commit (its fsync) should stand between a request
        and its reply (issue 9): no hop to the writer thread and back. Whether the item was
        run (and answered) here; see :meth:`_now`."""
        return self._now(loop, lambda: self._answer_here(item)) is not None

    def _answer_here(self, item: _Item) -> bool:
        try:
            self._process([item], direct=True, defer=True)
        except Exception:  # the group was answered; never fail the caller's loop
            log.exception("inline group failed")
        return True

    def consume_now(self, row: tuple) -> tuple[GroupResult, int] | None:
        """A single Consume's row, run and committed here on the loop when the writer is
        idle, as :meth:`submit_async` would, without its future and queue item (the lone
        call's lean path, issue 18): ``(columns, 0)``, or None when it must be submitted."""
        return self._now(asyncio.get_running_loop(), lambda: (self._lone(row), 0))

    def _now(self, loop: asyncio.AbstractEventLoop, run: Callable[[], Any]) -> Any:
        """``run()``'s result, the group run and committed here on the loop's thread, or
        None when it must be queued: only when the writer is idle (:meth:`_idle`) and
        nothing is due; the engine lock keeps the writer thread out meanwhile. What the
        reply does not need (the key index, the commit's metrics) is done once the loop
        has sent it: the handler returns first (issue 18); the next group does it first
        if it gets here sooner."""
        if not self._idle(loop) or not self._engine_lock.acquire(blocking=False):
            return None
        try:
            if self._due_now():  # settlements run threaded
                return None
            result = run()
            self.stats.inline += 1
        finally:
            self._last_done_s = time.perf_counter()
            self._engine_lock.release()
        loop.call_soon(self._finish_deferred)
        return result

    def _idle(self, loop: asyncio.AbstractEventLoop) -> bool:
        """A lone submission may be committed inline: the last group was alone, nothing is
        queued, and it did not queue up behind the previous commit."""
        return not (
            not self.inline or self._last_items > 1 or not self._q.empty() or self._stopping
            or _EARLY_REPLIES  # a planted bug (issue 23) needs replies off the loop
            # Handlers of other requests wait to run (a burst after a blocking commit), so
            # this is not a lone request. A loop not asyncio's own never commits inline.
            or callbacks_waiting(loop, unknown=True)
            or time.perf_counter() - self._last_done_s < INLINE_GAP_S)

    def _due_now(self) -> bool:
        """Due work (expiries, settlements) waits for the writer thread."""
        engine = self.engine
        due = None if engine.shared else engine.next_due_us()
        return due is not None and due <= engine.clock.now_us()

    def _lone(self, row: tuple) -> GroupResult:
        """:meth:`_process` for one consume row, under the engine lock, its after-commit
        work deferred; every failure comes back as the row's error."""
        engine = self.engine
        self._finish()
        started = time.perf_counter()
        engine.begin()
        rows = [row]
        try:
            engine.open(_NO_CMDS, rows)
            if not engine.clock.is_test_clock and not engine.shared:
                engine.run_due(engine.now())
            out = engine.consume_rows(rows)
            t0 = time.perf_counter()
            engine.commit(True)
            done = time.perf_counter()
        except Stale:  # lost to another node: nothing written; again, on the locked path
            self.stats.group_s += time.perf_counter() - started
            return self._lone(row)
        except LedgerError as exc:  # nothing of it is written
            engine.abort()
            return GroupResult.failed(1, exc)
        except Exception as exc:
            engine.abort()
            log.exception("lone group failed")
            return GroupResult.failed(1, Unavailable(f"internal error: {exc!r}",
                                                     reason="INTERNAL"))
        except BaseException:
            engine.abort()
            raise
        fault("after_commit")
        self.stats.group_s += done - started
        self._unreported = (1, done - t0)
        return out

    def _finish_deferred(self) -> None:
        """On the loop, after an inline group's reply: its after-commit work, unless the
        writer thread holds the engine now (it does the work before it lets go)."""
        if not self._engine_lock.acquire(blocking=False):
            return
        try:
            self._finish()
        finally:
            self._engine_lock.release()
