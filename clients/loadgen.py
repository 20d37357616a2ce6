"""`loadtest`: a load generator for quota-ledger's hot path (Consume, ConsumeBatch, ConsumeStream).

Run it against a deployment you own: unless ``--dry-run`` is given, every acknowledged request
is a real, billable journal entry on the accounts it uses (``--account-prefix``, default
``load-``).

What it measures
    Every request's latency goes into an HdrHistogram (microseconds, 1 us .. 60 s, 3
    significant digits); a batch item's latency is its call's. Every request ends in exactly
    one outcome: acknowledged (a ``ConsumeResponse``, billable or not, replayed or not) or an
    error counted under its gRPC status code name. A request whose outcome is unknown (the
    deadline passed, the stream broke) counts as an error with that code, so at the end
    ``sent == acknowledged + sum(errors)``. Per second of the run it keeps throughput and p99
    for ``--plot``.

Closed or open loop (mutually exclusive)
    ``--concurrency N`` (closed loop, the default with N=16): N requests in flight; the next is
    sent when one is answered. For ``unary`` that is N calls, for ``batch`` N calls of
    ``--batch-size`` requests each, for ``stream`` N messages in flight over ``--streams``
    streams. Throughput is whatever the server allows.
    ``--rate R`` (open loop): R requests per second are scheduled at fixed intervals whatever
    the answers (``batch``: R/batch-size calls per second; ``stream``: messages spread over the
    streams). Latency counts from the *scheduled* send time, so a stalled server shows up in
    the percentiles instead of slowing the generator down (no coordinated omission). At most
    ``--max-in-flight`` calls (stream: messages) are outstanding; beyond that the schedule
    waits, and that wait is in the latencies too.

Always bounded
    It stops sending at ``--requests`` (default 10,000) or ``--duration`` (default 30 s),
    whichever comes first, then waits for what is in flight, each call at most ``--timeout``.

The pure accounting is :class:`Recorder` (no I/O); :func:`run_load` is the asyncio driver
(``grpc.aio``, one channel per ``--channels``) that ``tests/bench.py`` calls; ``loadtest`` is
the click command (``ledgerctl loadtest`` once it is registered on ledgerctl's group).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import os
import random
import secrets
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import click
import grpc
from hdrh.histogram import HdrHistogram
from quota_ledger.v1 import common_pb2 as pb
from quota_ledger.v1 import quota_ledger_pb2 as qpb

from clients.client import (
    CHANNEL_OPTIONS,
    DEFAULT_TARGET,
    AsyncLedgerClient,
    LedgerError,
    enum_value,
)

SHAPES = ("unary", "stream", "batch")
DEFAULT_ACCOUNTS = 100
DEFAULT_REQUESTS = 10_000
DEFAULT_DURATION_S = 30.0
DEFAULT_CONCURRENCY = 16
DEFAULT_BATCH_SIZE = 100
BATCH_SIZE_MAX = 1_000  # CONTRACT: a ConsumeBatch holds at most 1,000 requests
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_IN_FLIGHT = 10_000
DEFAULT_TOP_UP_MICROS = 10_000_000  # USD 10 on top of the plan's price
WORKERS_PER_CHANNEL = 64  # --channels auto: one aio channel (one connection) per 64 workers
STREAMS_AUTO_MAX = 4
SETUP_CONCURRENCY = 32
CONNECT_TIMEOUT_S = 10.0
TICK_S = 0.25
LATENCY_MIN_US = 1
LATENCY_MAX_US = 60_000_000
SIGNIFICANT_DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
MICROS_PER_USD = 1_000_000

_SERVICE = "/" + qpb.DESCRIPTOR.services_by_name["QuotaLedger"].full_name
_CODE_NAMES = {sc.value[0]: sc.name for sc in grpc.StatusCode}
# Separate channels get separate connections (gRPC shares subchannels between equal channels).
_LOAD_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


class LoadgenError(RuntimeError):
    """The run could not start (bad configuration, unreachable target, failed setup)."""


# --------------------------------------------------------------------------- configuration

@dataclass
class LoadConfig:
    """One run. ``concurrency`` and ``rate`` are mutually exclusive (see the module doc)."""

    target: str = DEFAULT_TARGET
    accounts: int = DEFAULT_ACCOUNTS
    account_prefix: str = "load-"
    account_ids: list[str] | None = None  # explicit ids; overrides accounts/account_prefix
    create_accounts: bool = False
    plan: str | None = None
    top_up_micros: int = DEFAULT_TOP_UP_MICROS
    skew: str = "uniform"
    hot_fraction: float = 0.1
    shape: str = "unary"
    batch_size: int = DEFAULT_BATCH_SIZE
    concurrency: int | None = None
    rate: float | None = None
    requests: int = DEFAULT_REQUESTS
    duration_s: float = DEFAULT_DURATION_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    streams: int | None = None
    channels: int | None = None
    region: str = "mainland"
    captcha_type: str = "slider"
    architecture: str = "v2"
    step: str = "3"
    quantity: int = 1
    dry_run: bool = False
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError with a message a person can act on."""
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}; got {self.shape!r}")
        if self.concurrency is not None and self.rate is not None:
            raise ValueError("--concurrency (closed loop) and --rate (open loop) are mutually "
                             "exclusive; give one")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a positive number of requests per second")
        if not 1 <= self.batch_size <= BATCH_SIZE_MAX:
            raise ValueError(f"batch size must be 1..{BATCH_SIZE_MAX:,}; got {self.batch_size}")
        if self.requests < 1:
            raise ValueError("requests must be at least 1 (the run is always bounded)")
        if not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ValueError("duration must be a positive number of seconds "
                             "(the run is always bounded)")
        if not self.timeout_s > 0:
            raise ValueError("timeout must be positive")
        if self.max_in_flight < 1:
            raise ValueError("max in flight must be at least 1")
        if self.account_ids is not None:
            if not self.account_ids:
                raise ValueError("account_ids is empty")
        elif self.accounts < 1:
            raise ValueError("accounts must be at least 1")
        if not 0 < self.hot_fraction <= 1:
            raise ValueError("hot fraction must be in (0, 1]")
        if self.streams is not None and self.streams < 1:
            raise ValueError("streams must be at least 1")
        if self.channels is not None and self.channels < 1:
            raise ValueError("channels must be at least 1")
        if not 1 <= self.quantity <= 1_000_000:
            raise ValueError("quantity must be 1..1,000,000")
        if self.top_up_micros < 0:
            raise ValueError("top-up must not be negative")
        parse_skew(self.skew, self.hot_fraction)
        for enum, value in ((pb.Region, self.region), (pb.CaptchaType, self.captcha_type),
                            (pb.ClientArchitecture, self.architecture),
                            (pb.VerificationStep, self.step)):
            enum_value(enum, value)

    @property
    def closed_loop(self) -> bool:
        return self.rate is None

    @property
    def in_flight(self) -> int:
        return self.concurrency or DEFAULT_CONCURRENCY

    def ids(self) -> list[str]:
        if self.account_ids is not None:
            return list(self.account_ids)
        width = max(4, len(str(self.accounts - 1)))
        return [f"{self.account_prefix}{i:0{width}d}" for i in range(self.accounts)]


