"""Typed Python client for quota-ledger, sync (:class:`LedgerClient`) and asyncio
(:class:`AsyncLedgerClient`).

- Every call has a deadline (``timeout_s``).
- Every state-changing call carries a ``request_id``; when the caller gives none, one is made
  up once and reused on every retry, so a retry can never charge twice (R12).
- Retries only on codes that mean "not applied, or applied and replayable": UNAVAILABLE,
  RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, and a CANCELLED the caller did not cause, with
  exponential backoff.
- Errors come back as :class:`LedgerError` with the gRPC code, the ``ErrorInfo`` reason and
  the server's message.
- ``spool_path=PATH``: fail open. A ``consume()`` that cannot reach the ledger once its
  retries are spent is written to a local spool and answered ``provisional``; the spool is
  sent in the background once the ledger answers (``clients/spool.py``, R26).
- ``budget_s`` (default 0.25 s, with a spool): the longest a ``consume()`` waits for the
  ledger before it spools and answers ``provisional``; a circuit breaker (on with a spool,
  ``breaker=``) then skips the network altogether until a health probe sees the ledger back,
  so an outage costs a caller the spool's fsync, not a deadline (``clients/failopen.py``,
  issue 21). ``on_state_change(old, new)`` hears each of its transitions.
- Coalescing is on by default (issue 18): concurrent ``consume()`` calls share
  ``ConsumeBatch`` calls (``clients/coalescer.py``), each caller with its own result or
  error. A lone call is still sent at once as a unary ``Consume``, so a caller at low rates
  waits for nothing. ``batching=False`` (or ``QUOTA_LEDGER_CLIENT_BATCHING=0`` in the
  environment, for a client built without the argument) sends every call unary.

Several targets (``"10.0.0.1:50051,10.0.0.2:50051"``): each account's calls go to its home
node, with failover (``clients/routing.py``, issue 20); ``routing="round_robin"`` spreads
them instead.

Enum arguments take the wire numbers, the full wire names, or short names
(``region="mainland"``, ``captcha_type="slider"``, ``architecture="v3"``, ``step="4.1"``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import grpc
from quota_ledger.v1 import quota_ledger_pb2 as qpb

from clients.coalescer import (
    AsyncCoalescer,
    ThreadCoalescer,
)
from clients.failopen import TaskProbe, ThreadProbe
from clients.replay import TaskReplayer, ThreadReplayer
from clients.spool import SpoolLimits
from clients.wire import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    RETRIES_MAX,
    STREAM_TIMEOUT_S,
    LedgerError,
    channel_target,
    enum_value,
    new_request_id,
    timestamp,
)
from clients.wiring import BATCHING_ENV, _node_channels, _Options, _Wired

# The names callers imported from here before the client became several modules.
__all__ = ["CHANNEL_OPTIONS", "DEFAULT_TARGET", "DEFAULT_TIMEOUT_S", "RETRIES_MAX",
           "STREAM_TIMEOUT_S", "AsyncLedgerClient", "LedgerClient", "LedgerError",
           "BATCHING_ENV", "SpoolLimits", "enum_value", "new_request_id", "timestamp"]


class LedgerClient(_Wired):
    """Blocking client, safe to share between threads. Use as a context manager, or call
    close(). Options: see the module doc and ``_Options`` (clients/wiring.py)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, channel: grpc.Channel | None = None,
                 **options: Any) -> None:
        o = _Options(**options)

        def open_channel(t: str) -> grpc.Channel:
            return (grpc.secure_channel(channel_target(t), o.creds, options=CHANNEL_OPTIONS)
                    if o.creds else grpc.insecure_channel(channel_target(t),
                                                          options=CHANNEL_OPTIONS))

        self._wire(o, channel or open_channel(target), ThreadCoalescer, ThreadReplayer,
                   ThreadProbe, lambda batch: batch.future,
                   _node_channels(target, o, channel, open_channel))

    def _call(self, stub: str, method: str, request: Any, *, retry: bool = True,
              budget_s: float | None = None) -> Any:
        deadline = self._transport(method, budget_s)
        for attempt in range(self.retries + 1):
            fn, node = self._pick(stub, method, request)
            try:
                answer = fn(request, timeout=max(0.001, deadline - time.monotonic()),
                            metadata=self.metadata)
            except (grpc.RpcError, LedgerError) as err:  # LedgerError: a coalesced caller's
                self._node_result(node, err)
                time.sleep(self._pause_or_raise(err, retry, attempt, deadline))
                continue
            self._node_result(node, None)
            self._noted(None)
            return answer
        raise AssertionError("unreachable: the last attempt raises")

    def consume(self, account_id: str, *, budget_s: float | None = None,
                **kwargs: Any) -> qpb.ConsumeResponse:
        """Record one verification event (Consume); with a spool, fail open (R26) within
        ``budget_s`` (default: the client's)."""
        request = self._observed(self.consume_request(account_id, **kwargs))
        try:
            return self._call("ledger", "Consume", request, budget_s=budget_s)
        except LedgerError as exc:
            if not self._spoolable(request, exc):
                raise
            assert self.spool is not None
        return self.spool.add(request)

    def consume_stream(self, requests: Iterable[qpb.ConsumeRequest],
                       timeout_s: float = STREAM_TIMEOUT_S) -> Iterator[Any]:
        """One result per request, in order (no retry: resend failed items with the same
        request_id yourself). The deadline covers the whole stream."""
        try:
            yield from self.stubs["ledger"].ConsumeStream(iter(requests), timeout=timeout_s,
                                                           metadata=self.metadata)
        except grpc.RpcError as err:
            raise LedgerError.from_rpc_error(err) from None

    def close(self) -> None:
        """Send the coalesced calls still waiting, stop the replayer (what is still spooled
        stays on disk for the next client), then close the channel."""
        for coalescer in self.coalescers:
            coalescer.close()
        self._closing = True
        if self.probe is not None:
            self.probe.stop()
        if self.replayer is not None:
            self.replayer.stop()  # a replay call in flight ends with the channel
        self.channel.close()
        for lane in self.lanes.values():
            lane.channel.close()
        if self.replayer is not None and self.spool is not None:
            self.replayer.join()
            self.spool.release()
            self.spool.close()

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLedgerClient(_Wired):
    """asyncio client: the same methods, each returning an awaitable. Its replayer and
    coalescer live on the event loop of its first call."""

    def __init__(self, target: str = DEFAULT_TARGET, *,
                 channel: grpc.aio.Channel | None = None, **options: Any) -> None:
        o = _Options(**options)

        def open_channel(t: str) -> grpc.aio.Channel:
            return (grpc.aio.secure_channel(channel_target(t), o.creds,
                                            options=CHANNEL_OPTIONS)
                    if o.creds else grpc.aio.insecure_channel(channel_target(t),
                                                              options=CHANNEL_OPTIONS))

        self._wire(o, channel or open_channel(target), AsyncCoalescer, TaskReplayer,
                   TaskProbe, lambda batch: batch,
                   _node_channels(target, o, channel, open_channel))

    def _ensure_started(self) -> None:
        if self.replayer is not None:
            self.replayer.ensure_started()
        if self.probe is not None:
            self.probe.ensure_started()

    async def _call(self, stub: str, method: str, request: Any, *, retry: bool = True,
                    budget_s: float | None = None) -> Any:
        self._ensure_started()
        deadline = self._transport(method, budget_s)
        for attempt in range(self.retries + 1):
            fn, node = self._pick(stub, method, request)
            try:
                answer = await fn(request, timeout=max(0.001, deadline - time.monotonic()),
                                  metadata=self.metadata)
            except (grpc.RpcError, LedgerError) as err:  # LedgerError: a coalesced caller's
                self._node_result(node, err)
                await asyncio.sleep(self._pause_or_raise(err, retry, attempt, deadline))
                continue
            self._node_result(node, None)
            self._noted(None)
            return answer
        raise AssertionError("unreachable: the last attempt raises")

    async def consume(self, account_id: str, *, budget_s: float | None = None,
                      **kwargs: Any) -> qpb.ConsumeResponse:
        """Record one verification event (Consume); with a spool, fail open (R26) within
        ``budget_s`` (default: the client's)."""
        request = self._observed(self.consume_request(account_id, **kwargs))
        try:
            return await self._call("ledger", "Consume", request, budget_s=budget_s)
        except LedgerError as exc:
            if not self._spoolable(request, exc):
                raise
            assert self.spool is not None
        return await asyncio.to_thread(self.spool.add, request)

    async def consume_stream(self, requests: AsyncIterator[qpb.ConsumeRequest] | Iterable[Any],
                             timeout_s: float = STREAM_TIMEOUT_S) -> AsyncIterator[Any]:
        call = self.stubs["ledger"].ConsumeStream(requests, timeout=timeout_s,
                                                  metadata=self.metadata)
        try:
            async for result in call:
                yield result
        except grpc.RpcError as err:
            raise LedgerError.from_rpc_error(err) from None

    async def close(self) -> None:
        """Send the coalesced calls still waiting, stop the replayer (what is still spooled
        stays on disk for the next client), then close the channel."""
        for coalescer in self.coalescers:
            await coalescer.close()
        self._closing = True
        if self.probe is not None:
            await self.probe.stop()
        if self.replayer is not None and self.spool is not None:
            await self.replayer.stop()
            await asyncio.to_thread(self.spool.release)
            self.spool.close()
        await self.channel.close()
        for lane in self.lanes.values():
            await lane.channel.close()

    async def __aenter__(self) -> AsyncLedgerClient:
        self._ensure_started()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
