"""The asyncio driver: unary, batch and stream shapes, closed and open loop."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc
from quota_ledger.v1 import quota_ledger_pb2 as qpb

from clients.client import AsyncLedgerClient
from clients.loadgen.accounts import prepare_accounts
from clients.loadgen.answers import count_answer
from clients.loadgen.config import (
    CONNECT_TIMEOUT_S,
    STREAMS_AUTO_MAX,
    TICK_S,
    WORKERS_PER_CHANNEL,
    LoadConfig,
    LoadgenError,
)
from clients.loadgen.recorder import LoadResult, Recorder
from clients.loadgen.skew import AccountPicker, parse_skew
from clients.loadgen.wire import RequestFactory
from clients.wire import CHANNEL_OPTIONS, LedgerError

_SERVICE = "/" + qpb.DESCRIPTOR.services_by_name["QuotaLedger"].full_name
_CODE_NAMES = {sc.value[0]: sc.name for sc in grpc.StatusCode}
# Separate channels get separate connections (gRPC shares subchannels between equal channels).
_LOAD_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


class _Lane:
    """Open loop, one stream: the scheduled send times waiting for it (None: no more)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[float | None] = asyncio.Queue()
        self.alive = True


class _Run:
    def __init__(self, config: LoadConfig, recorder: Recorder, stop: asyncio.Event) -> None:
        self.cfg = config
        self.rec = recorder
        self.stop = stop
        ids = config.ids()
        rng = random.Random(config.seed)
        self.wire = RequestFactory(config, ids, AccountPicker(len(ids), parse_skew(
            config.skew, config.hot_fraction), rng))
        self.reserved = 0
        self.end_at = 0.0
        self.channels: list[grpc.aio.Channel] = []
        self.in_flight = asyncio.Semaphore(config.max_in_flight)

    # ---- budget: stop at --requests or --duration, whichever first
    def take(self, k: int) -> int:
        if self.stop.is_set() or time.perf_counter() >= self.end_at:
            return 0
        k = min(k, self.cfg.requests - self.reserved)
        self.reserved += max(k, 0)
        return max(k, 0)

    def _stub(self, channel: grpc.aio.Channel, method: str) -> Any:
        if method == "ConsumeStream":
            return channel.stream_stream(f"{_SERVICE}/ConsumeStream", request_serializer=None,
                                         response_deserializer=qpb.ConsumeResult.FromString)
        response = (qpb.ConsumeResponse if method == "Consume" else qpb.ConsumeBatchResponse)
        return channel.unary_unary(f"{_SERVICE}/{method}", request_serializer=None,
                                   response_deserializer=response.FromString)

    # ---- one unary call / one batch call
    async def unary_once(self, stub: Any, started: float | None = None) -> None:
        req = self.wire.one()
        t = time.perf_counter() if started is None else started
        self.rec.on_sent(1)
        self.rec.calls += 1
        try:
            resp = await stub(req, timeout=self.cfg.timeout_s)
        except grpc.aio.AioRpcError as exc:
            self.rec.record((time.perf_counter() - t) * 1e6, False, exc.code().name)
        except LedgerError as exc:  # --client-batching: one caller's error
            self.rec.record((time.perf_counter() - t) * 1e6, False, exc.code.name)
        except asyncio.CancelledError:
            self.rec.record((time.perf_counter() - t) * 1e6, False, "CANCELLED")
            raise
        else:
            self.rec.record((time.perf_counter() - t) * 1e6, True,
                            billable=int(resp.billable), replayed=int(resp.replayed))

    async def batch_once(self, stub: Any, k: int, started: float | None = None) -> None:
        req = self.wire.batch(k)
        t = time.perf_counter() if started is None else started
        self.rec.on_sent(k)
        self.rec.calls += 1
        try:
            resp = await stub(req, timeout=self.cfg.timeout_s)
        except grpc.aio.AioRpcError as exc:
            self.rec.record((time.perf_counter() - t) * 1e6, False, exc.code().name, k)
            return
        except asyncio.CancelledError:
            self.rec.record((time.perf_counter() - t) * 1e6, False, "CANCELLED", k)
            raise
        lat = (time.perf_counter() - t) * 1e6
        ok, billable, replayed, errors = count_answer(resp, k)
        self.rec.record(lat, True, n=ok, billable=billable, replayed=replayed)
        for code, n in errors.items():
            self.rec.record(lat, False, _CODE_NAMES.get(code, f"CODE_{code}"), n)
        missing = k - ok - sum(errors.values())
        if missing:  # a short answer: the outcome of the rest is unknown
            self.rec.record(lat, False, "UNKNOWN", missing)

    # ---- closed loop
    async def unary_worker(self, stub: Any) -> None:
        while self.take(1):
            await self.unary_once(stub)

    async def batch_worker(self, stub: Any) -> None:
        while k := self.take(self.cfg.batch_size):
            await self.batch_once(stub, k)

    # ---- streams (both loops): FIFO of send times, results come back in request order
    async def stream_worker(self, stub: Any, window: int | None, lane: _Lane | None) -> None:
        """One ConsumeStream. Closed loop: ``window`` messages in flight. Open loop: sends
        what the dispatcher puts in ``lane`` (scheduled times) and frees ``in_flight``."""
        call = stub(timeout=self.cfg.duration_s + self.cfg.timeout_s)
        pending: deque[float] = deque()
        slots = asyncio.Semaphore(window) if window else None

        def release() -> None:
            (slots or self.in_flight).release()

        async def send() -> None:
            try:
                while True:
                    if lane is not None:
                        started = await lane.queue.get()
                        if started is None:
                            break
                    else:
                        assert slots is not None
                        await slots.acquire()
                        if not self.take(1):
                            break
                        started = time.perf_counter()
                    req = self.wire.one()
                    pending.append(started)
                    self.rec.on_sent(1)
                    self.rec.calls += 1
                    await call.write(req)
                await call.done_writing()
            except Exception:  # noqa: BLE001  the call ended: the reader accounts for pending
                pass

        sender = asyncio.create_task(send())
        code = "UNKNOWN"  # the stream ended cleanly but left requests unanswered
        try:
            while True:
                res = await call.read()
                if res is grpc.aio.EOF:
                    break
                started = pending.popleft()
                release()
                lat = (time.perf_counter() - started) * 1e6
                if res.HasField("response"):
                    self.rec.record(lat, True, billable=int(res.response.billable),
                                    replayed=int(res.response.replayed))
                else:
                    self.rec.record(lat, False, _CODE_NAMES.get(res.error.code, "UNKNOWN"))
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            if lane is not None:
                lane.alive = False
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            now = time.perf_counter()
            while pending:  # sent, never answered: the outcome is unknown
                self.rec.record((now - pending.popleft()) * 1e6, False, code)
                release()
            while lane is not None and not lane.queue.empty():  # scheduled, never sent
                if lane.queue.get_nowait() is not None:
                    self.in_flight.release()
            call.cancel()

    # ---- open loop
    async def dispatcher(self, stubs: list[Any], lanes: list[_Lane] | None) -> None:
        """Schedule one unit (a call, a batch call or a stream message) every interval."""
        cfg = self.cfg
        assert cfg.rate is not None
        unit = cfg.batch_size if cfg.shape == "batch" else 1
        interval = unit / cfg.rate
        tasks: set[asyncio.Task[None]] = set()
        next_t = time.perf_counter()
        i = 0
        try:
            while True:
                now = time.perf_counter()
                if next_t > now:
                    await asyncio.sleep(next_t - now)
                await self.in_flight.acquire()
                k = self.take(unit)
                if not k:
                    self.in_flight.release()
                    break
                if lanes is not None:
                    alive = [lane for lane in lanes if lane.alive]
                    if not alive:
                        self.in_flight.release()
                        break
                    alive[i % len(alive)].queue.put_nowait(next_t)
                else:
                    stub = stubs[i % len(stubs)]
                    coro = (self.batch_once(stub, k, next_t) if cfg.shape == "batch"
                            else self.unary_once(stub, next_t))
                    task = asyncio.create_task(coro)
                    tasks.add(task)
                    task.add_done_callback(self._done(tasks))
                i += 1
                next_t += interval
        finally:
            for lane in lanes or ():
                lane.queue.put_nowait(None)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            self.in_flight.release()
        return done

    # ---- the whole run
    async def connect(self, n: int) -> None:
        self.channels = [grpc.aio.insecure_channel(self.cfg.target,
                                                   options=_LOAD_CHANNEL_OPTIONS)
                         for _ in range(n)]
        try:
            await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self.channels)),
                                   CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise LoadgenError(f"cannot connect to {self.cfg.target} within "
                               f"{CONNECT_TIMEOUT_S:.0f} s") from None

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)

    def plan(self) -> tuple[int, int]:
        """(channels, streams)."""
        cfg = self.cfg
        if cfg.shape == "stream":
            streams = cfg.streams or (min(cfg.in_flight, STREAMS_AUTO_MAX) if cfg.closed_loop
                                      else STREAMS_AUTO_MAX)
            return cfg.channels or streams, streams
        workers = cfg.in_flight if cfg.closed_loop else cfg.max_in_flight
        return cfg.channels or max(1, min(8, math.ceil(workers / WORKERS_PER_CHANNEL))), 0

    async def run(self) -> None:
        cfg = self.cfg
        n_channels, n_streams = self.plan()
        await self.connect(n_channels)
        self.rec.start()
        self.end_at = self.rec.t0 + cfg.duration_s
        try:
            if cfg.shape == "stream":
                stubs = [self._stub(self.channels[i % n_channels], "ConsumeStream")
                         for i in range(n_streams)]
                if cfg.closed_loop:
                    windows = [cfg.in_flight // n_streams + (i < cfg.in_flight % n_streams)
                               for i in range(n_streams)]
                    await asyncio.gather(*(self.stream_worker(s, w, None)
                                           for s, w in zip(stubs, windows, strict=True) if w))
                else:
                    lanes = [_Lane() for _ in stubs]
                    await asyncio.gather(self.dispatcher([], lanes),
                                         *(self.stream_worker(s, None, lane)
                                           for s, lane in zip(stubs, lanes, strict=True)))
            else:
                method = "ConsumeBatch" if cfg.shape == "batch" else "Consume"
                stubs = ([_Coalesced(cfg)] * n_channels if cfg.client_batching
                         else [self._stub(c, method) for c in self.channels])
                if cfg.closed_loop:
                    worker = self.batch_worker if cfg.shape == "batch" else self.unary_worker
                    await asyncio.gather(*(worker(stubs[i % n_channels])
                                           for i in range(cfg.in_flight)))
                else:
                    await self.dispatcher(stubs, None)
                if cfg.client_batching:  # calls are the batches the client sent
                    self.rec.calls = await stubs[0].close()
        finally:
            await self.close()


