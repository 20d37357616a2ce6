"""`make bench`: the ledger against a do-nothing baseline on the same gRPC stack, in one run.

    python -m tests.bench [--runs 3] [--seconds 8] [--quick] [--json-out FILE]

It starts the real server (`python -m server serve`, a temporary database, the durable
default: WAL with synchronous=FULL) and `tests.baseline_server` as subprocesses on free
loopback ports, creates accounts on the ledger (each with a year-100m plan so requests are
plan-covered, plus some pay-as-you-go accounts), and drives both with the same traffic:
`clients.loadgen.run_load` for unary calls and streams, `tests.bench_loads.batch_load` for
ConsumeBatch in both views (FULL and COMPACT). After every load on the ledger, the requests
it acknowledged must be the units its journal recorded (`tests.bench_loads.Units`).
In-process it also measures the SQLite ceiling (one JSON journal row per request, the format
before consume blocks, in plain batched inserts), the SQLite commit floor (one journal row
per transaction, WAL + synchronous=FULL, on the filesystem of the ledger's database: the
physical floor under the 1-in-flight latency) and settlement against a bare journal scan.
At 1 in flight a third server takes its turn: issue 18's bare floor (`tests/floor_unary.py
bare`, the no-op with that one-row commit in its handler), against the same limits as the
ledger: where it misses one, so must any design that commits a lone call before replying.

Every load is bounded in count and time, all traffic is on 127.0.0.1, each figure is the
median over --runs (ledger and baseline alternate who goes first), and each target is marked
MET or MISSED from what was measured in this run.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import grpc
from rich.console import Console
from rich.table import Table

from clients.loadgen import LoadConfig, LoadResult, prepare_accounts, run_load

from .bench_cpu import CPU_MEASURES, CpuMeter, cpu_rows, thread_table
from .bench_loads import Units, batch_load
from .bench_servers import Proc, bare_floor, ledger_and_noop
from .bench_sqlite import (
    COMMIT_FLOOR_COMMITS_MAX,
    FULL,
    QUICK,
    Sizes,
    build_settlement_journal,
    measure_settlement,
    sqlite_ceiling,
    sqlite_commit_floor,
)

LOAD_REQUESTS_CAP = 10_000_000  # every load stops at this count or at --seconds
# Issue 18's targets against the no-op server (tests/baseline_server.py), run side by side.
UNARY_64_STEP, UNARY_64_GOAL = 0.70, 0.85  # unary calls/s at 64 in flight, hot and spread
UNARY_1_P50_SLACK_MS = 0.10  # 1 in flight: p50 <= no-op p50 + one-row commit p50 + this
STREAM_STEP = 0.70  # ConsumeStream, 4 streams x 16 in flight
LONE_KEY = "unary1"  # the 1-in-flight measure, where issue 18's bare floor runs too
FLOOR_WARMUP_S = 2.0  # the bare floor's warm-up: thousands of commits, whatever the sizes


# --------------------------------------------------------------------------- the measures

@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    load: dict[str, Any]
    value: Callable[[LoadResult], float]
    unit: str
    hot: bool = False  # every request to one account (issue 18: hot and spread)


MEASURES = (
    Measure("unary64", "Consume, 64 in flight", {"shape": "unary", "concurrency": 64},
            lambda r: r.calls_per_s, "calls/s"),
    Measure("unary64_hot", "Consume, 64 in flight, one account",
            {"shape": "unary", "concurrency": 64}, lambda r: r.calls_per_s, "calls/s", hot=True),
    Measure(LONE_KEY, "Consume, 1 in flight", {"shape": "unary", "concurrency": 1},
            lambda r: r.p50_ms, "p50 ms"),
    Measure("stream", "ConsumeStream, 4 streams x 16 in flight",
            {"shape": "stream", "concurrency": 64, "streams": 4},
            lambda r: r.rate_per_s, "messages/s"),
    Measure("batch", "ConsumeBatch x1,000 FULL, 4 calls in flight",
            {"shape": "batch", "batch_size": 1_000, "concurrency": 4, "view": "full"},
            lambda r: r.billable / r.elapsed_s, "billable req/s"),
    Measure("batch_compact", "ConsumeBatch x1,000 COMPACT, 4 calls in flight",
            {"shape": "batch", "batch_size": 1_000, "concurrency": 4, "view": "compact"},
            lambda r: r.billable / r.elapsed_s, "billable req/s"),
)


@dataclass
class Collected:
    runs: list[dict[str, Any]] = field(default_factory=list)


async def drive(target: str, accounts: list[str], load: dict[str, Any], seconds: float
                ) -> LoadResult:
    """One bounded load; a load that names a batch ``view`` goes through a raw stub."""
    if "view" in load:
        result = await batch_load(target, accounts, view=load["view"],
                                  batch_size=load["batch_size"],
                                  concurrency=load["concurrency"], seconds=seconds,
                                  requests_max=LOAD_REQUESTS_CAP)
    else:
        result = await run_load(LoadConfig(target=target, account_ids=accounts,
                                           requests=LOAD_REQUESTS_CAP, duration_s=seconds,
                                           **load))
    if not result.consistent:
        raise AssertionError(f"loadgen lost count: {result.to_dict()}")
    return result


def _summary(r: LoadResult) -> dict[str, Any]:
    d = r.to_dict()
    d.pop("series")
    return d


async def network_run(ledger: Proc, baseline: Proc, accounts: list[str], seconds: float,
                      run: int, console: Console, units: Units, floor: Proc | None = None
                      ) -> dict[str, Any]:
    """Every measure, ledger and baseline back to back (ABAB: who goes first alternates by
    run); after each ledger load, acknowledged requests must equal recorded units. At 1 in
    flight ``floor`` (issue 18's bare floor) takes its turn too."""
    out: dict[str, Any] = {}
    for measure in MEASURES:
        order = [("ledger", ledger), ("baseline", baseline)]
        if floor is not None and measure.key == LONE_KEY:
            order.append(("floor", floor))
        if run % 2:
            order.reverse()
        got: dict[str, LoadResult] = {}
        checked: dict[str, int] = {}
        cpu: dict[str, dict[str, object]] = {}
        for name, proc in order:
            meter = CpuMeter(proc.pid) if measure.key in CPU_MEASURES else None
            if meter is not None:
                meter.start()
            got[name] = await drive(proc.target, accounts[:1] if measure.hot else accounts,
                                    measure.load, seconds)
            if meter is not None:
                cpu[name] = meter.stop(got[name].calls)
            if name == "ledger":
                checked = units.check(got[name], f"run {run + 1} {measure.label}")
        out[measure.key] = {name: _summary(r) for name, r in got.items()}
        for name, c in cpu.items():
            out[measure.key][name]["cpu"] = c
        out[measure.key]["units"] = checked
        lv, bv = measure.value(got["ledger"]), measure.value(got["baseline"])
        errors = {k: v for n in ("ledger", "baseline") for k, v in got[n].errors.items()}
        console.print(f"  run {run + 1} {measure.label}: ledger {lv:,.3f} / baseline {bv:,.3f}"
                      f" {measure.unit}; units acknowledged {checked['acknowledged']:,} = "
                      f"recorded {checked['recorded']:,}"
                      + (f"  errors {errors}" if errors else "")
                      + (f"; server CPU {cpu['ledger']['us_per_call']:.0f} / "
                         f"{cpu['baseline']['us_per_call']:.0f} µs per call" if cpu else "")
                      + (f"; floor bare {measure.value(got['floor']):,.3f} {measure.unit}, "
                         f"{cpu['floor']['us_per_call']:.0f} µs" if "floor" in got else ""))
    return out


async def setup_and_warm(ledger: Proc, baseline: Proc, sizes: Sizes, console: Console,
                         floor: Proc | None = None) -> list[str]:
    t0 = time.perf_counter()
    plan_cfg = LoadConfig(target=ledger.target, accounts=sizes.plan_accounts,
                          account_prefix="bench-plan-", plan="year-100m",
                          top_up_micros=10_000_000)
    payg_cfg = LoadConfig(target=ledger.target, accounts=sizes.payg_accounts,
                          account_prefix="bench-payg-", top_up_micros=100_000_000)
    await prepare_accounts(plan_cfg)
    await prepare_accounts(payg_cfg)
    accounts = plan_cfg.ids() + payg_cfg.ids()
    console.print(f"accounts: {sizes.plan_accounts:,} with a year-100m plan + "
                  f"{sizes.payg_accounts:,} pay-as-you-go, created in "
                  f"{time.perf_counter() - t0:.1f} s")
    for proc in (ledger, baseline):  # connections, code paths, the engine's account cache
        for view in ("full", "compact"):
            await drive(proc.target, accounts, {"batch_size": 1_000, "concurrency": 2,
                                                "view": view}, sizes.warmup_s / 2)
        await drive(proc.target, accounts, {"shape": "unary", "concurrency": 16},
                    sizes.warmup_s)
    if floor is not None:  # its code paths, and its WAL grown to the size it keeps
        await drive(floor.target, accounts, {"shape": "unary", "concurrency": 16},
                    FLOOR_WARMUP_S)
    return accounts


# --------------------------------------------------------------------------- the report

def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def report(runs: list[dict[str, Any]], console: Console, sizes: Sizes) -> dict[str, Any]:
    table = Table(title="quota-ledger against references: median of runs, "
                        "ratio = ledger / reference")
    for col, just in (("measure", "left"), ("figure", "left"), ("ledger", "right"),
                      ("reference", "left"), ("value", "right"), ("ratio", "right"),
                      ("target", "left"), ("verdict", "left"), ("per run", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    rows: list[dict[str, Any]] = []

    def add(label: str, figure: str, lv: list[float], ref: str, rv: list[float], fmt: str,
            target: str, met: Callable[[float, float, float], bool] | None, on: str) -> None:
        """on: which per-run figure the target applies to: 'ratio' or 'ledger'."""
        ratios = [ratio(a, b) for a, b in zip(lv, rv, strict=True)]
        ml, mr, mq = median(lv), median(rv), median(ratios)
        ok = met(ml, mr, mq) if met is not None else None
        per_run = [f"{x:.3f}x" for x in ratios] if on == "ratio" else [fmt.format(x)
                                                                        for x in lv]
        table.add_row(label, figure, fmt.format(ml), ref, fmt.format(mr), f"{mq:.3f}x", target,
                      "info" if ok is None else "[green]MET[/]" if ok else "[red]MISSED[/]",
                      ", ".join(per_run))
        rows.append({"measure": label, "figure": figure, "reference": ref, "ledger": ml,
                     "reference_value": mr, "ratio": mq, "target": target, "met": ok,
                     "per_run_ledger": lv, "per_run_reference": rv, "per_run_ratio": ratios})

    def series(key: str, who: str, f: Callable[[dict[str, Any]], float]) -> list[float]:
        return [f(r["network"][key][who]) for r in runs]

    base = "baseline server"
    for key, where in (("unary64", "spread"), ("unary64_hot", "one account")):
        add(f"Consume unary, 64 in flight, {where}", "calls/s",
            series(key, "ledger", lambda d: d["calls_per_s"]), base,
            series(key, "baseline", lambda d: d["calls_per_s"]), "{:,.0f}",
            f">= {UNARY_64_STEP}x (issue 18's step; goal {UNARY_64_GOAL}x)",
            lambda ml, mr, q: q >= UNARY_64_STEP, "ratio")
    commit_p50 = median([r["commit_floor"]["p50_ms"] for r in runs])
    for who, label in lone_rows(runs):
        add(label, "p50 ms", series("unary1", who, lambda d: d["p50_ms"]), base,
            series("unary1", "baseline", lambda d: d["p50_ms"]), "{:.3f}",
            f"<= no-op + commit p50 ({commit_p50:.3f}) + {UNARY_1_P50_SLACK_MS} ms",
            lambda ml, mr, q: ml <= mr + commit_p50 + UNARY_1_P50_SLACK_MS, "ledger")
    add("Consume unary, 1 in flight", "p99 ms",
        series("unary1", "ledger", lambda d: d["p99_ms"]), base,
        series("unary1", "baseline", lambda d: d["p99_ms"]), "{:.3f}",
        "ledger <= 2 ms", lambda ml, mr, q: ml <= 2.0, "ledger")
    floor = "SQLite 1-row commit (WAL+FULL)"
    add("Consume unary, 1 in flight", "p50 ms",
        series("unary1", "ledger", lambda d: d["p50_ms"]), floor,
        [r["commit_floor"]["p50_ms"] for r in runs], "{:.3f}", "(physical floor)", None,
        "ratio")
    add("Consume unary, 1 in flight", "p99 ms",
        series("unary1", "ledger", lambda d: d["p99_ms"]), floor,
        [r["commit_floor"]["p99_ms"] for r in runs], "{:.3f}", "(physical floor)", None,
        "ratio")
    cpu_rows(add, series, runs, lone_rows(runs))
    add("ConsumeStream, 4 streams x 16 in flight", "messages/s",
        series("stream", "ledger", lambda d: d["rate_per_s"]), base,
        series("stream", "baseline", lambda d: d["rate_per_s"]), "{:,.0f}",
        f">= {STREAM_STEP}x", lambda ml, mr, q: q >= STREAM_STEP, "ratio")
    for key, view, floor_rps in (("batch_compact", "COMPACT", 100_000),
                                 ("batch", "FULL", 50_000)):
        batch_l = series(key, "ledger", lambda d: d["billable"] / d["elapsed_s"])
        add(f"ConsumeBatch x1,000 {view}, 4 in flight", "billable req/s", batch_l, base,
            series(key, "baseline", lambda d: d["billable"] / d["elapsed_s"]), "{:,.0f}",
            f"ledger >= {floor_rps:,}/s", lambda ml, mr, q, f=floor_rps: ml >= f, "ledger")
        add(f"ConsumeBatch x1,000 {view}, 4 in flight", "billable req/s", batch_l,
            "SQLite ceiling (JSON rows/s)", [r["ceiling"]["rows_per_s"] for r in runs],
            "{:,.0f}", "(physical ceiling)", None, "ratio")
    add(f"SettleDay, {sizes.settle_requests:,} req / {sizes.settle_accounts:,} accounts",
        "seconds", [r["settlement"]["settle_s"] for r in runs], "bare journal scan",
        [r["settlement"]["sql_s"] for r in runs], "{:.3f}", "<= 3x",
        lambda ml, mr, q: q <= 3.0, "ratio")
    console.print(table)
    thread_table(runs, console)
    console.print("SQLite ceiling: journal rows in the format before consume blocks (one "
                  "JSON row per request, with its idempotency index) inserted by executemany, "
                  "1,000 per transaction, WAL + synchronous=FULL (ledger.store.Store). Bare "
                  "journal scan: every consume block decoded and pay-as-you-go units summed "
                  "per account (tests.bench_sqlite.journal_scan).")
    console.print("SQLite 1-row commit: BEGIN IMMEDIATE, one journal row, COMMIT, each timed "
                  "alone, WAL + synchronous=FULL, in the ledger database's directory (same "
                  "filesystem), the WAL let start over as the ledger's writer lets it; p50/p99 "
                  f"over up to {COMMIT_FLOOR_COMMITS_MAX:,} commits or --seconds per run.")
    if len(lone_rows(runs)) > 1:
        console.print("Floor bare (tests/floor_unary.py bare): the no-op server with the 1-row "
                      "commit inside its handler, before its reply. Where it misses a 1-in-"
                      "flight target, that target is out of reach on this machine for any "
                      "design that commits a lone call before replying (issue 18).")
    return {"rows": rows}


def lone_rows(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The 1-in-flight rows a target applies to: the ledger's, and the bare floor's when it
    ran (issue 18: the floor shows whether the target is within reach at all)."""
    rows = [("ledger", "Consume unary, 1 in flight")]
    if all("floor" in r["network"][LONE_KEY] for r in runs):
        rows.append(("floor", "  the same, floor bare (no-op + 1-row commit)"))
    return rows


def closing_lines(console: Console, info: dict[str, Any], t_all: float) -> float:
    """The load at the end and the whole run's time, with a warning on a busy machine."""
    info["loadavg_end"] = os.getloadavg()
    elapsed = time.perf_counter() - t_all
    console.print(f"load average at the end {info['loadavg_end'][0]:.2f} on {info['nproc']} "
                  f"cores; bench took {elapsed:.0f} s")
    if max(info["loadavg_start"][0], info["loadavg_end"][0]) > info["nproc"]:
        console.print("[yellow]note: the machine was busier than its core count during this "
                      "run; absolute figures are noisy (the ratios less so).[/]")
    return elapsed


def machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {"nproc": usable, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "grpcio": grpc.__version__,
            "platform": platform.platform(), "loadavg_start": os.getloadavg()}


# --------------------------------------------------------------------------- main

@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1),
              help="Repeat every measurement; the table shows the median.")
@click.option("--seconds", default=None, type=click.FloatRange(0.2),
              help="Duration of each load measurement, of the SQLite ceiling and of the "
                   "SQLite commit floor "
                   "[default: 8; 1 with --quick].")
@click.option("--quick", is_flag=True, help="Tiny sizes and 1 s loads: a smoke run.")
@click.option("--json-out", default=None, metavar="FILE", help="Write every figure as JSON.")
@click.option("--front-cpus", default=None, metavar="CPUS",
              help="Run both servers' fronts on these CPUs (the ledger's --front-cpus; the "
                   "no-op whole); unset, where the system puts them, as issue 18 measured.")
def main(runs: int, seconds: float | None, quick: bool, json_out: str | None,
         front_cpus: str | None) -> None:
    """Benchmark the ledger against the baseline server; print MET / MISSED per target."""
    console = Console() if sys.stdout.isatty() else Console(width=160)
    sizes = QUICK if quick else FULL
    if seconds is None:
        seconds = 1.0 if quick else 8.0
    info = machine()
    console.print(f"machine: nproc {info['nproc']} (cpu_count {info['cpu_count']}), "
                  f"python {info['python']}, sqlite {info['sqlite']}, grpcio {info['grpcio']}, "
                  f"load average {info['loadavg_start'][0]:.2f}")
    console.print(f"settings: runs {runs}, {seconds:g} s per measurement"
                  f"{', quick sizes' if quick else ''}")
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp_name:
        tmp = Path(tmp_name)
        ledger, baseline = ledger_and_noop(tmp, front_cpus)
        floor = bare_floor(tmp, front_cpus)
        if front_cpus:
            console.print(f"fronts on CPUs {front_cpus}: the ledger's event loop and gRPC "
                          "threads, the no-op whole")
        collected: list[dict[str, Any]] = []
        try:
            ledger.start()
            baseline.start()
            floor.start()
            mode = sqlite3.connect(f"file:{tmp / 'ledger.db'}?mode=ro", uri=True).execute(
                "PRAGMA journal_mode").fetchone()[0]
            console.print(f"ledger on {ledger.target} (journal_mode {mode}, synchronous FULL "
                          f"by default), baseline on {baseline.target}")
            settle_db = tmp / "settle.db"
            settle_info = build_settlement_journal(settle_db, sizes, console)

            async def network() -> None:
                accounts = await setup_and_warm(ledger, baseline, sizes, console, floor)
                units = Units(tmp / "ledger.db")  # from here on, every unit is a measured one
                for run in range(runs):
                    net = await network_run(ledger, baseline, accounts, seconds, run, console,
                                            units, floor)
                    ceiling = sqlite_ceiling(tmp, seconds, sizes.ceiling_rows_max)
                    console.print(f"  run {run + 1} SQLite ceiling: "
                                  f"{ceiling['rows_per_s']:,.0f} rows/s")
                    commit_floor = sqlite_commit_floor(tmp, seconds, COMMIT_FLOOR_COMMITS_MAX)
                    console.print(f"  run {run + 1} SQLite 1-row commit: p50 "
                                  f"{commit_floor['p50_ms']:.3f} ms, p99 "
                                  f"{commit_floor['p99_ms']:.3f} ms over "
                                  f"{commit_floor['commits']:,} commits")
                    settle = measure_settlement(settle_db, tmp, run)
                    console.print(f"  run {run + 1} settlement: SettleDay "
                                  f"{settle['settle_s']:.3f} s, bare scan {settle['sql_s']:.3f} s"
                                  f" ({settle['bills']:,} bills)")
                    collected.append({"network": net, "ceiling": ceiling,
                                      "commit_floor": commit_floor,
                                      "settlement": settle})

            asyncio.run(network())
        finally:
            ledger.stop()
            baseline.stop()
            floor.stop()
        summary = report(collected, console, sizes)
    elapsed = closing_lines(console, info, t_all)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"machine": info, "runs": runs, "seconds": seconds, "quick": quick,
                       "settlement_journal": settle_info, "per_run": collected,
                       **summary, "elapsed_s": elapsed}, f, indent=2)
        console.print(f"figures written to {json_out}")


if __name__ == "__main__":
    main()
