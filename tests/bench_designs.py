"""The ledger's unary Consume against the research prototypes of other designs (issue 18).

    python -m tests.bench_designs [--rounds 3] [--seconds 6] [--research DIR] [--lone-only]

Issue 18's point 3 names a design to try first: the engine on the event loop, only the
commit on a thread of its own, pipelined (requests that arrive while a commit is in flight
form the next group). ``../shared/research/unary-floor/unary_modes.py`` is a prototype of it
(mode ``group``: a lean consume in a dict, one block row a group, WAL + synchronous=FULL)
and of the commit on the loop itself (mode ``loop``); ``group`` also runs with a 0.5 ms
linger before each group. ``tests/floor_unary.py`` (``floor inline``) commits a lone consume
inside its handler: no future, no callback, no thread. They do only the essential work: no
validation, no derived rows, no key index, no metrics. So each is a floor for its design:
what the design gets on this machine at best. ``floor essential`` is the same floor with
what the project's standards require of every call (validation, status mapping, per-call
metrics, with the ledger's own code): the floor of any design that validates a lone call;
``floor derived`` adds a derived row to each lone commit, as the ledger writes its plan's;
``floor bare`` is the no-op server with the one-row commit floor inside its handler: what a
lone call costs over the no-op for its fsync alone, before any ledger's work (``floor bare,
thread``: with that commit on a thread).

This runs them beside the ledger (``python -m server serve``, its default SQLite) and the
no-op server (``tests/baseline_server.py``), on the same 1,000 accounts each with a plan,
at 64 and at 1 in flight (``ledgerctl loadtest``'s unary load), the servers taking turns in
an order that flips each round. Each line gives calls a second, the p50 and the server's CPU
per call (``/proc``); each round ends with the one-row commit floor of ``make bench``. Every
load is bounded by --seconds and by the load generator's request cap; after each of the
ledger's, acknowledged requests must equal the units its journal recorded.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import click

from clients.loadgen import LoadConfig, prepare_accounts

from .bench import drive
from .bench_cpu import CpuMeter
from .bench_loads import Units
from .bench_servers import FLOOR_SCRIPT, ScriptServer, ledger_and_noop
from .bench_sqlite import sqlite_commit_floor

RESEARCH_DIR = Path(__file__).resolve().parents[2] / "shared" / "research" / "unary-floor"
COMMIT_FLOOR_COMMITS_MAX = 20_000
ACCOUNTS = 1_000
IN_FLIGHT = (64, 1)
FLOORS = (("floor bare", ["bare"]), ("floor bare, thread", ["bare-thread"]),
          ("floor inline", []), ("floor essential", ["essential"]),
          ("floor derived", ["derived"]))
# Design 3 with the commit in a child process (64 in flight: the next step), bare and essential
PROCESS_FLOORS = (("process floor", []), ("process floor essential", ["essential"]))
PROCESS_SCRIPT = Path(__file__).with_name("floor_process.py")
# unary_modes.py's modes (and linger, s): design 3 as the issue names it, then with a linger
# that lets more requests share a group's commit, and the commit on the loop.
PROTOTYPES = (("prototype group", ["group"]), ("prototype group, 0.5 ms linger",
              ["group", "0.0005"]), ("prototype loop", ["loop"]))


async def _rounds(servers: dict[str, Any], target: str, rounds: int, seconds: float,
                  tmp: Path, in_flight: tuple[int, ...] = IN_FLIGHT
                  ) -> dict[Any, list[tuple[float, float, float]]]:
    """The loads; after each of the ledger's, its acknowledged requests must equal the
    units its journal recorded meanwhile."""
    cfg = LoadConfig(target=target, accounts=ACCOUNTS, account_prefix="design-",
                     plan="year-100m", top_up_micros=10_000_000)
    await prepare_accounts(cfg)
    accounts = cfg.ids()
    for srv in servers.values():  # connections, code paths, the ledger's account cache
        await drive(srv.target, accounts, {"shape": "unary", "concurrency": 16}, 2.0)
    units = Units(tmp / "ledger.db")  # from here on, every unit is a measured one
    got: dict[Any, list[tuple[float, float, float]]] = {}
    for r in range(rounds):
        names = list(servers) if r % 2 == 0 else list(reversed(servers))
        for n in in_flight:
            for name in names:
                meter = CpuMeter(servers[name].pid)
                meter.start()
                res = await drive(servers[name].target, accounts,
                                  {"shape": "unary", "concurrency": n}, seconds)
                cpu = float(meter.stop(res.calls)["us_per_call"])
                if name == "ledger":
                    units.check(res, f"round {r + 1}, {n} in flight")
                got.setdefault((n, name), []).append((res.calls_per_s, res.p50_ms, cpu))
                print(f"  round {r + 1}, {n} in flight, {name}: {res.calls_per_s:,.0f} calls/s, "
                      f"p50 {res.p50_ms:.3f} ms, server CPU {cpu:.0f} µs a call", flush=True)
        floor = sqlite_commit_floor(tmp, seconds, COMMIT_FLOOR_COMMITS_MAX)
        got.setdefault("commit", []).append((0.0, floor["p50_ms"], floor["cpu_us"]))
        print(f"  round {r + 1}: one-row commit p50 {floor['p50_ms']:.3f} ms, "
              f"{floor['cpu_us']:.0f} µs CPU; load average {os.getloadavg()[0]:.2f}", flush=True)
    return got


def _report(got: dict[Any, list[tuple[float, float, float]]], names: list[str],
            in_flight: tuple[int, ...] = IN_FLIGHT) -> None:
    med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in got.items()}
    commit_p50, commit_cpu = med["commit"][1], med["commit"][2]
    print(f"medians of {len(got['commit'])} rounds; one-row commit p50 {commit_p50:.3f} ms, "
          f"{commit_cpu:.0f} µs CPU")
    for n in in_flight:
        rate0, p50_0, cpu0 = med[(n, "no-op")]
        print(f"{n} in flight (no-op: {rate0:,.0f} calls/s, p50 {p50_0:.3f} ms, "
              f"{cpu0:.0f} µs a call):")
        for name in names:
            rate, p50, cpu = med[(n, name)]
            print(f"  {name:26} {rate:7,.0f} calls/s {rate / rate0:6.3f}x   p50 {p50:.3f} ms"
                  f"   CPU {cpu:4.0f} µs, no-op {cpu - cpu0:+4.0f}, no-op + commit "
                  f"{cpu - cpu0 - commit_cpu:+4.0f}")


@click.command()
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1, 10))
@click.option("--seconds", default=6.0, show_default=True, type=click.FloatRange(1, 30))
@click.option("--research", type=click.Path(path_type=Path), default=RESEARCH_DIR,
              show_default=True, help="the folder that holds unary_modes.py")
@click.option("--lone-only", is_flag=True,
              help="1 in flight only, and only the ledger, the no-op and the lone-call floors")
def main(rounds: int, seconds: float, research: Path, lone_only: bool) -> None:
    """The ledger, the no-op server and the research prototypes side by side (issue 18)."""
    script = research / "unary_modes.py"
    if not lone_only and not script.exists():
        raise SystemExit(f"{script} is not there: pass --research DIR")
    print(f"load average {os.getloadavg()[0]:.2f} at the start; {rounds} rounds of {seconds:g} s")
    with tempfile.TemporaryDirectory(prefix="bench-designs-") as name:
        tmp = Path(name)
        ledger, noop = ledger_and_noop(tmp)
        protos = [] if lone_only else [ScriptServer(label, script, args, tmp)
                                       for label, args in PROTOTYPES]
        protos += [ScriptServer(label, FLOOR_SCRIPT, [str(tmp), *args], tmp)
                   for label, args in FLOORS]
        if not lone_only:
            protos += [ScriptServer(label, PROCESS_SCRIPT, [str(tmp), *args], tmp)
                       for label, args in PROCESS_FLOORS]
        in_flight = (1,) if lone_only else IN_FLIGHT
        try:
            for proc in (ledger, noop, *protos):
                proc.start()
            servers = {"ledger": ledger, "no-op": noop, **{p.name: p for p in protos}}
            got = asyncio.run(_rounds(servers, ledger.target, rounds, seconds, tmp, in_flight))
        finally:
            for p in protos:
                p.stop()
            ledger.stop()
            noop.stop()
    _report(got, ["ledger", *(p.name for p in protos)], in_flight)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
