"""`make bench-batches`: issue 19's batch figures on the default `quota-ledger serve`.

    python -m tests.bench_batches [--runs 3] [--seconds 8] [--json-out FILE]

A real server (SQLite, WAL + synchronous=FULL, metrics on) on a free loopback port; 1,000
accounts each holding a year-100m plan (spread) and one more (hot). Each run drives
ConsumeBatch of 1,000 with 4 calls in flight, in both views (COMPACT and FULL), hot and
spread, for --seconds each, and reads from the server's own metrics how many commits took
over 100 ms during that load (``ledger_commit_latency_seconds``: count minus the 0.1 s
bucket). After each load the requests acknowledged as billable and new must equal the
units the derived tables recorded. Figures are medians over --runs; each target of issue
19 is marked MET or MISSED from this run. Bounded: 4 loads x --runs x --seconds. The
machine's speed (``tests/yardstick.py``, the research floor of a consume group) is printed
before and after: this machine swings by a third from hour to hour.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from clients.loadgen import LoadConfig, prepare_accounts

from .bench_loads import Units, batch_load
from .bench_servers import Proc
from .yardstick import describe, group_floor_us

SPREAD_ACCOUNTS = 1_000
BATCH, IN_FLIGHT = 1_000, 4
REQUESTS_CAP = 10_000_000
SLOW_COMMIT_S = 0.1
TARGETS = {"compact": 100_000.0, "full": 60_000.0}  # req/s, hot and spread
P99_OVER_P50_MAX = 3.0


class Server(Proc):
    """`python -m server serve` with metrics, ports from its port file."""

    def __init__(self, tmp: Path) -> None:
        super().__init__("ledger", [sys.executable, "-m", "server", "serve", "--listen",
                                    "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                                    "--db", str(tmp / "ledger.db"), "--port-file",
                                    str(tmp / "ports.json"), "--log-level", "warning"],
                         tmp / "ports.json", tmp / "server.log")
        self.db = str(tmp / "ledger.db")

    def slow_commits(self) -> tuple[int, int]:
        """(commits, commits over SLOW_COMMIT_S) so far, from /metrics."""
        port = json.loads(self.port_file.read_text())["metrics"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        count = float(re.search(r"^ledger_commit_latency_seconds_count (\S+)$", text,
                                re.M).group(1))
        fast = float(re.search(r'^ledger_commit_latency_seconds_bucket\{le="0\.1"\} (\S+)$',
                               text, re.M).group(1))
        return int(count), int(count - fast)


async def setup(target: str) -> dict[str, list[str]]:
    spread = LoadConfig(target=target, accounts=SPREAD_ACCOUNTS, account_prefix="spread-",
                        plan="year-100m", top_up_micros=10_000_000)
    hot = LoadConfig(target=target, accounts=1, account_prefix="hot-", plan="year-100m",
                     top_up_micros=10_000_000)
    await prepare_accounts(spread)
    await prepare_accounts(hot)
    return {"spread": spread.ids(), "hot": hot.ids()}


async def one_load(srv: Server, units: Units, accounts: list[str], view: str, seconds: float,
                   label: str) -> dict[str, Any]:
    c0, s0 = srv.slow_commits()
    r = await batch_load(srv.target, accounts, view=view, batch_size=BATCH,
                         concurrency=IN_FLIGHT, seconds=seconds, requests_max=REQUESTS_CAP)
    c1, s1 = srv.slow_commits()
    acked = units.check(r, label)["acknowledged"]
    return {"req_s": r.billable / r.elapsed_s, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
            "commits": c1 - c0, "slow": s1 - s0, "acked": acked, "errors": dict(r.errors)}


async def run(runs: int, seconds: float, console: Console) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-batches-") as d:
        srv = Server(Path(d)).start()
        try:
            accounts = await setup(srv.target)
            for view in ("compact", "full"):  # warm: connections, code paths, caches
                await batch_load(srv.target, accounts["spread"], view=view, batch_size=BATCH,
                                 concurrency=2, seconds=1.0, requests_max=REQUESTS_CAP)
            units = Units(srv.db)
            for n in range(runs):
                for view in ("compact", "full"):
                    for shape in ("hot", "spread"):
                        key = f"{view} {shape}"
                        got = await one_load(srv, units, accounts[shape], view, seconds,
                                             f"run {n + 1} {key}")
                        results.setdefault(key, []).append(got)
                        console.print(f"  run {n + 1} {key}: {got['req_s']:,.0f} req/s, p50 "
                                      f"{got['p50_ms']:.1f} ms, p99 {got['p99_ms']:.1f} ms, "
                                      f"{got['commits']:,} commits ({got['slow']} over 100 ms)"
                                      f"; acknowledged {got['acked']:,} = recorded")
        finally:
            srv.stop()
    return results


@click.command()
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1, 20))
@click.option("--seconds", default=8.0, show_default=True, type=click.FloatRange(1, 120))
@click.option("--json-out", default=None, metavar="FILE")
def main(runs: int, seconds: float, json_out: str | None) -> None:
    """ConsumeBatch x1,000, 4 in flight, COMPACT and FULL, hot and spread (issue 19)."""
    console = Console()
    console.print(f"load average before: {os.getloadavg()[0]:.2f} (above 1 is not evidence)")
    t0 = time.perf_counter()
    speed = [group_floor_us()]
    console.print(f"machine before: {describe(speed[0])}")
    results = asyncio.run(run(runs, seconds, console))
    speed.append(group_floor_us())
    table = Table("load", "req/s", "p50 ms", "p99 ms", "p99/p50", "commits > 100 ms",
                  title=f"medians of {runs} runs")
    lines = []
    for key, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("req_s", "p50_ms", "p99_ms")}
        slow = sum(r["slow"] for r in rs)
        ratio = med["p99_ms"] / med["p50_ms"] if med["p50_ms"] else float("inf")
        table.add_row(key, f"{med['req_s']:,.0f}", f"{med['p50_ms']:.1f}",
                      f"{med['p99_ms']:.1f}", f"{ratio:.2f}", str(slow))
        target = TARGETS[key.split()[0]]
        lines += [(f"{key}: {med['req_s']:,.0f} req/s >= {target:,.0f}", med["req_s"] >= target),
                  (f"{key}: p99/p50 {ratio:.2f} <= {P99_OVER_P50_MAX}", ratio <= P99_OVER_P50_MAX),
                  (f"{key}: commits over 100 ms: {slow}", slow == 0)]
    console.print(table)
    for label, ok in lines:
        console.print(f"[{'green' if ok else 'red'}]{'MET   ' if ok else 'MISSED'}[/] {label}")
    console.print(f"machine after: {describe(speed[1])}")
    console.print(f"load average after: {os.getloadavg()[0]:.2f}; "
                  f"{time.perf_counter() - t0:.0f} s in all")
    if json_out:
        Path(json_out).write_text(json.dumps({**results, "group_floor_us": speed}, indent=2))


if __name__ == "__main__":
    main()
