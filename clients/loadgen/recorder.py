"""The accounting of a run (no I/O): counts by outcome, latency histograms, a series per second."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # hdrhistogram is the loadgen extra's: imported when a run starts
    from hdrh.histogram import HdrHistogram

from clients.loadgen.config import LATENCY_MAX_US, LATENCY_MIN_US, PERCENTILES, SIGNIFICANT_DIGITS

# --------------------------------------------------------------------------- accounting

def _percentiles_ms(hist: HdrHistogram) -> dict[str, float]:
    if hist.get_total_count() == 0:
        return {"p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "p99_9_ms": 0.0, "max_ms": 0.0}
    values = hist.get_percentile_to_value_dict(list(PERCENTILES))
    return {"p50_ms": values[50.0] / 1000, "p90_ms": values[90.0] / 1000,
            "p99_ms": values[99.0] / 1000, "p99_9_ms": values[99.9] / 1000,
            "max_ms": hist.get_max_value() / 1000}


class _Outcomes:
    """Every request sent has exactly one outcome: acknowledged or an error by code."""

    sent: int
    acknowledged: int
    errors: Counter[str] | dict[str, int]

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @property
    def consistent(self) -> bool:
        """Every request sent has exactly one outcome."""
        return self.sent == self.acknowledged + self.error_total


class Recorder(_Outcomes):
    """Counts and latencies of one run; no I/O, so it can be tested on its own.

    ``on_sent(n)`` when n requests leave; ``record(latency_us, ok, code, n)`` when their
    outcome is known. Every request must get exactly one ``record``.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        from hdrh.histogram import HdrHistogram

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
class LoadResult(_Outcomes):
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

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "consistent": self.consistent}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

