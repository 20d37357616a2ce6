"""`make bench-postgres` (also the end of `make bench`): the ledger on PostgreSQL, one node
and two nodes on one database (every account on both, and with account affinity: each
node its home accounts, issue 20), beside the same ledger on SQLite (issue 11).

    python -m tests.bench_postgres [--runs 3] [--seconds 6] [--accounts 1000]

A throwaway PostgreSQL cluster (tests/pg_cluster.py: the machine's PostgreSQL, 127.0.0.1,
fsync, full_page_writes and synchronous_commit on, as in production; --no-fsync turns the
first two off, as the test suite's cluster has them) holds one fresh database
per configuration. Each configuration gets the same accounts (spread: --accounts accounts,
each with a year-100m plan) and the same loads: unary Consume at 64 in flight and at 1 in
flight per node (p50), ConsumeStream (4 streams x 16), ConsumeBatch x1,000 in both views
(4 calls in flight). With two nodes, the load is split in half and sent to both nodes at
once, and the figure is their sum (a p50 their mean). The no-op server
(``tests/baseline_server.py``) runs the stream load beside them, for issue 20's streams
target (0.6x the no-op). Each PostgreSQL node serves metrics: the time its groups waited
for their accounts' locks is reported as a share of the time its groups took (issue 20: at
most 5% with affinity), with the cached accounts reloaded because another node moved them.
After every load, requests acknowledged must equal units recorded (plans' offsets plus
pay-as-you-go, from the database). Every load is bounded in count and time; each figure is
the median of --runs rounds, the configurations taking turns within a round.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from clients.loadgen import LoadConfig, LoadResult, prepare_accounts
from clients.routing import ranking
from ledger.store import is_pg_url

from .bench import LOAD_REQUESTS_CAP, drive, machine
from .bench_cpu import process_cpu_s
from .bench_servers import ROOT, Proc
from .pg_cluster import PgCluster, find_bindir
from .test_group_commit import scrape

BATCH_TARGET_PER_S = 40_000  # issue 20: one node's ConsumeBatch, spread over 1,000 accounts
UNARY_VS_SQLITE_MIN = 0.8  # issue 20: one node's unary at 64 in flight against SQLite's
UNARY1_P50_MARGIN_MS = 0.5  # issue 20: one node's p50 at 1 in flight, at most SQLite's + this
STREAM_VS_NOOP_MIN = 0.6  # issue 20: one node's ConsumeStream 4 x 16 against the no-op server's
LOCK_WAIT_SHARE_MAX = 0.05  # issue 20: two nodes with affinity, lock waits / group time
NOOP = "no-op server"  # tests/baseline_server.py: streams only, beside the ledger's
LOADS = (
    ("unary64", "Consume, 64 in flight", {"shape": "unary", "concurrency": 64}, "calls/s"),
    ("unary1", "Consume, 1 in flight (per node)", {"shape": "unary", "concurrency": 1},
     "p50 ms"),
    ("stream", "ConsumeStream, 4 streams x 16", {"shape": "stream", "concurrency": 64,
                                                  "streams": 4}, "messages/s"),
    ("batch_full", "ConsumeBatch x1,000 FULL, 4 in flight",
     {"batch_size": 1_000, "concurrency": 4, "view": "full"}, "req/s"),
    ("batch_compact", "ConsumeBatch x1,000 COMPACT, 4 in flight",
     {"batch_size": 1_000, "concurrency": 4, "view": "compact"}, "req/s"),
)


class Units:
    """Units recorded so far: plans' offsets plus pay-as-you-go, from the derived tables
    (``verify`` holds them equal to the journal), on either backend."""

    def __init__(self, db: str) -> None:
        self.db = db
        self.mark = self.total()

    def total(self) -> int:
        sql = ("SELECT (SELECT coalesce(sum(units), 0) FROM offsets_daily)"
               " + (SELECT coalesce(sum(payg_units), 0) FROM usage_daily)")
        if is_pg_url(self.db):
            import psycopg
            with psycopg.connect(self.db) as conn:
                return int(conn.execute(sql).fetchone()[0])
        import sqlite3
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return int(conn.execute(sql).fetchone()[0])
        finally:
            conn.close()

    def check(self, results: list[LoadResult], label: str) -> int:
        acked = sum(r.billable - r.replayed for r in results)
        now = self.total()
        recorded, self.mark = now - self.mark, now
        exact = not any(r.error_total for r in results)
        if recorded < acked or (exact and recorded != acked):
            raise AssertionError(f"{label}: acknowledged {acked:,} but recorded {recorded:,}")
        return acked


def postgres_cpu_s() -> float:
    """CPU seconds so far of every PostgreSQL process on the machine (the benchmark's
    cluster is the only one running): the postmaster, its workers and the backends."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == "postgres":
                    total += process_cpu_s(int(entry))
            except OSError:  # ended meanwhile
                continue
    return total


