"""Coalescing (``batching=True``): concurrent consume() calls share ConsumeBatch calls, and
each caller still gets its own result, its own error and its own deadline.

The timing-sensitive properties (no linger at one in flight, a deadline while waiting,
cancellation, close) are proved with a transport the test holds back, so nothing depends on
the machine's speed; the rest runs against a real server.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from quota_ledger.v1 import quota_ledger_pb2 as qpb

from clients.client import AsyncLedgerClient, LedgerClient, LedgerError
from clients.coalescer import AsyncCoalescer, ThreadCoalescer
from clients.outcomes import batch_outcomes

from .conftest import T0, make_account

LONG_LINGER_MS = 1_000  # far longer than any answer here: a wait for it would show
QUICK_S = 0.9  # an answer that did not linger comes within this (a lingering one: 1 s)


def req(account_id: str = "acme", request_id: str = "r") -> qpb.ConsumeRequest:
    return LedgerClient.consume_request(account_id, request_id=request_id)


def answer_all(request: qpb.ConsumeBatchRequest) -> qpb.ConsumeBatchResponse:
    """A FULL answer that records every request."""
    return qpb.ConsumeBatchResponse(results=[
        qpb.ConsumeResult(request_id=r.request_id, response=qpb.ConsumeResponse(
            request_id=r.request_id, billable=True)) for r in request.requests])


class HeldTransport:
    """An async ConsumeBatch that answers only when the test releases it."""

    def __init__(self) -> None:
        self.sent: list[list[str]] = []
        self.release = asyncio.Event()

    async def __call__(self, request: qpb.ConsumeBatchRequest, timeout: float):
        self.sent.append([r.request_id for r in request.requests])
        await self.release.wait()
        return answer_all(request)


# --------------------------------------------------------------------------- with a held transport

def test_one_call_in_flight_is_sent_at_once_without_linger():
    """With nothing in flight a call leaves at once, even with a 1 s linger."""
    async def main() -> float:
        async def send(request, timeout):
            return answer_all(request)
        c = AsyncCoalescer(send, linger_ms=LONG_LINGER_MS)
        t = time.monotonic()
        assert (await c(req(), timeout=5)).billable
        return time.monotonic() - t
    assert asyncio.run(main()) < QUICK_S


def test_sync_coalescer_sends_one_call_at_once_without_linger():
    """The thread coalescer, too: one caller, no linger."""
    class Done:
        def __init__(self, request):
            self.answer = answer_all(request)

        def add_done_callback(self, fn):
            fn(self)

        def result(self):
            return self.answer

    c = ThreadCoalescer(lambda request, timeout: Done(request), linger_ms=LONG_LINGER_MS)
    try:
        t = time.monotonic()
        assert c(req(), timeout=5).billable
        assert time.monotonic() - t < QUICK_S
    finally:
        c.close()


def test_sync_caller_whose_deadline_passes_while_waiting_is_never_sent():
    """Threads: behind a batch in flight, a caller with a short deadline gets
    DEADLINE_EXCEEDED and its request is never sent; the first one is answered."""
    class Held:
        def __init__(self, request):
            self.request, self.callbacks = request, []

        def add_done_callback(self, fn):
            self.callbacks.append(fn)

        def result(self):
            return answer_all(self.request)

    held: list[Held] = []

    def send(request, timeout):
        held.append(Held(request))
        return held[-1]

    c = ThreadCoalescer(send, linger_ms=LONG_LINGER_MS)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c, req(request_id="first"), 5)
            deadline = time.monotonic() + 5
            while not held and time.monotonic() < deadline:
                time.sleep(0.001)
            with pytest.raises(LedgerError) as err:
                c(req(request_id="late"), timeout=0.05)
            assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "never sent" in err.value.message
            for fn in held[0].callbacks:
                fn(held[0])
            assert first.result(5).request_id == "first"
        assert [r.request_id for h in held for r in h.request.requests] == ["first"]
    finally:
        c.close()


def test_a_caller_whose_deadline_passes_while_waiting_is_never_sent():
    """Behind a batch in flight, a caller with a short deadline gets DEADLINE_EXCEEDED
    ("never sent"), and its request is in no batch; the others are answered."""
    async def main() -> None:
        t = HeldTransport()
        c = AsyncCoalescer(t, linger_ms=50)
        first = asyncio.create_task(c(req(request_id="first"), timeout=5))
        await asyncio.sleep(0.01)  # first is in flight: the next ones wait
        other = asyncio.create_task(c(req(request_id="other"), timeout=5))
        with pytest.raises(LedgerError) as err:
            await c(req(request_id="late"), timeout=0.001)
        assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "never sent" in err.value.message
        t.release.set()
        assert (await first).request_id == "first" and (await other).request_id == "other"
        assert [rid for batch in t.sent for rid in batch] == ["first", "other"]
    asyncio.run(main())


def test_cancelling_a_waiting_caller_takes_its_request_out():
    """A task cancelled while its call waits: that request is never sent."""
    async def main() -> None:
        t = HeldTransport()
        c = AsyncCoalescer(t, linger_ms=LONG_LINGER_MS)
        first = asyncio.create_task(c(req(request_id="first"), timeout=5))
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(c(req(request_id="gone"), timeout=5))
        kept = asyncio.create_task(c(req(request_id="kept"), timeout=5))
        await asyncio.sleep(0.01)
        waiting.cancel()
        t.release.set()
        await first
        await c.close()  # sends what still waits: only "kept"
        assert (await kept).request_id == "kept"
        assert waiting.cancelled()
        assert [rid for batch in t.sent for rid in batch] == ["first", "kept"]
    asyncio.run(main())


def test_close_sends_what_is_waiting_and_waits_for_what_is_in_flight():
    """close() during a 1 s linger: the waiting calls leave at once and every caller gets
    its answer before close() returns."""
    async def main() -> None:
        t = HeldTransport()
        c = AsyncCoalescer(t, linger_ms=LONG_LINGER_MS)
        calls = [asyncio.create_task(c(req(request_id=f"c{i}"), timeout=5)) for i in range(1)]
        await asyncio.sleep(0.01)
        calls += [asyncio.create_task(c(req(request_id=f"c{i}"), timeout=5))
                  for i in range(1, 4)]
        await asyncio.sleep(0.01)
        assert len(t.sent) == 1  # the three are lingering
        closing = asyncio.create_task(c.close())
        await asyncio.sleep(0.01)
        assert len(t.sent) == 2 and not closing.done()
        t.release.set()
        started = time.monotonic()
        await closing
        assert time.monotonic() - started < QUICK_S
        assert all(call.done() for call in calls)
        assert [(await call).request_id for call in calls] == ["c0", "c1", "c2", "c3"]
    asyncio.run(main())


@pytest.mark.parametrize(("callers", "batches"), [(256, [128, 128]), (100, [100]),
                                                 (1_200, [500, 500, 200])])
def test_waiting_callers_leave_as_two_batches_when_none_is_in_flight(callers, batches):
    """Issue 19: callers that arrive together leave as PIPELINE_BATCHES batches (the
    client's work on one overlaps the ledger's on the other), unless each would hold
    fewer than PIPELINE_SPLIT_MIN; batch_size_max still caps each. Every caller gets its
    own answer."""
    async def main() -> list[int]:
        t = HeldTransport()
        c = AsyncCoalescer(t, linger_ms=LONG_LINGER_MS)
        calls = [asyncio.create_task(c(req(request_id=f"r{i}"), timeout=5))
                 for i in range(callers)]
        while sum(len(b) for b in t.sent) < callers:
            await asyncio.sleep(0.001)
        t.release.set()
        answers = await asyncio.gather(*calls)
        assert [a.request_id for a in answers] == [f"r{i}" for i in range(callers)]
        return [len(b) for b in t.sent]
    assert asyncio.run(asyncio.wait_for(main(), 10)) == batches


def test_batch_outcomes_reads_full_and_compact_answers_alike():
    """Request i's outcome from FULL results or COMPACT columns, errors by index."""
    requests = [req(request_id="a"), req(request_id="b")]
    compact = qpb.ConsumeBatchResponse(compact=qpb.CompactResults(
        codes=[0, 5], billable=[True, False], replayed=[True, False], payg_units=[1, 0],
        payg_amount_micros=[700, 0], billing_day="2027-03-10",
        errors=[qpb.IndexedError(index=1, error={"code": 5, "reason": "ACCOUNT_NOT_FOUND",
                                                 "message": "no such account"})]))
    ok, err = batch_outcomes(requests, compact)
    assert ok.request_id == "a" and ok.replayed and ok.payg_amount_micros == 700
    assert ok.billing_day == "2027-03-10"
    assert err.code is grpc.StatusCode.NOT_FOUND and err.reason == "ACCOUNT_NOT_FOUND"
    full = batch_outcomes(requests, answer_all(qpb.ConsumeBatchRequest(requests=requests)))
    assert [o.request_id for o in full] == ["a", "b"]
    short = batch_outcomes(requests, qpb.ConsumeBatchResponse(results=answer_all(
        qpb.ConsumeBatchRequest(requests=requests[:1])).results))
    assert short[1].code is grpc.StatusCode.UNKNOWN