# --------------------------------------------------------------------------- traffic skew

@dataclass(frozen=True)
class Skew:
    """How traffic spreads over accounts: ``uniform``, ``hot`` (``traffic`` of the requests go
    to the first ``hot`` fraction of the accounts) or ``zipf`` (weight 1/rank**exponent)."""

    kind: str
    traffic: float = 0.0
    hot: float = 0.0
    exponent: float = 1.0


def parse_skew(spec: str, hot_fraction: float = 0.1) -> Skew:
    """``uniform`` | ``zipf`` | ``zipf:S`` | ``F`` (fraction of traffic to the hot accounts,
    the first ``hot_fraction`` of them) | ``P/H`` (P% of traffic to H% of accounts: ``90/10``)."""
    s = spec.strip().lower()
    if s in ("", "none", "uniform", "0"):
        return Skew("uniform")
    if s == "zipf" or s.startswith("zipf:"):
        exponent = 1.0
        if ":" in s:
            try:
                exponent = float(s.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"zipf exponent must be a number: {spec!r}") from None
        if not 0 < exponent <= 10:
            raise ValueError(f"zipf exponent must be in (0, 10]: {spec!r}")
        return Skew("zipf", exponent=exponent)
    try:
        if "/" in s:
            p, h = (float(x.rstrip("%")) for x in s.split("/", 1))
            traffic, hot = p / 100, h / 100
        else:
            traffic, hot = float(s.rstrip("%")), hot_fraction
            if s.endswith("%"):
                traffic /= 100
    except ValueError:
        raise ValueError(f"--skew takes uniform, zipf[:S], a traffic fraction such as 0.9, or "
                         f"P/H such as 90/10; got {spec!r}") from None
    if not (0 <= traffic <= 1 and 0 < hot <= 1):
        raise ValueError(f"--skew fractions must be within 0..1 (or 0..100%): {spec!r}")
    return Skew("hot", traffic=traffic, hot=hot)


