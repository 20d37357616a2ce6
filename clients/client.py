"""Typed Python client for quota-ledger, sync (:class:`LedgerClient`) and asyncio
(:class:`AsyncLedgerClient`).

- Every call has a deadline (``timeout_s``).
- Every state-changing call carries a ``request_id``; when the caller gives none, one is made
  up once and reused on every retry, so a retry can never charge twice (R12).
- Retries only on codes that mean "not applied, or applied and replayable": UNAVAILABLE,
  RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, with exponential backoff.
- Errors come back as :class:`LedgerError` with the gRPC code, the ``ErrorInfo`` reason and
  the server's message.

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

from clients.api import LedgerApi
from clients.wire import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    RETRIES_MAX,
    RETRYABLE,
    STREAM_TIMEOUT_S,
    LedgerError,
    auth_metadata,
    backoff_s,
    credentials,
    enum_value,
    new_request_id,
    stubs,
    timestamp,
)

# The names callers imported from here before the client became several modules.
__all__ = ["CHANNEL_OPTIONS", "DEFAULT_TARGET", "DEFAULT_TIMEOUT_S", "RETRIES_MAX",
           "STREAM_TIMEOUT_S", "AsyncLedgerClient", "LedgerClient", "LedgerError",
           "enum_value", "new_request_id", "timestamp"]


class LedgerClient(LedgerApi):
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retries: int = RETRIES_MAX, channel: grpc.Channel | None = None,
                 token: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        creds = credentials(tls_ca, tls_cert, tls_key)
        self.channel = channel or (
            grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS) if creds
            else grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
        self.timeout_s, self.retries = timeout_s, retries
        self.metadata = auth_metadata(token)
        self.stubs = stubs(self.channel)

    def _call(self, stub: str, method: str, request: Any, *, retry: bool = True) -> Any:
        fn = getattr(self.stubs[stub], method)
        deadline = time.monotonic() + self.timeout_s  # one budget for all attempts
        attempt = 0
        while True:
            try:
                return fn(request, timeout=max(0.001, deadline - time.monotonic()),
                          metadata=self.metadata)
            except grpc.RpcError as err:
                pause = backoff_s(attempt)
                if (retry and attempt < self.retries and err.code() in RETRYABLE
                        and time.monotonic() + pause < deadline):
                    time.sleep(pause)
                    attempt += 1
                    continue
                raise LedgerError.from_rpc_error(err) from None

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
        self.channel.close()

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLedgerClient(LedgerApi):
    """asyncio client: the same methods, each returning an awaitable."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retries: int = RETRIES_MAX, channel: grpc.aio.Channel | None = None,
                 token: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        creds = credentials(tls_ca, tls_cert, tls_key)
        self.channel = channel or (
            grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS) if creds
            else grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS))
        self.timeout_s, self.retries = timeout_s, retries
        self.metadata = auth_metadata(token)
        self.stubs = stubs(self.channel)

    async def _call(self, stub: str, method: str, request: Any, *, retry: bool = True) -> Any:
        fn = getattr(self.stubs[stub], method)
        deadline = time.monotonic() + self.timeout_s  # one budget for all attempts
        attempt = 0
        while True:
            try:
                return await fn(request, timeout=max(0.001, deadline - time.monotonic()),
                                metadata=self.metadata)
            except grpc.RpcError as err:
                pause = backoff_s(attempt)
                if (retry and attempt < self.retries and err.code() in RETRYABLE
                        and time.monotonic() + pause < deadline):
                    await asyncio.sleep(pause)
                    attempt += 1
                    continue
                raise LedgerError.from_rpc_error(err) from None

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
        await self.channel.close()

    async def __aenter__(self) -> AsyncLedgerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