# --------------------------------------------------------------------------- real server

def test_async_callers_share_batches_and_get_their_own_errors(server):
    """64 concurrent calls, a quarter for an unknown account: those callers alone get
    NOT_FOUND; the rest are recorded; fewer batches than calls were sent."""
    with server.client() as c:
        c.set_time(T0)
        make_account(c, "acme", cash_micros=10_000_000)

    async def main() -> tuple[list, int, int]:
        async with AsyncLedgerClient(server.target, batching=True, retries=0) as c:
            outcomes = await asyncio.gather(*(
                c.consume("nobody" if i % 4 == 0 else "acme", request_id=f"a-{i}")
                for i in range(64)), return_exceptions=True)
            return outcomes, c.coalescer.calls_sent, c.coalescer.requests_sent

    outcomes, batches, sent = asyncio.run(main())
    for i, o in enumerate(outcomes):
        if i % 4 == 0:
            assert isinstance(o, LedgerError) and o.code is grpc.StatusCode.NOT_FOUND, o
        else:
            assert isinstance(o, qpb.ConsumeResponse) and o.billable and o.request_id == f"a-{i}"
    assert sent == 64 and batches < 64
    with server.client() as c:
        assert c.get_remaining("acme").payg_units == 48


def test_sync_client_coalesces_across_threads(server):
    """16 threads x 25 calls on one LedgerClient(batching=True): all recorded, once each, in
    fewer batches than calls."""
    with server.client() as c:
        c.set_time(T0)
        make_account(c, "acme", cash_micros=10_000_000)
    with LedgerClient(server.target, batching=True) as c:
        def worker(w: int) -> list[bool]:
            return [c.consume("acme", request_id=f"t{w}-{i}").billable for i in range(25)]
        with ThreadPoolExecutor(16) as pool:
            results = [b for r in pool.map(worker, range(16)) for b in r]
        batches = c.coalescer.calls_sent
    assert len(results) == 400 and all(results)
    assert batches < 400
    with server.client() as c:
        assert c.get_remaining("acme").payg_units == 400