class AccountPicker:
    """Draws account indexes 0..n-1 according to a :class:`Skew` (account 0 is the hottest)."""

    def __init__(self, n: int, skew: Skew, rng: random.Random | None = None) -> None:
        self.n, self.skew = n, skew
        self._random = (rng or random.Random()).random
        self.n_hot = max(1, min(n, math.ceil(n * skew.hot))) if skew.kind == "hot" else n
        self._cum: list[float] = []
        if skew.kind == "zipf":
            total = 0.0
            for k in range(1, n + 1):
                total += 1.0 / k ** skew.exponent
                self._cum.append(total)
            self._cum = [c / total for c in self._cum]

    def pick(self) -> int:
        r = self._random()
        kind = self.skew.kind
        if kind == "uniform":
            return int(r * self.n)
        if kind == "zipf":
            return min(bisect.bisect_left(self._cum, r), self.n - 1)
        cold = self.n - self.n_hot
        if r < self.skew.traffic or cold == 0:
            return int(self._random() * self.n_hot)
        return self.n_hot + int(self._random() * cold)


# --------------------------------------------------------------------------- accounting

def _percentiles_ms(hist: HdrHistogram) -> dict[str, float]:
    if hist.get_total_count() == 0:
        return {"p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "p99_9_ms": 0.0, "max_ms": 0.0}
    values = hist.get_percentile_to_value_dict(list(PERCENTILES))
    return {"p50_ms": values[50.0] / 1000, "p90_ms": values[90.0] / 1000,
            "p99_ms": values[99.0] / 1000, "p99_9_ms": values[99.9] / 1000,
            "max_ms": hist.get_max_value() / 1000}


class Recorder:
    """Counts and latencies of one run; no I/O, so it can be tested on its own.

    ``on_sent(n)`` when n requests leave; ``record(latency_us, ok, code, n)`` when their
    outcome is known. Every request must get exactly one ``record``.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.hist = HdrHistogram(LATENCY_MIN_US, LATENCY_MAX_US, SIGNIFICANT_DIGITS)
        self.sent = 0
        self.acknowledged = 0
        self.billable = 0
        self.replayed = 0
        self.calls = 0
        self.errors: Counter[str] = Counter()
        self.series: list[dict[str, Any]] = []
        self.t0 = clock()
        self.last_at = self.t0
        self._second = 0
        self._sec_hist = HdrHistogram(LATENCY_MIN_US, LATENCY_MAX_US, 2)
        self._sec_acks = 0
        self._sec_errors = 0

    def start(self, at: float | None = None) -> None:
        self.t0 = self.last_at = self.clock() if at is None else at

    def on_sent(self, n: int = 1) -> None:
        self.sent += n

    def record(self, latency_us: float, ok: bool, code: str = "OK", n: int = 1, *,
               billable: int = 0, replayed: int = 0, at: float | None = None) -> None:
        """n requests answered after latency_us: acknowledged when ok, else an error ``code``."""
        if n <= 0:
            return
        at = self.clock() if at is None else at
        self._roll(at)
        value = min(max(int(latency_us), LATENCY_MIN_US), LATENCY_MAX_US)
        self.hist.record_value(value, n)
        self._sec_hist.record_value(value, n)
        if ok:
            self.acknowledged += n
            self.billable += billable
            self.replayed += replayed
            self._sec_acks += n
        else:
            self.errors[code] += n
            self._sec_errors += n
        self.last_at = max(self.last_at, at)

    def _roll(self, at: float) -> None:
        second = max(0, int(at - self.t0))
        while second > self._second:
            self._close_second()

    def _close_second(self) -> None:
        p99 = (self._sec_hist.get_value_at_percentile(99.0) / 1000
               if self._sec_hist.get_total_count() else None)
        self.series.append({"second": self._second, "acknowledged": self._sec_acks,
                            "errors": self._sec_errors, "p99_ms": p99})
        self._sec_hist.reset()
        self._sec_acks = self._sec_errors = 0
        self._second += 1

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @property
    def consistent(self) -> bool:
        return self.sent == self.acknowledged + self.error_total

    def percentiles(self) -> dict[str, float]:
        """p50/p90/p99/p99.9 and max over the whole run, in milliseconds."""
        return _percentiles_ms(self.hist)

    def snapshot(self) -> dict[str, Any]:
        """A cheap view for progress displays (no full-histogram walk)."""
        last = self.series[-1] if self.series else None
        return {"sent": self.sent, "acknowledged": self.acknowledged,
                "errors": self.error_total, "elapsed_s": self.clock() - self.t0,
                "last_second_acks": last["acknowledged"] if last else self._sec_acks,
                "last_second_p99_ms": last["p99_ms"] if last else None}

    def result(self, *, elapsed_s: float | None = None, **extra: Any) -> LoadResult:
        if self._sec_acks or self._sec_errors:
            self._close_second()
        elapsed = self.last_at - self.t0 if elapsed_s is None else elapsed_s
        elapsed = max(elapsed, 1e-9)
        return LoadResult(
            sent=self.sent, acknowledged=self.acknowledged, errors=dict(self.errors),
            elapsed_s=elapsed, rate_per_s=self.acknowledged / elapsed, calls=self.calls,
            calls_per_s=self.calls / elapsed, billable=self.billable, replayed=self.replayed,
            **self.percentiles(), series=list(self.series), **extra)


@dataclass
class LoadResult:
    """What one run did. ``rate_per_s`` is acknowledged requests per second of ``elapsed_s``
    (first send to last outcome); ``calls`` counts RPCs (stream: messages); latencies are per
    request, in milliseconds; ``series`` is one entry per second of the run."""

    sent: int
    acknowledged: int
    errors: dict[str, int]
    elapsed_s: float
    rate_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p99_9_ms: float
    max_ms: float
    calls: int = 0
    calls_per_s: float = 0.0
    billable: int = 0
    replayed: int = 0
    client_cpu_s: float = 0.0
    shape: str = ""
    target: str = ""
    mode: str = ""
    series: list[dict[str, Any]] = field(default_factory=list)

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @property
    def consistent(self) -> bool:
        """Every request sent has exactly one outcome."""
        return self.sent == self.acknowledged + self.error_total

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "consistent": self.consistent}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --------------------------------------------------------------------------- the wire

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class RequestFactory:
    """Serialized ``ConsumeRequest`` bytes, built by concatenation (protobuf merges fields of
    concatenated messages): a per-account prefix, a fresh ``request_id`` (field 2) and the
    fixed fields. Several times cheaper than building message objects, so a single client
    process can keep a fast server busy."""

    def __init__(self, config: LoadConfig, ids: list[str], picker: AccountPicker) -> None:
        self.picker = picker
        self._prefix = [qpb.ConsumeRequest(account_id=a).SerializeToString() for a in ids]
        self._tail = qpb.ConsumeRequest(
            region=enum_value(pb.Region, config.region),
            captcha_type=enum_value(pb.CaptchaType, config.captcha_type),
            architecture=enum_value(pb.ClientArchitecture, config.architecture),
            step=enum_value(pb.VerificationStep, config.step),
            quantity=config.quantity, dry_run=config.dry_run).SerializeToString()
        self.run_id = secrets.token_hex(6)
        self.count = 0

    def one(self) -> bytes:
        self.count += 1
        rid = f"lg-{self.run_id}-{self.count}".encode()
        return (self._prefix[self.picker.pick()] + b"\x12" + _varint(len(rid)) + rid
                + self._tail)

    def batch(self, k: int) -> bytes:
        parts = []
        for _ in range(k):
            item = self.one()
            parts.append(b"\x0a" + _varint(len(item)) + item)
        return b"".join(parts)


# --------------------------------------------------------------------------- account setup

async def prepare_accounts(config: LoadConfig, client: AsyncLedgerClient | None = None
                           ) -> dict[str, int]:
    """Create the accounts (existing ones are kept), top them up and buy ``config.plan`` for
    each. Top-up and purchase carry request ids derived from the account, amount and spec, so
    running the same setup again is a replay (R12) and charges nothing twice."""
    own = client is None
    client = client or AsyncLedgerClient(config.target, timeout_s=config.timeout_s)
    try:
        price = 0
        if config.plan:
            specs = {s.spec_id: s for s in (await client.list_plan_specs()).specs}
            if config.plan not in specs:
                raise LoadgenError(f"no plan spec {config.plan!r}; the catalog has: "
                                   f"{', '.join(sorted(specs))}")
            price = specs[config.plan].price_micros
        amount = price + config.top_up_micros
        counts = Counter[str]()
        sem = asyncio.Semaphore(SETUP_CONCURRENCY)

        async def one(account_id: str) -> None:
            async with sem:
                try:
                    await client.create_account(account_id, "loadtest")
                    counts["created"] += 1
                except LedgerError as exc:
                    if exc.code != grpc.StatusCode.ALREADY_EXISTS:
                        raise
                    counts["existing"] += 1
                if amount:
                    await client.top_up(account_id, amount, "cash",
                                        request_id=f"loadtest-top-up-{amount}")
                if config.plan:
                    await client.purchase_plan(account_id, config.plan,
                                               request_id=f"loadtest-plan-{config.plan}")
                    counts["plans"] += 1

        try:
            await asyncio.gather(*(one(a) for a in config.ids()))
        except LedgerError as exc:
            raise LoadgenError(f"account setup failed: {exc}") from exc
        return dict(counts)
    finally:
        if own:
            await client.close()


# --------------------------------------------------------------------------- the driver

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
        ok = billable = replayed = 0
        errors: Counter[int] = Counter()
        results = resp.results
        for r in results[:k] if len(results) > k else results:  # one result per request
            if r.HasField("response"):
                ok += 1
                response = r.response
                billable += response.billable
                replayed += response.replayed
            else:
                errors[r.error.code] += 1
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
                stubs = [self._stub(c, method) for c in self.channels]
                if cfg.closed_loop:
                    worker = self.batch_worker if cfg.shape == "batch" else self.unary_worker
                    await asyncio.gather(*(worker(stubs[i % n_channels])
                                           for i in range(cfg.in_flight)))
                else:
                    await self.dispatcher(stubs, None)
        finally:
            await self.close()


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
    return recorder.result(client_cpu_s=time.process_time() - cpu0, shape=config.shape,
                           target=config.target, mode=mode)


# --------------------------------------------------------------------------- reporting

def _summary_table(result: LoadResult) -> Any:
    from rich.table import Table

    table = Table(title=f"loadtest {result.shape} -> {result.target} ({result.mode})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("sent", f"{result.sent:,}"),
        ("acknowledged", f"{result.acknowledged:,} ({result.billable:,} billable, "
                         f"{result.replayed:,} replayed)"),
        ("errors", ", ".join(f"{k} {v:,}" for k, v in sorted(result.errors.items())) or "0"),
        ("elapsed", f"{result.elapsed_s:.2f} s"),
        ("throughput", f"{result.rate_per_s:,.0f} acknowledged/s ({result.calls_per_s:,.0f} "
                       f"{'messages' if result.shape == 'stream' else 'calls'}/s)"),
        ("latency p50 / p90", f"{result.p50_ms:.3f} / {result.p90_ms:.3f} ms"),
        ("latency p99 / p99.9 / max",
         f"{result.p99_ms:.3f} / {result.p99_9_ms:.3f} / {result.max_ms:.3f} ms"),
        ("client CPU", f"{result.client_cpu_s:.2f} s"),
        ("sent = acknowledged + errors", "yes" if result.consistent else "NO (a bug: report it)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(result: LoadResult, path: str) -> None:
    """Throughput and p99 per second of the run, one PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [s["second"] for s in result.series]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.plot(seconds, [s["acknowledged"] for s in result.series], label="acknowledged/s")
    top.plot(seconds, [s["errors"] for s in result.series], label="errors/s")
    top.set_ylabel("requests/s")
    top.legend()
    bottom.plot(seconds, [s["p99_ms"] if s["p99_ms"] is not None else float("nan")
                          for s in result.series], color="tab:red")
    bottom.set_ylabel("p99 latency (ms)")
    bottom.set_xlabel("second of the run")
    fig.suptitle(f"loadtest {result.shape} -> {result.target} ({result.mode})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _usd_to_micros(text: str) -> int:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise click.BadParameter(f"not an amount in USD: {text!r}") from None
    micros = value * MICROS_PER_USD
    if value < 0 or micros != micros.to_integral_value():
        raise click.BadParameter("a non-negative USD amount with at most 6 decimals")
    return int(micros)


# --------------------------------------------------------------------------- the command

@click.command("loadtest", context_settings={"help_option_names": ["-h", "--help"],
                                             "max_content_width": 100})
@click.option("--target", default=None, metavar="HOST:PORT",
              help=f"Server address (default: ledgerctl's --target, $LEDGER_TARGET, "
                   f"{DEFAULT_TARGET}).")
@click.option("--accounts", default=DEFAULT_ACCOUNTS, show_default=True, type=click.IntRange(1),
              help="Number of accounts the traffic goes to.")
@click.option("--account-prefix", default="load-", show_default=True,
              help="Account ids are PREFIX0000, PREFIX0001, ...")
@click.option("--create-accounts", is_flag=True,
              help="Before the run: create the accounts (existing ones are kept), top them up "
                   "and, with --plan, buy that plan for each (re-running is a replay).")
@click.option("--plan", default=None, metavar="SPEC",
              help="With --create-accounts: the plan spec each account buys (ledgerctl specs).")
@click.option("--top-up", "top_up", default="10", show_default=True, metavar="USD",
              help="With --create-accounts: cash each account gets beyond the plan's price.")
@click.option("--skew", default="uniform", show_default=True,
              help="Traffic over accounts: uniform, zipf[:S], a fraction F of traffic to the "
                   "hot accounts (--hot-fraction of them), or P/H (90/10: 90%% to 10%%).")
@click.option("--hot-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="The share of accounts that are hot when --skew is a fraction.")
@click.option("--shape", type=click.Choice(SHAPES), default="unary", show_default=True,
              help="Consume calls, ConsumeStream messages or ConsumeBatch calls.")
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True,
              type=click.IntRange(1, BATCH_SIZE_MAX), help="Requests per ConsumeBatch call.")
@click.option("--concurrency", type=click.IntRange(1), default=None,
              help=f"Closed loop: requests in flight (default {DEFAULT_CONCURRENCY}). "
                   "Not with --rate.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Open loop: requests per second, sent on schedule whatever the answers; "
                   "latency counts from the scheduled time. Not with --concurrency.")
@click.option("--requests", default=DEFAULT_REQUESTS, show_default=True, type=click.IntRange(1),
              help="Stop after this many requests...")
@click.option("--duration", default=DEFAULT_DURATION_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="...or after this many seconds, whichever comes first.")
@click.option("--timeout", default=DEFAULT_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Deadline of each call (a stream: --duration plus this).")
@click.option("--max-in-flight", default=DEFAULT_MAX_IN_FLIGHT, show_default=True,
              type=click.IntRange(1),
              help="Open loop: most calls (stream: messages) outstanding at once.")
@click.option("--streams", type=click.IntRange(1), default=None,
              help=f"--shape stream: streams to spread the load over (default up to "
                   f"{STREAMS_AUTO_MAX}).")
@click.option("--channels", type=click.IntRange(1), default=None,
              help=f"gRPC channels (connections); default one per {WORKERS_PER_CHANNEL} "
                   "workers.")
@click.option("--region", default="mainland", show_default=True, help="mainland or outside.")
@click.option("--type", "captcha_type", default="slider", show_default=True,
              help="CAPTCHA type: slider, puzzle, one-click, image-restoration, invisible.")
@click.option("--arch", "architecture", default="v2", show_default=True, help="v2 or v3.")
@click.option("--step", default="3", show_default=True, help="3 or 4.1.")
@click.option("--quantity", default=1, show_default=True, type=click.IntRange(1, 1_000_000),
              help="Billable requests each ConsumeRequest stands for.")
@click.option("--dry-run", is_flag=True,
              help="Send dry runs: the ledger answers what would happen and records nothing.")
@click.option("--seed", type=int, default=None, help="Seed for the account choice.")
@click.option("--json-out", default=None, metavar="FILE",
              help="Write the result as JSON here ('-' for stdout; the table goes to stderr).")
@click.option("--plot", default=None, metavar="FILE.png",
              help="Plot throughput and p99 per second (needs matplotlib, not a dependency).")
@click.option("--quiet", "-q", is_flag=True, help="No live progress bar.")
@click.pass_context
def loadtest(ctx: click.Context, target: str | None, accounts: int, account_prefix: str,
             create_accounts: bool, plan: str | None, top_up: str, skew: str,
             hot_fraction: float, shape: str, batch_size: int, concurrency: int | None,
             rate: float | None, requests: int, duration: float, timeout: float,
             max_in_flight: int, streams: int | None, channels: int | None, region: str,
             captcha_type: str, architecture: str, step: str, quantity: int, dry_run: bool,
             seed: int | None, json_out: str | None, plot: str | None, quiet: bool) -> None:
    """Drive Consume traffic at a ledger and report throughput and latency.

    Every acknowledged request is billed on its account unless --dry-run. The run is always
    bounded: it stops at --requests or --duration, whichever comes first. It prints sent,
    acknowledged and errors by gRPC code (sent = acknowledged + errors), throughput and
    latency percentiles from an HdrHistogram.

    \b
    Example:
      ledgerctl loadtest --target 127.0.0.1:50051 --accounts 1000 --create-accounts \\
          --plan year-100m --shape batch --batch-size 1000 --concurrency 4 --duration 20
      ledgerctl loadtest --rate 2000 --skew 90/10 --duration 60 --json-out run.json
    """
    if target is None:
        target = (getattr(ctx.obj, "target", None) or os.environ.get("LEDGER_TARGET")
                  or DEFAULT_TARGET)
    if concurrency is not None and rate is not None:
        raise click.UsageError("--concurrency (closed loop) and --rate (open loop) are "
                               "mutually exclusive; give one")
    if plan and not create_accounts:
        raise click.UsageError("--plan is bought during account setup: add --create-accounts")
    config = LoadConfig(
        target=target, accounts=accounts, account_prefix=account_prefix,
        create_accounts=create_accounts, plan=plan, top_up_micros=_usd_to_micros(top_up),
        skew=skew, hot_fraction=hot_fraction, shape=shape, batch_size=batch_size,
        concurrency=concurrency, rate=rate, requests=requests, duration_s=duration,
        timeout_s=timeout, max_in_flight=max_in_flight, streams=streams, channels=channels,
        region=region, captcha_type=captcha_type, architecture=architecture, step=step,
        quantity=quantity, dry_run=dry_run, seed=seed)
    try:
        config.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    from rich.console import Console

    err = Console(stderr=True)
    out = err if json_out == "-" else Console()
    if plot and not matplotlib_available():
        err.print(f"[yellow]--plot {plot}: matplotlib is not installed, so no plot will be "
                  "written (pip install matplotlib); the run goes on.[/]")
        plot = None
    try:
        result = asyncio.run(_run_with_progress(config, quiet, err))
    except LoadgenError as exc:
        err.print(f"[red]error:[/] {exc}")
        sys.exit(1)
    out.print(_summary_table(result))
    if json_out == "-":
        click.echo(result.to_json())
    elif json_out:
        with open(json_out, "w") as f:
            f.write(result.to_json() + "\n")
        err.print(f"result written to {json_out}")
    if plot:
        write_plot(result, plot)
        err.print(f"plot written to {plot}")
    if not result.consistent:
        err.print("[red]sent != acknowledged + errors: the load generator lost count[/]")
        sys.exit(3)


async def _run_with_progress(config: LoadConfig, quiet: bool, console: Any) -> LoadResult:
    """run_load with a rich progress bar. The first Ctrl-C stops sending and waits for what
    is in flight (each call at most --timeout); a second one interrupts."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first_interrupt() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)
        console.print("stopping: waiting for the requests in flight (Ctrl-C again to abort)")

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, first_interrupt)
    try:
        if config.create_accounts:
            if not quiet:
                console.print(f"setting up {len(config.ids()):,} accounts on {config.target}...")
            done = await prepare_accounts(config)
            if not quiet:
                console.print("accounts: " + ", ".join(f"{k} {v:,}" for k, v in done.items()))
            config = LoadConfig(**{**asdict(config), "create_accounts": False})
        if quiet:
            return await run_load(config, stop=stop)
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("[bold]{task.description}"), BarColumn(),
                   TextColumn("{task.fields[stats]}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(f"{config.shape}", total=1000, stats="connecting")

            def tick(snap: dict[str, Any]) -> None:
                p99 = snap["last_second_p99_ms"]
                stats = (f"sent {snap['sent']:,}  acked {snap['acknowledged']:,}  "
                         f"errors {snap['errors']:,}  {snap['last_second_acks']:,}/s  "
                         f"p99 {'-' if p99 is None else f'{p99:.2f} ms'}")
                progress.update(task, completed=int(snap["fraction"] * 1000), stats=stats)

            result = await run_load(config, on_tick=tick, stop=stop)
            tick({"sent": result.sent, "acknowledged": result.acknowledged,
                  "errors": result.error_total, "fraction": 1.0,
                  "last_second_acks": round(result.rate_per_s), "last_second_p99_ms":
                  result.p99_ms})
            return result
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)


__all__ = ["AccountPicker", "LoadConfig", "LoadResult", "LoadgenError", "Recorder",
           "RequestFactory", "Skew", "loadtest", "parse_skew", "prepare_accounts", "run_load"]

if __name__ == "__main__":
    loadtest()
