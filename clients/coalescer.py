"""Coalescing: concurrent ``consume()`` calls of one client share ``ConsumeBatch`` calls.

One unary call per verification caps a process at the per-call cost of gRPC; the ledger
takes batches far faster. Both clients coalesce by default (``batching=False`` opts out,
issue 18): a client's ``Consume`` goes through a coalescer that has the signature of a stub
method (``(request, timeout, metadata)``), so the client's retries, deadlines and spool
apply to each caller as before.

- Nothing in flight and nobody waiting: the call is sent at once, alone, as the unary
  ``Consume`` it would have been without batching, from the caller's own task or thread
  (no linger, no hop), so a caller at low rates sees no added latency. Without a ``unary``
  sender (tests), it leaves as a batch of one on the next turn of the event loop (async) or
  by the sender thread (sync).
- While calls are in flight, calls wait at most ``linger_s`` (or until ``batch_size_max``
  are waiting) and then leave together; at most ``BATCHES_IN_FLIGHT_MAX`` batches at once.
  When fewer than ``PIPELINE_BATCHES`` are in flight, the waiting calls leave as that many
  batches (none under ``PIPELINE_SPLIT_MIN`` calls), so the client's work on one batch's
  answers overlaps the ledger's work on another.
- Each caller gets its own result or its own ``LedgerError``; one bad item fails only its
  caller. Batches ask for the FULL view, so a coalesced caller's answer is the one a unary
  call would give; ``compact_answers=True`` asks for COMPACT (cheaper on both sides, but no
  ``allocations`` nor ``plan_units_remaining``: clients/outcomes.py). A batch's deadline is
  the latest of its callers'; each caller still stops waiting at its own deadline
  (DEADLINE_EXCEEDED: if it had been sent, its fate is unknown and a retry under the same
  request_id settles it, R12).
- A caller that gives up before its request was sent (deadline, cancelled task) takes the
  request out: it is never sent.
- ``close()`` sends what is waiting and waits for the batches in flight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from quota_ledger.v1 import quota_ledger_pb2 as qpb

from clients.outcomes import batch_outcomes, batch_request
from clients.wire import LedgerError

DEFAULT_LINGER_MS = 1.0
DEFAULT_BATCH_SIZE_MAX = 500
BATCH_SIZE_LIMIT = 1_000  # CONTRACT: a ConsumeBatch holds at most 1,000 requests
BATCHES_IN_FLIGHT_MAX = 8
# Keep at least this many batches in flight when enough callers wait (issue 19): the
# client's work on one batch's answers (every caller's result, its next call) then overlaps
# the ledger's work on the other, where one batch at a time left each side idle half the
# time. 256 callers on 2 cores: 25,150-26,108 acknowledged/s in batches of 128, against
# 17,752-18,291 in one batch of 256 (tests/bench_client.py, two runs each).
PIPELINE_BATCHES = 2
PIPELINE_SPLIT_MIN = 64  # a batch is never split below this many requests for it
CLOSE_TIMEOUT_S = 30.0

AnyFuture = asyncio.Future[Any] | concurrent.futures.Future[Any]


class _Item:
    __slots__ = ("request", "deadline", "future")

    def __init__(self, request: qpb.ConsumeRequest, deadline: float, future: AnyFuture) -> None:
        self.request, self.deadline, self.future = request, deadline, future


def check_batching(linger_ms: float, batch_size_max: int) -> None:
    if not 0 <= linger_ms <= 1_000:
        raise ValueError(f"linger_ms must be 0..1,000; got {linger_ms}")
    if not 1 <= batch_size_max <= BATCH_SIZE_LIMIT:
        raise ValueError(f"batch_size_max must be 1..{BATCH_SIZE_LIMIT:,}; got {batch_size_max}")


def deadline_error(sent: bool) -> LedgerError:
    fate = ("it was sent: its outcome is unknown; retry it with the same request_id" if sent
            else "it was never sent")
    return LedgerError(grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED",
                       f"the call's deadline passed while it waited in a batch ({fate})")


def take_batch(pending: list[_Item], size_max: int, in_flight: int) -> list[_Item]:
    """Up to size_max waiting items, oldest first, leaving out callers that gave up. With
    fewer than PIPELINE_BATCHES batches in flight, the waiting items are shared among the
    batches missing when each gets PIPELINE_SPLIT_MIN or more, so that two are in flight."""
    missing = PIPELINE_BATCHES - in_flight
    if missing > 1 and len(pending) >= missing * PIPELINE_SPLIT_MIN:
        size_max = min(size_max, -(-len(pending) // missing))
    items = [i for i in pending[:size_max] if not i.future.done()]
    del pending[:size_max]
    return items


def deliver(items: list[_Item], answer: qpb.ConsumeBatchResponse | None,
            error: LedgerError | None) -> None:
    """Each caller's own outcome; a failed call fails each of its callers with its error."""
    outcomes = (batch_outcomes([i.request for i in items], answer) if answer is not None
                else [error] * len(items))
    for item, outcome in zip(items, outcomes, strict=True):
        if item.future.done():  # the caller gave up
            continue
        if isinstance(outcome, LedgerError):
            item.future.set_exception(outcome)
        else:
            item.future.set_result(outcome)


