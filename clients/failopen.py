"""Fail open fast (issue 21, R26): the latency budget of a billing call, and the circuit
breaker's probe and channel watch for each client.

- ``budget_s`` (default :data:`DEFAULT_BUDGET_S`): with a spool, a ``consume()`` gets at most
  this long, retries included; past it the request is spooled and answered ``provisional``.
  The RPC may still complete on the server: the spool's replay then finds it ``replayed``
  (R12), so it is charged once. Without a spool the budget does not apply: a call has its
  ``timeout_s`` and raises as it always did.
- The breaker (``clients/breaker.py``) is on by default with a spool. While it is open no
  call reaches the network; a probe (the gRPC health service, with backoff) looks for the
  ledger's return in the background: a thread for :class:`~clients.client.LedgerClient`, a
  task for :class:`~clients.client.AsyncLedgerClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.breaker import OPEN, PROBE_TIMEOUT_S, CircuitBreaker, Prober
from clients.wire import LedgerError

DEFAULT_BUDGET_S = 0.25  # a verification waits at most this long for billing (with a spool)
BUDGET_MIN_S = 0.001
UNREACHABLE_REASON = "LEDGER_UNREACHABLE"


def check_budget(budget_s: float | None) -> float | None:
    if budget_s is not None and not budget_s >= BUDGET_MIN_S:
        raise ValueError(f"budget_s must be at least {BUDGET_MIN_S} s (got {budget_s!r})")
    return budget_s


def unreachable(breaker: CircuitBreaker) -> LedgerError:
    """What a call gets while the breaker is open: at once, with no network attempt."""
    return LedgerError(grpc.StatusCode.UNAVAILABLE, UNREACHABLE_REASON,
                       f"the ledger is unreachable (circuit breaker {breaker.state}, "
                       f"opened {breaker.opened} time(s)); try again later")


def is_gate(exc: LedgerError) -> bool:
    """The breaker refused the call before any network attempt."""
    return exc.reason == UNREACHABLE_REASON and exc.code is grpc.StatusCode.UNAVAILABLE


HEALTH_REQUEST = health_pb2.HealthCheckRequest()
SERVING = health_pb2.HealthCheckResponse.SERVING


class ThreadProbe:
    """The sync client's probe: a daemon thread that sleeps until the breaker opens, then
    asks the health service, with backoff, until it answers SERVING (-> half-open). It also
    opens the breaker when the channel reports TRANSIENT_FAILURE."""

    def __init__(self, breaker: CircuitBreaker, channel: grpc.Channel,
                 metadata: Any) -> None:
        self.breaker, self.channel = breaker, channel
        self._check = health_pb2_grpc.HealthStub(channel).Check
        self._metadata = metadata
        self._wake, self._stopped = threading.Event(), False
        breaker.listen(lambda _old, new: self._wake.set() if new == OPEN else None)
        channel.subscribe(self._on_connectivity, try_to_connect=False)
        self._thread = threading.Thread(target=self._run, name="ledger-breaker-probe",
                                        daemon=True)
        self._thread.start()

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE and not self._stopped:
            self.breaker.unreachable("channel in TRANSIENT_FAILURE")

    def _answered(self) -> bool:
        try:
            answer = self._check(HEALTH_REQUEST, timeout=PROBE_TIMEOUT_S,
                                 metadata=self._metadata, wait_for_ready=True)
        except grpc.RpcError:
            return False
        return answer.status == SERVING

    def _run(self) -> None:
        prober = Prober()
        while not self._stopped:
            if self.breaker.state != OPEN:
                self._wake.wait()
                self._wake.clear()
                continue
            answered = self._answered()
            if answered:
                self.breaker.probe_answered()
            self._wake.wait(prober.next_pause_s(answered))
            self._wake.clear()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        with contextlib.suppress(ValueError):
            self.channel.unsubscribe(self._on_connectivity)
        self._thread.join(PROBE_TIMEOUT_S * 4)


class TaskProbe:
    """The async client's probe: a task on the loop of the client's first call, doing what
    :class:`ThreadProbe` does, and watching the channel's state for TRANSIENT_FAILURE."""

    def __init__(self, breaker: CircuitBreaker, channel: grpc.aio.Channel,
                 metadata: Any) -> None:
        self.breaker, self.channel = breaker, channel
        self._check = health_pb2_grpc.HealthStub(channel).Check
        self._metadata = metadata
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        breaker.listen(lambda _old, new: self._poke() if new == OPEN else None)

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            loop.call_soon_threadsafe(wake.set)

    def ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and all(not t.done() for t in self._tasks):
            return
        self._loop, self._wake = loop, asyncio.Event()
        self._tasks = [loop.create_task(self._probe(self._wake)), loop.create_task(self._watch())]

    async def _answered(self) -> bool:
        try:
            answer = await self._check(HEALTH_REQUEST, timeout=PROBE_TIMEOUT_S,
                                       metadata=self._metadata, wait_for_ready=True)
        except grpc.RpcError:
            return False
        return answer.status == SERVING

    async def _probe(self, wake: asyncio.Event) -> None:
        prober = Prober()
        while True:
            if self.breaker.state != OPEN:
                await wake.wait()
                wake.clear()
                continue
            answered = await self._answered()
            if answered:
                self.breaker.probe_answered()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), prober.next_pause_s(answered))
            wake.clear()

    async def _watch(self) -> None:
        state = self.channel.get_state(try_to_connect=False)
        while True:
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                self.breaker.unreachable("channel in TRANSIENT_FAILURE")
            await self.channel.wait_for_state_change(state)
            state = self.channel.get_state(try_to_connect=False)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            if task.get_loop() is asyncio.get_running_loop():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


class ReplayGate:
    """The breaker as the spool's replayer sees it: it sends only when the breaker lets a
    call through (a half-open breaker's trial may be its batch), and reports the outcome."""

    def __init__(self, breaker: CircuitBreaker,
                 noted: Callable[[LedgerError | None], None]) -> None:
        self.allow, self.noted = breaker.allow, noted
        self.is_open = lambda: breaker.is_open
