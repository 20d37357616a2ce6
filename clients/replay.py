"""Sending the spool to the ledger once it answers again: a thread for the sync client, an
asyncio task for the async one, and one step function that ``ledgerctl spool replay`` drives.

Each step takes the oldest rows (with the replay lease, so one process at a time sends, in
spool order), sends them in one ``ConsumeBatch`` under their original ``request_id`` and
``client_observed_at``, and settles each row by its own outcome (:meth:`Spool.settle`). A
failed call leaves every row in place and backs off; a recorded one is removed, an already
recorded one comes back ``replayed`` (R12) and is removed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
from quota_ledger.v1 import quota_ledger_pb2 as qpb

from clients.outcomes import batch_outcomes, batch_request
from clients.spool import SettleReport, Spool, SpoolRow
from clients.wire import LedgerError

REPLAY_BATCH_MAX = 500  # rows per ConsumeBatch (the ledger takes at most 1,000)
REPLAY_CALL_TIMEOUT_S = 10.0
REPLAY_IDLE_POLL_S = 1.0  # an empty spool, or one another process replays, is read again
REPLAY_BACKOFF_BASE_S = 0.1
REPLAY_BACKOFF_MAX_S = 5.0
REPLAY_STOP_TIMEOUT_S = 5.0

Batch = tuple[list[SpoolRow], qpb.ConsumeBatchRequest]


class Gate(Protocol):
    """The client's circuit breaker as the replayer sees it (``clients/failopen.py``)."""

    def is_open(self) -> bool: ...

    def allow(self) -> bool: ...

    def noted(self, exc: LedgerError | None) -> None: ...


class ReplayState:
    """What to send next and how long to pause after each step (seconds, 0: go on)."""

    def __init__(self, spool: Spool, batch_max: int = REPLAY_BATCH_MAX,
                 gate: Gate | None = None) -> None:
        self.spool, self.batch_max, self.gate = spool, batch_max, gate
        self.failures = 0
        self.totals = SettleReport()
        self.last_error: Exception | None = None

    def next_batch(self) -> Batch | float:
        if self.gate is not None and self.gate.is_open():
            return REPLAY_IDLE_POLL_S  # no spool write while the breaker is open
        rows = self.spool.take(self.batch_max)
        if not rows:  # None: another process holds the lease; []: nothing to send
            return REPLAY_IDLE_POLL_S
        if self.gate is not None and not self.gate.allow():
            return REPLAY_IDLE_POLL_S  # the client's breaker is open: woken when it moves
        return rows, batch_request([r.request for r in rows])

    def _noted(self, exc: Exception | None) -> None:
        """A sent batch tells the client's breaker how the call ended (it may be the
        half-open breaker's trial call)."""
        if self.gate is not None:
            self.gate.noted(exc if not isinstance(exc, grpc.RpcError)
                            else LedgerError.from_rpc_error(exc))

    def done(self, rows: list[SpoolRow], answer: qpb.ConsumeBatchResponse) -> float:
        report = self.spool.settle(rows, batch_outcomes([r.request for r in rows], answer))
        self.totals.add(report)
        self.failures = 0
        return 0.0 if report.kept == 0 else self.failed(None)

    def failed(self, exc: Exception | None) -> float:
        self.last_error = exc or self.last_error
        self.failures += 1
        pause = min(REPLAY_BACKOFF_MAX_S, REPLAY_BACKOFF_BASE_S * 2 ** min(self.failures, 16))
        return pause * (0.5 + random.random() / 2)

    def step(self, send: Callable[[qpb.ConsumeBatchRequest], qpb.ConsumeBatchResponse]
             ) -> float:
        got = self.next_batch()
        if isinstance(got, float):
            return got
        try:
            answer = send(got[1])
        except (grpc.RpcError, LedgerError) as exc:
            self._noted(exc)
            return self.failed(exc)
        self._noted(None)
        return self.done(got[0], answer)

    async def astep(self, send: Callable[[qpb.ConsumeBatchRequest],
                                         Awaitable[qpb.ConsumeBatchResponse]]) -> float:
        got = await asyncio.to_thread(self.next_batch)
        if isinstance(got, float):
            return got
        try:
            answer = await send(got[1])
        except (grpc.RpcError, LedgerError) as exc:
            self._noted(exc)
            return self.failed(exc)
        self._noted(None)
        return await asyncio.to_thread(self.done, got[0], answer)


class ThreadReplayer:
    """The sync client's replayer: a daemon thread from the client's start to its close."""

    def __init__(self, spool: Spool, send: Callable[[qpb.ConsumeBatchRequest],
                                                   qpb.ConsumeBatchResponse],
                 gate: Gate | None = None) -> None:
        self.state, self._send = ReplayState(spool, gate=gate), send
        self._wake, self._stopped = threading.Event(), False
        self._thread = threading.Thread(target=self._run, name="ledger-spool-replay",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped:
            pause = self.state.step(self._send)
            if pause and not self._stopped:
                self._wake.wait(pause)
                self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def join(self) -> None:
        self._thread.join(REPLAY_STOP_TIMEOUT_S)


class TaskReplayer:
    """The async client's replayer: a task on the loop of the client's first call."""

    def __init__(self, spool: Spool, send: Callable[[qpb.ConsumeBatchRequest],
                                                   Awaitable[qpb.ConsumeBatchResponse]],
                 gate: Gate | None = None) -> None:
        self.state, self._send = ReplayState(spool, gate=gate), send
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    def ensure_started(self) -> None:
        """Start on the running loop, or again on a new one (asyncio.run called twice)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run(self._wake))

    async def _run(self, wake: asyncio.Event) -> None:
        while True:
            pause = await self.state.astep(self._send)
            if pause:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), pause)
                wake.clear()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def stop(self) -> None:
        if self._task is not None and self._task.get_loop() is asyncio.get_running_loop():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