def _batch_timeout(items: list[_Item], now: float) -> float:
    return max(0.001, max(i.deadline for i in items) - now)


class _Sent:
    """What a coalescer sent: ``batches_sent`` ConsumeBatch calls, ``unary_sent`` lone unary
    calls, ``requests_sent`` requests in all."""

    batches_sent = unary_sent = requests_sent = 0

    @property
    def calls_sent(self) -> int:
        return self.batches_sent + self.unary_sent


class AsyncCoalescer(_Sent):
    """For ``AsyncLedgerClient``: callers are tasks of one event loop."""

    def __init__(self, send: Callable[..., Awaitable[qpb.ConsumeBatchResponse]], *,
                 unary: Callable[..., Awaitable[qpb.ConsumeResponse]] | None = None,
                 linger_ms: float = DEFAULT_LINGER_MS,
                 batch_size_max: int = DEFAULT_BATCH_SIZE_MAX,
                 compact_answers: bool = False) -> None:
        check_batching(linger_ms, batch_size_max)
        self.compact = compact_answers
        self._send, self.linger_s, self.batch_size_max = send, linger_ms / 1000, batch_size_max
        self._unary = unary
        self._direct = 0  # lone calls in flight, sent unary
        self._pending: list[_Item] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._soon = False
        self._pending_timer: asyncio.TimerHandle | None = None
        self._pending_at: float | None = None

    async def __call__(self, request: qpb.ConsumeRequest, timeout: float,
                       metadata: Any = None) -> qpb.ConsumeResponse:
        """The caller's outcome. No timer per call: one timer watches the waiting calls'
        earliest deadline and one each batch in flight. A cancelled future is done, so
        take_batch leaves its request out."""
        loop = asyncio.get_running_loop()
        if (self._unary is not None and not self._pending and not self._in_flight
                and not self._direct):
            return await self._lone(loop, request, timeout, metadata)
        item = _Item(request, loop.time() + timeout, loop.create_future())
        self._pending.append(item)
        if self._pending_at is None or item.deadline < self._pending_at:
            self._watch_pending(loop, item.deadline)
        self._schedule(loop)
        return await item.future

    async def _lone(self, loop: asyncio.AbstractEventLoop, request: qpb.ConsumeRequest,
                    timeout: float, metadata: Any) -> qpb.ConsumeResponse:
        """Nothing else in flight: the unary call itself. Callers that arrive meanwhile
        linger, and leave together when it returns (or when their linger ends)."""
        assert self._unary is not None
        self._direct += 1
        self.unary_sent, self.requests_sent = self.unary_sent + 1, self.requests_sent + 1
        try:
            return await self._unary(request, timeout=timeout, metadata=metadata)
        finally:
            self._direct -= 1
            if self._pending and not self._soon:
                self._soon = True
                loop.call_soon(self._flush)

    def _watch_pending(self, loop: asyncio.AbstractEventLoop, at: float | None) -> None:
        if self._pending_timer is not None:
            self._pending_timer.cancel()
        self._pending_at = at
        self._pending_timer = None if at is None else loop.call_at(at, self._expire_pending)

    def _expire_pending(self) -> None:
        """Waiting callers past their deadline: never sent. Then watch the next one."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiting = []
        for item in self._pending:
            if item.future.done():
                continue
            if item.deadline <= now:
                item.future.set_exception(deadline_error(False))
            else:
                waiting.append(item)
        self._pending[:] = waiting
        self._pending_timer = None
        self._watch_pending(loop, min((i.deadline for i in waiting), default=None))

    def _watch_sent(self, loop: asyncio.AbstractEventLoop, items: list[_Item]
                    ) -> list[asyncio.TimerHandle]:
        """One timer per batch in flight, at its callers' earliest deadline."""
        handle: list[asyncio.TimerHandle] = []

        def expire() -> None:
            now = loop.time()
            left = [i for i in items if not i.future.done()]
            for item in left:
                if item.deadline <= now:
                    item.future.set_exception(deadline_error(True))
            left = [i for i in left if not i.future.done()]
            if left:
                handle[0] = loop.call_at(min(i.deadline for i in left), expire)

        handle.append(loop.call_at(min(i.deadline for i in items), expire))
        return handle

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if len(self._pending) >= self.batch_size_max or not (self._in_flight or self._direct):
            if not self._soon:  # callers of this turn of the loop leave together, no linger
                self._soon = True
                loop.call_soon(self._flush)
        elif self._timer is None:
            self._timer = loop.call_later(self.linger_s, self._flush)

    def _flush(self, force: bool = False) -> None:
        self._soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending and (force or len(self._in_flight) < BATCHES_IN_FLIGHT_MAX):
            items = take_batch(self._pending, self.batch_size_max, len(self._in_flight))
            if items:
                self.batches_sent, self.requests_sent = (self.batches_sent + 1,
                                                         self.requests_sent + len(items))
                task = asyncio.get_running_loop().create_task(self._send_batch(items))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)

    async def _send_batch(self, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        expiry = self._watch_sent(loop, items)
        try:
            answer = await self._send(batch_request([i.request for i in items], self.compact),
                                      timeout=_batch_timeout(items, loop.time()))
        except grpc.RpcError as err:
            deliver(items, None, LedgerError.from_rpc_error(err))
        else:
            deliver(items, answer, None)
        finally:
            expiry[0].cancel()
        if self._pending and self._timer is None and not self._soon:  # held back by the cap
            self._soon = True
            loop.call_soon(self._flush)

    async def close(self) -> None:
        """Send what is waiting, then wait for every batch in flight."""
        if self._pending:
            self._flush(force=True)
        if self._pending_timer is not None:  # nothing waits any more
            self._watch_pending(asyncio.get_running_loop(), None)
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=CLOSE_TIMEOUT_S)


