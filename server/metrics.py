"""Prometheus metrics (prometheus-client), served over HTTP with ``--metrics-listen``.

Label sets are bounded: RPC method names and status codes are fixed lists, regions are two.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5)
GROUP_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SETTLEMENT_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STATUS_NAMES = {1: "active", 2: "overdue", 3: "suspended"}
REGION_NAMES = {1: "chinese_mainland", 2: "outside_chinese_mainland"}


class _StateCollector(Collector):
    """Figures read from committed state at scrape time: accounts by status and, opt-in,
    units remaining for the top-N accounts (bounded cardinality)."""

    def __init__(self, query: Callable[[str, tuple], list[Any]], top_accounts: int) -> None:
        self.query, self.top_accounts = query, top_accounts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_status = GaugeMetricFamily("ledger_accounts", "Accounts by status", labels=["status"])
        counts = dict(self.query("SELECT status, count(*) FROM accounts GROUP BY status", ()))
        for number, name in STATUS_NAMES.items():
            by_status.add_metric([name], counts.get(number, 0))
        yield by_status
        if self.top_accounts:
            top = GaugeMetricFamily(
                "ledger_account_units_remaining",
                f"Units left over unexpired, unrefunded plans: the {self.top_accounts} accounts "
                "with the most", labels=["account_id"])
            for account_id, units in self.query(
                    "SELECT account_id, sum(units_remaining) FROM plans WHERE refunded_at_us IS"
                    " NULL AND units_remaining > 0 AND expires_at_us > ? GROUP BY account_id"
                    " ORDER BY 2 DESC, 1 LIMIT ?", (None, self.top_accounts)):
                top.add_metric([account_id], units)
            yield top


class _ContentionCollector(Collector):
    """Several nodes on one PostgreSQL database (issue 20): how long this node's groups
    waited for their accounts' locks, and how many cached accounts it reloaded because
    another node had changed them, and the time its groups took, against which the lock
    waits are a share (issue 20: at most 5% with account affinity). Read at scrape time from
    the store, the engine and the writer, so the hot path only adds to numbers."""

    def __init__(self, lock_wait_s: Callable[[], float], reloads: Callable[[], int],
                 group_s: Callable[[], float]) -> None:
        self.lock_wait_s, self.reloads, self.group_s = lock_wait_s, reloads, group_s

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "ledger_pg_lock_wait_seconds", "Time this node's groups waited for their accounts'"
            " advisory locks, by PostgreSQL's clock", value=self.lock_wait_s())
        yield CounterMetricFamily(
            "ledger_pg_account_reloads", "Cached accounts this node reloaded because another"
            " node had changed them", value=self.reloads())
        yield CounterMetricFamily(
            "ledger_pg_group_seconds", "Time this node's groups took, from their opening to"
            " their commit's end (lock waits included)", value=self.group_s())


class _Histogram:
    """One histogram's counts as plain numbers: a count per bucket (the last is +Inf) and
    the sum. Added to by one thread at a time (see :class:`_HotCollector`)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with le >= v
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((floatToGoString(bound), total))
        return out


class _HotCollector(Collector):
    """The series every call or commit adds to (issue 18): plain ints and floats on the hot
    path, turned into metric families only at scrape time, the same names, labels and
    buckets as prometheus-client's own Counter and Histogram (without their ``_created``
    series). A prometheus-client child takes a lock per increment: four to six a lone call.
    Each figure has one writer at a time: the RPC figures the event loop's thread, the
    commit figures whichever thread holds the engine lock."""

    def __init__(self) -> None:
        self.rpcs: dict[tuple[str, str], int] = {}
        self.rpc_latency: dict[str, _Histogram] = {}
        self.billable: dict[tuple[str, str], int] = dict.fromkeys(  # every series from 0
            ((region, by) for region in REGION_NAMES.values() for by in ("plan", "payg")), 0)
        self.commits = 0
        self.group_size = _Histogram(tuple(float(b) for b in GROUP_SIZE_BUCKETS))
        self.commit_latency = _Histogram(LATENCY_BUCKETS_S)

    def collect(self) -> Iterator[Any]:
        rpcs = CounterMetricFamily("ledger_rpc_requests", "RPCs handled, by method and status"
                                   " code", labels=["method", "code"])
        for key, n in list(self.rpcs.items()):
            rpcs.add_metric(list(key), n)
        yield rpcs
        latency = HistogramMetricFamily("ledger_rpc_latency_seconds", "RPC handling time",
                                        labels=["method"])
        for method, h in list(self.rpc_latency.items()):
            latency.add_metric([method], h.buckets(), h.sum)
        yield latency
        yield CounterMetricFamily("ledger_commits", "Group commits (one transaction and "
                                  "fsync)", value=self.commits)
        for name, doc, h in (
                ("ledger_commit_group_requests", "Requests committed together in one "
                 "transaction", self.group_size),
                ("ledger_commit_latency_seconds", "Time to write and fsync one group",
                 self.commit_latency)):
            yield HistogramMetricFamily(name, doc, buckets=h.buckets(), sum_value=h.sum)
        units = CounterMetricFamily("ledger_billable_units", "Billable requests, by region "
                                    "and how they were paid", labels=["region", "paid_by"])
        for key, n in list(self.billable.items()):
            units.add_metric(list(key), n)
        yield units