class _Coalesced:
    """--client-batching: every request goes through one AsyncLedgerClient(batching=True),
    as a CAPTCHA server's consume() calls would, without retries (errors are counted)."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.client = AsyncLedgerClient(cfg.target, batching=True, linger_ms=cfg.linger_ms,
                                        batch_size_max=cfg.batch_size, retries=0,
                                        timeout_s=cfg.timeout_s,
                                        compact_answers=cfg.view == "compact")

    async def __call__(self, request: bytes, timeout: float) -> qpb.ConsumeResponse:
        return await self.client._call("ledger", "Consume",
                                       qpb.ConsumeRequest.FromString(request))

    async def close(self) -> int:
        await self.client.close()
        return sum(c.calls_sent for c in self.client.coalescers)


async def run_load(config: LoadConfig, *, on_tick: Callable[[dict[str, Any]], None] | None
                   = None, stop: asyncio.Event | None = None) -> LoadResult:
    """Run one bounded load (after the account setup when ``config.create_accounts``).

    ``on_tick`` gets :meth:`Recorder.snapshot` plus ``fraction`` (0..1, how close the run is
    to its request or time bound) every quarter second; setting ``stop`` ends the run early
    (in-flight requests still get their outcome)."""
    config.validate()
    if config.create_accounts:
        await prepare_accounts(config)
    recorder = Recorder()
    run = _Run(config, recorder, stop or asyncio.Event())

    async def ticker() -> None:
        while True:
            await asyncio.sleep(TICK_S)
            if on_tick is not None and run.end_at:
                snap = recorder.snapshot()
                snap["fraction"] = min(1.0, max(recorder.sent / config.requests,
                                                snap["elapsed_s"] / config.duration_s))
                on_tick(snap)

    tick = asyncio.create_task(ticker())
    cpu0 = time.process_time()
    try:
        await run.run()
    finally:
        tick.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick
    mode = (f"closed loop, {config.in_flight} in flight" if config.closed_loop
            else f"open loop, {config.rate:g} requests/s")
    if config.client_batching:
        mode += f", client batching (linger {config.linger_ms:g} ms)"
    elif config.shape == "batch":
        mode += f", {config.view} view"
    return recorder.result(client_cpu_s=time.process_time() - cpu0, shape=config.shape,
                           target=config.target, mode=mode)