class ThreadCoalescer(_Sent):
    """For ``LedgerClient``: callers are threads; one sender thread forms the batches and
    sends them with non-blocking ``future()`` calls, so several can be in flight."""

    def __init__(self, send_future: Callable[..., grpc.Future], *,
                 unary: Callable[..., qpb.ConsumeResponse] | None = None,
                 linger_ms: float = DEFAULT_LINGER_MS,
                 batch_size_max: int = DEFAULT_BATCH_SIZE_MAX,
                 compact_answers: bool = False) -> None:
        check_batching(linger_ms, batch_size_max)
        self.compact = compact_answers
        self._send, self._unary = send_future, unary
        self.linger_s, self.batch_size_max = linger_ms / 1000, batch_size_max
        self._pending: list[_Item] = []
        self._in_flight = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ledger-coalescer", daemon=True)
        self._thread.start()

    def __call__(self, request: qpb.ConsumeRequest, timeout: float,
                 metadata: Any = None) -> qpb.ConsumeResponse:
        item = _Item(request, time.monotonic() + timeout, concurrent.futures.Future())
        with self._cond:
            if self._closed:
                raise LedgerError(grpc.StatusCode.CANCELLED, "CLIENT_CLOSED",
                                  "the client is closed")
            lone = self._unary is not None and not self._pending and not self._in_flight
            if lone:  # the unary call itself, from this thread: no hop, no linger
                self._in_flight += 1
                self.unary_sent, self.requests_sent = self.unary_sent + 1, self.requests_sent + 1
            else:
                self._pending.append(item)
                self._cond.notify_all()
        if lone:
            assert self._unary is not None
            try:
                return self._unary(request, timeout=timeout, metadata=metadata)
            finally:
                with self._cond:
                    self._in_flight -= 1
                    self._cond.notify_all()
        try:
            return item.future.result(timeout)
        except concurrent.futures.TimeoutError:
            with self._cond:
                sent = item not in self._pending
                if not sent:
                    self._pending.remove(item)
            item.future.cancel()
            raise deadline_error(sent) from None

    def _run(self) -> None:
        while True:
            with self._cond:
                items = self._next_batch()
                if items is None:
                    return
                self._in_flight += 1
            request = batch_request([i.request for i in items], self.compact)
            call = self._send(request, timeout=_batch_timeout(items, time.monotonic()))
            call.add_done_callback(lambda c, items=items: self._done(items, c))

    def _next_batch(self) -> list[_Item] | None:
        """Under the lock: wait for items, linger while batches are in flight, respect
        BATCHES_IN_FLIGHT_MAX. None once closed and empty."""
        while True:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            if self._in_flight and not self._closed:
                self._linger()
            while self._in_flight >= BATCHES_IN_FLIGHT_MAX and not self._closed:
                self._cond.wait()
            items = take_batch(self._pending, self.batch_size_max, self._in_flight)
            if items:
                self.batches_sent, self.requests_sent = (self.batches_sent + 1,
                                                         self.requests_sent + len(items))
                return items

    def _linger(self) -> None:
        until = time.monotonic() + self.linger_s
        while (len(self._pending) < self.batch_size_max and not self._closed
               and (left := until - time.monotonic()) > 0):
            self._cond.wait(left)

    def _done(self, items: list[_Item], call: grpc.Future) -> None:
        try:
            deliver(items, call.result(), None)
        except grpc.RpcError as err:
            deliver(items, None, LedgerError.from_rpc_error(err))
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Send what is waiting, then wait for every batch in flight."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(CLOSE_TIMEOUT_S)
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight == 0, CLOSE_TIMEOUT_S)