class _NoticeCollector(Collector):
    def __init__(self, stats: Callable[[], tuple[int, float | None]],
                 now_s: Callable[[], float]) -> None:
        self.stats, self.now_s = stats, now_s

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pending, oldest = self.stats()
        yield GaugeMetricFamily("ledger_notices_pending", "Notice deliveries not yet "
                                "acknowledged by their webhook (retried until 24 h)",
                                value=pending)
        yield GaugeMetricFamily("ledger_notice_oldest_pending_age_seconds", "Age of the oldest "
                                "pending notice delivery; 0 when none is pending",
                                value=0 if oldest is None else max(0.0, self.now_s() - oldest))


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.hot = _HotCollector()
        r.register(self.hot)
        self.queue_depth = Gauge("ledger_writer_queue_depth", "Submissions waiting for the writer",
                                 registry=r)
        self.queue_limit = Gauge("ledger_writer_queue_limit", "Writer queue bound "
                                 "(queue_depth_max): beyond it, RESOURCE_EXHAUSTED", registry=r)
        self.ready = Gauge("ledger_ready", "1 while gRPC serves (health SERVING), 0 before and "
                           "while draining", registry=r)
        self.last_settled_end = Gauge(
            "ledger_last_settled_day_end_timestamp_seconds",
            "End of the last settled billing day (UTC+8), unix seconds, as committed; before "
            "the first settlement the start of the ledger's first day; NaN while it is empty",
            registry=r)
        self.journal_rows = Gauge("ledger_journal_entries", "Journal entries committed",
                                  registry=r)
        self.settlements = Counter("ledger_settlements", "Billing days settled", registry=r)
        self.settlement_seconds = Histogram(
            "ledger_settlement_duration_seconds", "Time to settle one billing day",
            buckets=SETTLEMENT_BUCKETS_S, registry=r)
        self.settlement_bills = Counter("ledger_settlement_bills", "Bills issued", registry=r)

    def watch_notices(self, stats: Callable[[], tuple[int, float | None]],
                      now_s: Callable[[], float]) -> tuple[Any, Any]:
        """Webhook delivery (issue 22): pending and the oldest pending's age, read at scrape
        time; returns the (delivered, failed attempts) counters the delivery thread adds to."""
        self.registry.register(_NoticeCollector(stats, now_s))
        return (Counter("ledger_notices_delivered", "Notice deliveries a webhook acknowledged "
                        "(2xx)", registry=self.registry),
                Counter("ledger_notice_delivery_failures", "Delivery attempts that failed "
                        "(no 2xx, a timeout, a refused connection); each is retried",
                        registry=self.registry))

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """One call's count and latency (the hot path: plain numbers, :class:`_HotCollector`)."""
        rpcs = self.hot.rpcs
        key = (method, code)
        rpcs[key] = rpcs.get(key, 0) + 1
        latency = self.hot.rpc_latency
        h = latency.get(method)
        if h is None:
            h = latency[method] = _Histogram(LATENCY_BUCKETS_S)
        h.observe(seconds)

    def count_items(self, method: str, ok: int, failed: int) -> None:
        """Items answered inside a call (a stream's), counted as ``OK`` and ``ERROR`` and not
        timed one by one (so the latency histogram gets no series of ``method``)."""
        rpcs = self.hot.rpcs
        for code, n in (("OK", ok), ("ERROR", failed)):
            if n:
                rpcs[(method, code)] = rpcs.get((method, code), 0) + n

    def watch_state(self, query: Callable[[str, tuple], list[Any]], top_accounts: int) -> None:
        self.registry.register(_StateCollector(query, top_accounts))

    def watch_contention(self, lock_wait_s: Callable[[], float], reloads: Callable[[], int],
                         group_s: Callable[[], float]) -> None:
        self.registry.register(_ContentionCollector(lock_wait_s, reloads, group_s))

    def on_settled(self, day: str, bills: int, seconds: float) -> None:
        self.settlements.inc()
        self.settlement_bills.inc(bills)
        self.settlement_seconds.observe(seconds)

    def on_commit(self, requests: int, seconds: float) -> None:
        hot = self.hot
        hot.commits += 1
        hot.group_size.observe(requests)
        hot.commit_latency.observe(seconds)

    def on_consume(self, region: int, plan_units: int, payg_units: int) -> None:
        name = REGION_NAMES[region]
        billable = self.hot.billable  # every (region, paid_by) is there from the start
        if plan_units:
            billable[(name, "plan")] += plan_units
        if payg_units:
            billable[(name, "payg")] += payg_units

    def serve(self, listen: str) -> int:
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1",
                                            registry=self.registry)
        return server.server_port
