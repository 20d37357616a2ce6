"""The hot path's metrics (issue 18) are plain numbers read at scrape time; they must read
exactly as prometheus-client's own Counter and Histogram would, so dashboards and alerts
(server/monitoring/) see the same series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from server.metrics import GROUP_SIZE_BUCKETS, LATENCY_BUCKETS_S, REGION_NAMES, Metrics

HOT = ("ledger_rpc_", "ledger_commit", "ledger_billable_units")


def _reference() -> tuple[CollectorRegistry, dict]:
    r = CollectorRegistry()
    ref = {
        "rpcs": Counter("ledger_rpc_requests", "RPCs handled, by method and status code",
                        ["method", "code"], registry=r),
        "latency": Histogram("ledger_rpc_latency_seconds", "RPC handling time", ["method"],
                             buckets=LATENCY_BUCKETS_S, registry=r),
        "commits": Counter("ledger_commits", "Group commits (one transaction and fsync)",
                           registry=r),
        "size": Histogram("ledger_commit_group_requests",
                          "Requests committed together in one transaction",
                          buckets=GROUP_SIZE_BUCKETS, registry=r),
        "commit_latency": Histogram("ledger_commit_latency_seconds",
                                    "Time to write and fsync one group",
                                    buckets=LATENCY_BUCKETS_S, registry=r),
        "units": Counter("ledger_billable_units",
                         "Billable requests, by region and how they were paid",
                         ["region", "paid_by"], registry=r),
    }
    for region in REGION_NAMES.values():  # as the server always did: every series from 0
        for by in ("plan", "payg"):
            ref["units"].labels(region, by)
    return r, ref


def _read(registry: CollectorRegistry) -> tuple[dict, list]:
    families, samples = {}, []
    for f in registry.collect():
        if f.name.startswith(HOT):
            families[f.name] = (f.type, f.documentation)
            samples += [(s.name, tuple(sorted(s.labels.items())), s.value) for s in f.samples
                        if not s.name.endswith("_created")]
    return families, sorted(samples)


def test_hot_series_read_as_prometheus_clients_own():
    ours = Metrics()
    registry, ref = _reference()
    assert _read(ours.registry) == _read(registry)  # before anything: the same zeros
    # bucket edges exactly, between them, beyond the last, and zero
    for method, code, seconds in [("Consume", "OK", 0.0002), ("Consume", "OK", 0.00031),
                                  ("Consume", "NOT_FOUND", 2.5), ("GetRemaining", "OK", 7.0),
                                  ("Consume", "OK", 0.0)]:
        ours.observe_rpc(method, code, seconds)
        ref["rpcs"].labels(method, code).inc()
        ref["latency"].labels(method).observe(seconds)
    ours.count_items("ConsumeStream.item", 5, 2)
    ref["rpcs"].labels("ConsumeStream.item", "OK").inc(5)
    ref["rpcs"].labels("ConsumeStream.item", "ERROR").inc(2)
    for n, seconds in [(1, 0.00025), (11, 0.0007), (4096, 0.1), (5000, 3.0)]:
        ours.on_commit(n, seconds)
        ref["commits"].inc()
        ref["size"].observe(n)
        ref["commit_latency"].observe(seconds)
    for region, plan, payg in [(1, 3, 0), (2, 0, 4), (1, 1, 1)]:
        ours.on_consume(region, plan, payg)
        name = REGION_NAMES[region]
        if plan:
            ref["units"].labels(name, "plan").inc(plan)
        if payg:
            ref["units"].labels(name, "payg").inc(payg)
    got, want = _read(ours.registry), _read(registry)
    assert got == want
    assert ("ledger_rpc_latency_seconds_bucket",
            (("le", "0.0002"), ("method", "Consume")), 2.0) in got[1]  # le is inclusive