def test_close_of_a_real_client_sends_the_waiting_calls(server):
    """With a long linger, calls still waiting when close() is called are sent and
    recorded, and each caller has its answer. Whether calls are still waiting at close()
    depends on thread timing (the first call leaves alone, the rest linger behind it), so
    the scenario is repeated, a bounded number of times, until a round had some."""
    callers, rounds_max = 32, 6
    with server.client() as c:
        c.set_time(T0)
        make_account(c, "acme", cash_micros=10_000_000)
    waited, recorded = [], 0
    for round_ in range(rounds_max):
        waiting, answers = _close_with_waiting_calls(server, callers, f"w{round_}")
        assert len(answers) == callers and all(a.billable for a in answers)
        recorded += callers
        with server.client() as c2:
            assert c2.get_remaining("acme").payg_units == recorded
        waited.append(waiting)
        if waiting > 0:
            break
    assert max(waited) > 0, waited  # close() had calls to send in some round


def _close_with_waiting_calls(server, callers: int, tag: str
                              ) -> tuple[int, list[qpb.ConsumeResponse]]:
    c = LedgerClient(server.target, batching=True, linger_ms=LONG_LINGER_MS)
    answers: list[qpb.ConsumeResponse] = []
    start = threading.Barrier(callers)

    def call(i: int) -> None:
        start.wait(10)
        answers.append(c.consume("acme", request_id=f"{tag}-{i}"))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10  # until every call is in the coalescer
    while (c.coalescer.requests_sent + len(c.coalescer._pending) < callers
           and time.monotonic() < deadline):
        time.sleep(0.005)
    waiting = len(c.coalescer._pending)
    c.close()
    for t in threads:
        t.join(10)
    return waiting, answers


def test_batching_and_spool_together_fail_open(tmp_path: Path):
    """A batching client with a spool: when the batch cannot reach the ledger, every caller
    is answered provisional and every request is kept."""
    from clients.spool import Spool

    from .test_spool import free_port

    path = tmp_path / "spool.db"

    async def main() -> list[qpb.ConsumeResponse]:
        async with AsyncLedgerClient(f"127.0.0.1:{free_port()}", batching=True, retries=1,
                                     timeout_s=2.0, spool_path=path) as c:
            return await asyncio.gather(*(c.consume("acme", request_id=f"s-{i}")
                                          for i in range(20)))

    answers = asyncio.run(main())
    assert all(a.provisional for a in answers)
    assert Spool(path).status().pending == 20


def test_bench_client_counts_only_what_the_ledger_recorded(server):
    """A short run of tests.bench_client: in each mode (unbatched, the default client,
    compact answers), every acknowledged request is a plan unit the accounts lost (the
    bench's own check), with no errors."""
    from rich.console import Console

    from tests.bench_client import bench

    runs = asyncio.run(bench(server.target, 1, 0.5, 32, 64, Console(quiet=True)))
    assert {r.mode for r in runs} == {"unbatched", "default", "compact"}
    assert all(r.acknowledged > 0 and r.all_recorded for r in runs), runs