def value(key: str, r: LoadResult) -> float:
    if key == "unary64":
        return r.calls_per_s
    if key == "unary1":
        return r.p50_ms
    if key == "stream":
        return r.rate_per_s
    return r.billable / r.elapsed_s


class Config:
    """One ledger configuration: its nodes (subprocesses) and its database."""

    def __init__(self, name: str, db: str, nodes: int, tmp: Path, affinity: bool = False
                 ) -> None:
        self.name, self.db, self.affinity = name, db, affinity
        py = sys.executable
        self.procs = []
        for i in range(nodes):
            d = tmp / f"{name}-{i}"
            d.mkdir(parents=True)
            serve = (["-m", "tests.baseline_server"] if name == NOOP else
                     ["-m", "server", "serve", "--db", db, "--log-level", "warning"]
                     + (["--metrics-listen", "127.0.0.1:0"] if is_pg_url(db) else []))
            self.procs.append(Proc(f"{name}-{i}", [
                py, *serve, "--listen", "127.0.0.1:0", "--port-file", str(d / "ports.json")],
                d / "ports.json", d / "server.log"))

    def runs(self, key: str) -> bool:
        """The no-op server answers without recording: it runs the stream load alone."""
        return self.name != NOOP or key == "stream"

    def start(self) -> Config:
        for p in self.procs:
            p.start()
        return self

    def stop(self) -> None:
        for p in self.procs:
            p.stop()

    def contention(self) -> tuple[float, float, float]:
        """(lock wait seconds, group seconds, accounts reloaded) so far, summed over the
        nodes' metrics (issue 20); zeros for a configuration without them."""
        total = [0.0, 0.0, 0.0]
        for p in self.procs:
            port = json.loads(p.port_file.read_text()).get("metrics")
            if not port:
                continue
            seen = scrape(port)
            for i, name in enumerate(("ledger_pg_lock_wait_seconds_total",
                                      "ledger_pg_group_seconds_total",
                                      "ledger_pg_account_reloads_total")):
                total[i] += seen.get(name, 0.0)
        return total[0], total[1], total[2]

    def cpu_s(self) -> float:
        """CPU seconds so far of this configuration's ledger nodes."""
        return sum(process_cpu_s(p.pid) for p in self.procs)

    async def drive(self, accounts: list[str], load: dict[str, Any], seconds: float
                    ) -> list[LoadResult]:
        """The load split over the nodes, all at once: each node gets every account
        (round robin), or with ``affinity`` the accounts whose home it is, as the clients
        route them (issue 20, ``clients/routing.py``)."""
        n = len(self.procs)
        part = {**load, "concurrency": max(1, load["concurrency"] // n)}
        if "streams" in load:
            part["streams"] = max(1, load["streams"] // n)
        targets = [p.target for p in self.procs]
        mine = {t: [a for a in accounts if ranking(targets, a)[0] == t] if self.affinity
                else accounts for t in targets}
        return list(await asyncio.gather(*(drive(t, mine[t], part, seconds)
                                           for t in targets)))


async def prepare(cfg: Config, accounts: int) -> list[str]:
    lc = LoadConfig(target=cfg.procs[0].target, accounts=accounts, account_prefix="pgb-",
                    plan="year-100m", top_up_micros=10_000_000)
    await prepare_accounts(lc)
    ids = lc.ids()
    await cfg.drive(ids, {"batch_size": 1_000, "concurrency": 2, "view": "compact"}, 1.0)
    return ids


async def bench(configs: list[Config], runs: int, seconds: float, accounts: int,
                console: Console) -> dict[str, dict[str, list[float]]]:
    ids = {}
    for cfg in configs:
        if cfg.name == NOOP:  # nothing to set up: it answers any account
            ids[cfg.name] = LoadConfig(target="", accounts=accounts, account_prefix="pgb-").ids()
            continue
        t0 = time.perf_counter()
        ids[cfg.name] = await prepare(cfg, accounts)
        console.print(f"{cfg.name}: {accounts:,} accounts ready in "
                      f"{time.perf_counter() - t0:.1f} s")
    figures: dict[str, dict[str, list[float]]] = {c.name: {k: [] for k, *_ in LOADS}
                                                  for c in configs}
    cpu: dict[str, dict[str, list[tuple[float, float]]]] = {
        c.name: {k: [] for k, *_ in LOADS} for c in configs}
    units = {c.name: Units(c.db) for c in configs if c.name != NOOP}
    for run in range(runs):
        for key, label, load, unit in LOADS:
            order = configs if run % 2 == 0 else list(reversed(configs))
            for cfg in [c for c in order if c.runs(key)]:
                node0, pg0, seen0 = cfg.cpu_s(), postgres_cpu_s(), cfg.contention()
                results = await cfg.drive(ids[cfg.name], load, seconds)
                node_us = (cfg.cpu_s() - node0) * 1e6
                waited, grouped, reloaded = (b - a for a, b in zip(seen0, cfg.contention(),
                                                                   strict=True))
                if grouped:
                    figures[cfg.name].setdefault(f"{key}_lock_share", []).append(
                        waited / grouped)
                pg_us = (postgres_cpu_s() - pg0) * 1e6 if is_pg_url(cfg.db) else 0.0
                acked = (units[cfg.name].check(results, f"{cfg.name} {label}")
                         if cfg.name != NOOP else sum(r.acknowledged for r in results))
                cpu[cfg.name][key].append((node_us / max(acked, 1), pg_us / max(acked, 1)))
                v = (statistics.mean(value(key, r) for r in results) if unit == "p50 ms"
                     else sum(value(key, r) for r in results))  # a latency is not summed
                figures[cfg.name][key].append(v)
                errors = {k: n for r in results for k, n in r.errors.items()}
                shown = f"{v:>10,.3f}" if unit == "p50 ms" else f"{v:>10,.0f}"
                console.print(f"  run {run + 1} {cfg.name:<16} {label:<42} {shown} {unit}"
                              f"  (acknowledged {acked:,} = recorded; CPU per request: "
                              f"nodes {cpu[cfg.name][key][-1][0]:,.0f} µs, PostgreSQL "
                              f"{cpu[cfg.name][key][-1][1]:,.0f} µs)"
                              + (f"  lock waits {waited / grouped:.1%} of group time,"
                                 f" {reloaded:,.0f} reloads" if grouped else "")
                              + (f"  errors {errors}" if errors else ""))
    for cfg in configs:
        for key, *_ in LOADS:
            got = cpu[cfg.name][key]
            figures[cfg.name][f"{key}_node_us"] = [n for n, _ in got]
            figures[cfg.name][f"{key}_pg_us"] = [p for _, p in got]
    return figures


def report(figures: dict[str, dict[str, list[float]]], accounts: int, console: Console
           ) -> None:
    names = list(figures)
    table = Table(title="quota-ledger on PostgreSQL beside SQLite (median)")
    table.add_column("measure")
    for name in names:
        table.add_column(name, justify="right")
    for key, label, _, unit in LOADS:
        shown = "{:,.2f}" if unit == "p50 ms" else "{:,.0f}"
        table.add_row(f"{label} ({unit})", *(
            shown.format(statistics.median(figures[n][key])) if figures[n][key] else "-"
            for n in names))
        for part, who in (("node", "ledger nodes"), ("pg", "PostgreSQL")):
            table.add_row(f"  CPU per request, {who} (µs)", *(
                f"{statistics.median(figures[n][f'{key}_{part}_us']):,.0f}"
                if figures[n][key] else "-" for n in names))
    console.print(table)
    one = figures.get("postgres 1 node")
    if one:
        batch = statistics.median(one["batch_compact"])
        console.print(f"one node's ConsumeBatch x1,000 COMPACT over {accounts:,} accounts "
                      f"(the target's: 1,000): {batch:,.0f}"
                      f"/s; target >= {BATCH_TARGET_PER_S:,}/s: "
                      f"{'MET' if batch >= BATCH_TARGET_PER_S else 'MISSED'}")
    noop = figures.get(NOOP)
    if one and noop:
        ratio = statistics.median(one["stream"]) / statistics.median(noop["stream"])
        console.print(f"one node's ConsumeStream 4 x 16: {ratio:.2f}x the no-op server; target "
                      f">= {STREAM_VS_NOOP_MIN}x: "
                      f"{'MET' if ratio >= STREAM_VS_NOOP_MIN else 'MISSED'}")
    lite = figures.get("sqlite")
    if one and lite:  # issue 20's targets against SQLite in the same run
        u64 = statistics.median(one["unary64"]) / statistics.median(lite["unary64"])
        verdict = "MET" if u64 >= UNARY_VS_SQLITE_MIN else "MISSED"
        console.print(f"one node's unary at 64 in flight: {u64:.2f}x SQLite; target >= "
                      f"{UNARY_VS_SQLITE_MIN}x: {verdict}")
        p50, p50_lite = statistics.median(one["unary1"]), statistics.median(lite["unary1"])
        ok = p50 <= p50_lite + UNARY1_P50_MARGIN_MS
        console.print(f"one node's unary at 1 in flight: p50 {p50:.2f} ms, SQLite {p50_lite:.2f}"
                      f" ms; target <= SQLite + {UNARY1_P50_MARGIN_MS} ms: "
                      f"{'MET' if ok else 'MISSED'}")
    for name in ("postgres 2 nodes", "2 nodes, affinity"):
        two = figures.get(name)
        if not (one and two):
            continue
        shares = [s for k, *_ in LOADS for s in two.get(f"{k}_lock_share", [])]
        if shares:
            worst = max(shares)
            verdict = ("MET" if worst <= LOCK_WAIT_SHARE_MAX else "MISSED"
                       ) if name == "2 nodes, affinity" else "no target"
            console.print(f"{name}: lock waits at most {worst:.1%} of group time in any load;"
                          f" target <= {LOCK_WAIT_SHARE_MAX:.0%} with affinity: {verdict}")
        for key, label, _, unit in LOADS:
            if unit == "p50 ms":
                continue
            a, b = statistics.median(one[key]), statistics.median(two[key])
            console.print(f"{name} / one node, {label}: {b / a:.2f}x "
                          f"({'not slower' if b >= a else 'SLOWER'})")


@click.command()
@click.option("--runs", default=3, show_default=True, help="Rounds; each figure is the median.")
@click.option("--seconds", default=6.0, show_default=True, help="Length of each load.")
@click.option("--accounts", default=1_000, show_default=True, help="Accounts the load spreads "
              "over (each with a plan).")
@click.option("--no-sqlite", is_flag=True, help="Only the PostgreSQL configurations.")
@click.option("--no-fsync", is_flag=True, help="fsync and full_page_writes off in the "
              "benchmark's cluster (the test suite's setting; not production's).")
def main(runs: int, seconds: float, accounts: int, no_sqlite: bool, no_fsync: bool) -> None:
    console = Console()
    if find_bindir() is None:
        console.print("[red]no PostgreSQL server binaries: apt-get install postgresql[/red]")
        sys.exit(2)
    info = machine()
    console.print(f"machine: {info}; loads bounded at {LOAD_REQUESTS_CAP:,} requests")
    console.print("PostgreSQL: synchronous_commit=on, "
                  + ("fsync=off, full_page_writes=off (--no-fsync)" if no_fsync
                     else "fsync=on, full_page_writes=on"))
    base = Path(tempfile.mkdtemp(prefix="quota-ledger-benchpg-"))
    base.chmod(0o755)  # the cluster runs as the postgres user (tests/pg_cluster.py)
    cluster = PgCluster(base / "pg", durable=not no_fsync).start()
    configs: list[Config] = []
    try:
        if not no_sqlite:
            configs.append(Config("sqlite", str(base / "sqlite" / "ledger.db"), 1, base))
        configs.append(Config("postgres 1 node", cluster.create_database("one"), 1, base))
        configs.append(Config("postgres 2 nodes", cluster.create_database("two"), 2, base))
        configs.append(Config("2 nodes, affinity", cluster.create_database("aff"), 2, base,
                              affinity=True))
        configs.append(Config(NOOP, "", 1, base))
        for cfg in configs:
            cfg.start()
        figures = asyncio.run(bench(configs, runs, seconds, accounts, console))
        report(figures, accounts, console)
    finally:
        for cfg in configs:
            cfg.stop()
        cluster.stop()


if __name__ == "__main__":
    main()

__all__ = ["ROOT"]
