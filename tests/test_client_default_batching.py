"""Coalescing is the clients' default (issue 18, point 5): a lone call is sent at once as the
unary ``Consume`` it would have been, from the caller's own task or thread; calls that
arrive while it is in flight wait behind it and leave together as one ``ConsumeBatch``.
``batching=False``, or ``QUOTA_LEDGER_CLIENT_BATCHING=0`` for a client built without the
argument, sends every call unary."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from quota_ledger.v1 import quota_ledger_pb2 as qpb

from clients.client import BATCHING_ENV, AsyncLedgerClient, LedgerClient
from clients.coalescer import AsyncCoalescer, ThreadCoalescer

from .conftest import T0, make_account
from .test_coalescer import LONG_LINGER_MS, answer_all, req

CALLERS = 64


def test_a_lone_async_call_goes_unary_and_callers_behind_it_leave_as_one_batch():
    """The first call is the unary call itself; the 9 that come while it is held wait (a
    1 s linger), and leave as one batch the moment it returns."""
    async def main() -> tuple[list[str], list[list[str]], list[bool]]:
        release = asyncio.Event()
        unary_ids: list[str] = []
        batches: list[list[str]] = []

        async def unary(request, timeout, metadata=None):
            unary_ids.append(request.request_id)
            await release.wait()
            return qpb.ConsumeResponse(request_id=request.request_id, billable=True)

        async def send(request, timeout):
            batches.append([r.request_id for r in request.requests])
            return answer_all(request)

        c = AsyncCoalescer(send, unary=unary, linger_ms=LONG_LINGER_MS)
        first = asyncio.ensure_future(c(req(request_id="r0"), timeout=5))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(c(req(request_id=f"r{i}"), timeout=5))
                for i in range(1, 10)]
        await asyncio.sleep(0.05)
        assert batches == []  # they wait behind the unary call in flight
        release.set()
        answers = await asyncio.wait_for(asyncio.gather(first, *rest), 0.5)  # not the linger
        return unary_ids, batches, [a.billable for a in answers]

    unary_ids, batches, billable = asyncio.run(main())
    assert unary_ids == ["r0"]
    assert batches == [[f"r{i}" for i in range(1, 10)]]
    assert all(billable) and len(billable) == 10


def test_a_lone_sync_call_is_sent_from_the_callers_own_thread():
    """The thread coalescer: no hop to its sender thread for a lone call."""
    threads: list[str] = []

    def unary(request, timeout, metadata=None):
        threads.append(threading.current_thread().name)
        return qpb.ConsumeResponse(request_id=request.request_id, billable=True)

    def send(request, timeout):
        raise AssertionError("a lone call must not be batched")

    c = ThreadCoalescer(send, unary=unary, linger_ms=LONG_LINGER_MS)
    try:
        for i in range(5):
            assert c(req(request_id=f"s{i}"), timeout=5).billable
    finally:
        c.close()
    assert threads == [threading.current_thread().name] * 5
    assert (c.unary_sent, c.batches_sent, c.requests_sent) == (5, 0, 5)


def test_the_default_clients_coalesce_and_batching_false_or_the_environment_opts_out(
        monkeypatch):
    monkeypatch.delenv(BATCHING_ENV, raising=False)
    with LedgerClient("127.0.0.1:1") as c:
        assert c.coalescer is not None
    with LedgerClient("127.0.0.1:1", batching=False) as c:
        assert c.coalescer is None
    monkeypatch.setenv(BATCHING_ENV, "0")
    with LedgerClient("127.0.0.1:1") as c:
        assert c.coalescer is None
    with LedgerClient("127.0.0.1:1", batching=True) as c:  # the argument wins
        assert c.coalescer is not None

    async def build() -> bool:
        c = AsyncLedgerClient("127.0.0.1:1")
        try:
            return c.coalescer is None
        finally:
            await c.close()
    assert asyncio.run(build())


@pytest.mark.parametrize("concurrent", [False, True], ids=["one-caller", "64-callers"])
def test_the_default_async_client_on_a_real_server(server, monkeypatch, concurrent):
    """One caller: every call unary, no batch. 64 concurrent callers: fewer calls than
    requests. Either way every acknowledged request is recorded once."""
    monkeypatch.delenv(BATCHING_ENV, raising=False)
    with server.client(batching=False) as c:
        c.set_time(T0)
        make_account(c, "acme", cash_micros=10_000_000)

    async def main() -> tuple[int, int, int]:
        async with AsyncLedgerClient(server.target, retries=0) as c:
            if concurrent:
                answers = await asyncio.gather(*(c.consume("acme", request_id=f"c{i}")
                                                 for i in range(CALLERS)))
            else:
                answers = [await c.consume("acme", request_id=f"c{i}") for i in range(20)]
            assert all(a.billable and not a.replayed for a in answers)
            assert c.coalescer is not None
            return len(answers), c.coalescer.unary_sent, c.coalescer.batches_sent

    n, unary, batches = asyncio.run(main())
    if concurrent:
        assert unary + batches < n
    else:
        assert (unary, batches) == (n, 0)
    with server.client() as c:
        assert c.get_remaining("acme").payg_units == n


def test_the_default_sync_client_coalesces_threads(server, monkeypatch):
    monkeypatch.delenv(BATCHING_ENV, raising=False)
    with server.client() as c:
        c.set_time(T0)
        make_account(c, "acme", cash_micros=10_000_000)
    with LedgerClient(server.target) as c:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: c.consume("acme", request_id=f"t{i}"),
                                    range(CALLERS * 4)))
        assert c.coalescer is not None
        calls = c.coalescer.calls_sent
    assert all(a.billable for a in answers) and calls < CALLERS * 4
    with server.client() as c:
        assert c.get_remaining("acme").payg_units == CALLERS * 4
