"""`make bench-client` (also the last part of `make bench`): 256 concurrent consume() calls
from one AsyncLedgerClient, side by side in three settings: ``batching=False`` (every call
unary), the client's default (coalescing, FULL answers: issue 18), and coalescing with
``compact_answers=True``.

    python -m tests.bench_client [--runs 3] [--seconds 8] [--concurrency 256]
                                 [--accounts 1000] [--json-out F]

It starts the real server with its durable defaults (`python -m server serve`: WAL with
synchronous=FULL, every reply after its commit) on a free loopback port and a temporary
database, creates ``--accounts`` accounts that each hold a year-100m plan (so every request
is one plan unit; calls pick an account uniformly), and then, for each mode and run, keeps
``--concurrency`` callers busy for ``--seconds``: each caller awaits
``client.consume(account)`` and calls again. The figure is acknowledged requests per second
(a ``ConsumeResponse`` that is not provisional).

Every acknowledged request must be recorded: after each load the plan units the accounts
lost (``GetRemaining``, read over the wire) must equal the requests acknowledged in it.
A load with errors, or with a difference, is reported and fails the bench (exit 1).

Targets, on the project's 2-core machine: issue 19, at least 30,000 acknowledged
requests/s coalesced at 256 callers over 1,000 accounts; issue 18, the default client at
least 3x ``batching=False`` at 64 callers (``--concurrency 64``), and at one caller
(``--concurrency 1``) a p50 within 0.1 ms of ``batching=False``'s.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.table import Table

from clients.client import AsyncLedgerClient, LedgerError
from clients.loadgen import LoadConfig, prepare_accounts

from .bench import closing_lines, machine
from .bench_servers import Proc

TARGET_BATCHED_PER_S = 30_000  # issue 19, at 256 callers
TARGET_SPEEDUP = 3.0  # issue 18, the default client against batching=False at 64 callers
TARGET_LONE_P50_MS = 0.1  # issue 18: one caller's p50, default against batching=False
DEFAULT_CONCURRENCY = 256
DEFAULT_SECONDS = 8.0
DEFAULT_RUNS = 3
ACCOUNTS = 1_000
PLAN = "year-100m"
CALL_TIMEOUT_S = 10.0
SETUP_TIMEOUT_S = 30.0
WARM_SECONDS = 1.0
LATENCY_MAX_US = 60_000_000
MODES = (("unbatched", {"batching": False}), ("default", {}),
         ("compact", {"compact_answers": True}))
BATCHED = ("default", "compact")


@dataclass
class Run:
    mode: str
    acknowledged: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0
    batches: int = 0
    units_recorded: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0

    @property
    def rate_per_s(self) -> float:
        return self.acknowledged / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def all_recorded(self) -> bool:
        return self.units_recorded == self.acknowledged and not self.errors


async def units_left(client: AsyncLedgerClient, accounts: list[str]) -> int:
    answers = await asyncio.gather(*(client.get_remaining(a) for a in accounts))
    return sum(r.units_remaining_total for r in answers)


async def load(target: str, accounts: list[str], mode: str, options: dict[str, Any],
               concurrency: int, seconds: float) -> Run:
    """``concurrency`` callers on one client for ``seconds`` (bounded: each call has a
    deadline, and no caller starts a call after the end)."""
    run = Run(mode)
    hist = HdrHistogram(1, LATENCY_MAX_US, 3)
    async with AsyncLedgerClient(target, timeout_s=CALL_TIMEOUT_S) as reader, \
            AsyncLedgerClient(target, timeout_s=CALL_TIMEOUT_S, **options) as client:
        before = await units_left(reader, accounts)
        end = time.perf_counter() + seconds

        async def caller(seed: int) -> None:
            pick = random.Random(seed).choice
            while (t := time.perf_counter()) < end:
                try:
                    r = await client.consume(pick(accounts))
                except LedgerError as exc:
                    run.errors[exc.reason] += 1
                    continue
                hist.record_value(max(1, min(int((time.perf_counter() - t) * 1e6),
                                             LATENCY_MAX_US)))
                if r.provisional:
                    run.errors["PROVISIONAL"] += 1
                else:
                    run.acknowledged += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        run.elapsed_s = time.perf_counter() - started
        run.batches = (sum(c.calls_sent for c in client.coalescers) if client.coalescers
                       else run.acknowledged)
        run.units_recorded = before - await units_left(reader, accounts)
    run.p50_ms = hist.get_value_at_percentile(50) / 1000
    run.p99_ms = hist.get_value_at_percentile(99) / 1000
    return run


def report(runs: list[Run], console: Console, concurrency: int) -> dict[str, Any]:
    table = Table(title=f"{concurrency} concurrent consume() calls, one AsyncLedgerClient "
                        "(median of runs)")
    for col in ("mode", "acknowledged/s", "requests per call", "p50 ms", "p99 ms",
                "every acknowledged request recorded", "target", ""):
        table.add_column(col, justify="right")
    summary: dict[str, Any] = {}
    for mode, _ in MODES:
        mine = [r for r in runs if r.mode == mode]
        rate = statistics.median(r.rate_per_s for r in mine)
        per_call = statistics.median(r.acknowledged / max(1, r.batches) for r in mine)
        recorded = all(r.all_recorded for r in mine)
        met = rate >= TARGET_BATCHED_PER_S
        judged = mode in BATCHED and concurrency == DEFAULT_CONCURRENCY  # issue 19's load
        target = f">= {TARGET_BATCHED_PER_S:,}/s" if judged else ""
        verdict = ("met" if met else "missed") if judged else ""
        table.add_row(mode, f"{rate:,.0f}", f"{per_call:,.1f}",
                      f"{statistics.median(r.p50_ms for r in mine):.2f}",
                      f"{statistics.median(r.p99_ms for r in mine):.2f}",
                      "yes" if recorded else "NO", target, verdict)
        summary[mode] = {"rate_per_s": rate, "requests_per_call": per_call,
                         "p50_ms": statistics.median(r.p50_ms for r in mine),
                         "all_recorded": recorded}
    console.print(table)
    summary["speedup"] = (summary["default"]["rate_per_s"]
                          / max(1.0, summary["unbatched"]["rate_per_s"]))
    summary["p50_added_ms"] = summary["default"]["p50_ms"] - summary["unbatched"]["p50_ms"]
    console.print(f"the default client: {summary['speedup']:.1f}x the unbatched rate "
                  f"(target at 64 callers: >= {TARGET_SPEEDUP:g}x), p50 "
                  f"{summary['p50_added_ms']:+.3f} ms against unbatched (target at one "
                  f"caller: <= {TARGET_LONE_P50_MS} ms)")
    return summary


async def bench(target: str, runs: int, seconds: float, concurrency: int, accounts_n: int,
                console: Console) -> list[Run]:
    config = LoadConfig(target=target, accounts=accounts_n, account_prefix="bc-", plan=PLAN,
                        create_accounts=True, timeout_s=SETUP_TIMEOUT_S)
    await prepare_accounts(config)
    accounts = config.ids()
    for mode, options in MODES:  # warm both paths (connections, caches) before measuring
        await load(target, accounts, mode, options, concurrency, WARM_SECONDS)
    out: list[Run] = []
    for i in range(runs):
        order = MODES if i % 2 == 0 else tuple(reversed(MODES))  # alternate who goes first
        for mode, options in order:
            r = await load(target, accounts, mode, options, concurrency, seconds)
            console.print(f"  run {i + 1} {mode}: {r.rate_per_s:,.0f} acknowledged/s, "
                          f"{r.acknowledged:,} acknowledged in {r.batches:,} calls, "
                          f"recorded {r.units_recorded:,}, errors {dict(r.errors) or 0}")
            out.append(r)
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--runs", default=DEFAULT_RUNS, show_default=True, type=click.IntRange(1),
              help="Repeat each mode; the table shows the median.")
@click.option("--seconds", default=DEFAULT_SECONDS, show_default=True,
              type=click.FloatRange(0.2), help="Duration of each load.")
@click.option("--concurrency", default=DEFAULT_CONCURRENCY, show_default=True,
              type=click.IntRange(1, 10_000), help="Callers awaiting consume() at once.")
@click.option("--accounts", "accounts_n", default=ACCOUNTS, show_default=True,
              type=click.IntRange(1, 100_000), help="Accounts the calls spread over.")
@click.option("--json-out", default=None, metavar="FILE", help="Write every figure as JSON.")
def main(runs: int, seconds: float, concurrency: int, accounts_n: int,
         json_out: str | None) -> None:
    """Concurrent consume() calls, unbatched, default and compact; exit 1 if a request was
    lost."""
    console = Console() if sys.stdout.isatty() else Console(width=160)
    info = machine()
    console.print(f"machine: nproc {info['nproc']}, python {info['python']}, sqlite "
                  f"{info['sqlite']}, grpcio {info['grpcio']}, load average "
                  f"{info['loadavg_start'][0]:.2f}; runs {runs}, {seconds:g} s each")
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ledger-bench-client-") as tmp_name:
        tmp = Path(tmp_name)
        ledger = Proc("ledger", [sys.executable, "-m", "server", "serve", "--listen",
                                 "127.0.0.1:0", "--db", str(tmp / "ledger.db"),
                                 "--port-file", str(tmp / "ledger.json"), "--log-level",
                                 "warning"], tmp / "ledger.json", tmp / "ledger.log")
        try:
            ledger.start()
            console.print(f"ledger on {ledger.target} (durable defaults)")
            runs_done = asyncio.run(bench(ledger.target, runs, seconds, concurrency, accounts_n,
                                             console))
        finally:
            ledger.stop()
    summary = report(runs_done, console, concurrency)
    elapsed = closing_lines(console, info, t_all)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"machine": info, "concurrency": concurrency, "seconds": seconds,
                       "runs": [{**asdict(r), "rate_per_s": r.rate_per_s} for r in runs_done],
                       **summary, "elapsed_s": elapsed}, f, indent=2)
        console.print(f"figures written to {json_out}")
    if not all(r.all_recorded for r in runs_done):
        console.print("[red]an acknowledged request was not recorded, or a call failed[/]")
        sys.exit(1)


if __name__ == "__main__":
    main()
