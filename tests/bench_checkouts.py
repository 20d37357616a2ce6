"""Unary Consume from two checkouts side by side, on SQLite or PostgreSQL (issues 18, 20).

    python -m tests.bench_checkouts --before DIR [--after .] [--backend postgres]
                                    [--rounds 4] [--seconds 5] [--history N]
                                    [--in-flight 1,64]

A change's effect on a lone call is smaller than this machine's swings from one hour to the
next, so it is measured against the code before, in alternation: one server from each
checkout (a ``git worktree`` of the commit before, say), each on its own fresh database (a
throwaway PostgreSQL cluster with fsync on, or an SQLite file), 1,000 accounts each with a
plan, then rounds of unary Consume at 1 and at 64 in flight (``ledgerctl loadtest``'s load;
``--in-flight`` names others, e.g. ``1,8,16,64``), the checkouts taking turns. Each line
gives the calls a second, the p50, and the server process's CPU per call (from ``/proc``).
Bounded: 2 x --rounds x the loads of --in-flight, each of --seconds. ``--history N`` first
sends each server N requests in COMPACT batches of 1,000 (at most HISTORY_S_MAX seconds), so
that its key index holds runs, as a ledger in service does.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import grpc

from clients.loadgen import LoadConfig, prepare_accounts, run_load

from .bench_cpu import process_cpu_s
from .bench_loads import batch_load
from .pg_cluster import PgCluster

START_TIMEOUT_S = 30
ACCOUNTS = 1_000
REQUESTS_CAP = 10_000_000
HISTORY_BATCH = 1_000
HISTORY_S_MAX = 60.0
IN_FLIGHT_MAX = 1_024


def start(code: Path, db: str, d: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = d / "ports.json"
    log = (d / "server.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--listen", "127.0.0.1:0",
                             "--db", db, "--port-file", str(port_file), "--log-level",
                             "warning"], cwd=code, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "GRPC_VERBOSITY": "ERROR"})
    deadline = time.monotonic() + START_TIMEOUT_S
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server of {code} did not start: "
                               f"{(d / 'server.log').read_text()}")
        time.sleep(0.05)
    target = f"127.0.0.1:{json.loads(port_file.read_text())['grpc']}"
    with grpc.insecure_channel(target) as ch:
        grpc.channel_ready_future(ch).result(timeout=START_TIMEOUT_S)
    return proc, target


async def run(codes: dict[str, Path], backend: str, rounds: int, seconds: float,
              history: int = 0, in_flight: tuple[int, ...] = (1, 64)) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-checkouts-") as d:
        cluster = (PgCluster(Path(tempfile.mkdtemp(prefix="bench-checkouts-pg-")),
                             durable=True).start() if backend == "postgres" else None)
        servers = {}
        try:
            for name, code in codes.items():
                (Path(d) / name).mkdir()
                db = (cluster.create_database(f"checkout_{name}") if cluster
                      else str(Path(d) / name / "ledger.db"))
                proc, target = start(code, db, Path(d) / name)
                cfg = LoadConfig(target=target, accounts=ACCOUNTS, plan="year-100m",
                                 top_up_micros=10_000_000, account_prefix="s-")
                await prepare_accounts(cfg)
                servers[name] = (proc, target, cfg.ids())
                if history:
                    h = await batch_load(target, cfg.ids(), view="compact",
                                         batch_size=HISTORY_BATCH, concurrency=4,
                                         seconds=HISTORY_S_MAX, requests_max=history)
                    print(f"{name}: a history of {h.calls:,} batches", flush=True)
                await run_load(LoadConfig(target=target, account_ids=cfg.ids(),  # warm
                                          requests=REQUESTS_CAP, duration_s=1.5,
                                          shape="unary", concurrency=16))
            for n in range(rounds):
                for name in (list(codes) if n % 2 == 0 else list(codes)[::-1]):
                    proc, target, ids = servers[name]
                    for concurrency in in_flight:
                        cpu0 = process_cpu_s(proc.pid)
                        r = await run_load(LoadConfig(
                            target=target, account_ids=ids, requests=REQUESTS_CAP,
                            duration_s=seconds, shape="unary", concurrency=concurrency))
                        cpu = (process_cpu_s(proc.pid) - cpu0) / max(r.calls, 1) * 1e6
                        print(f"round {n + 1} {name:6} {concurrency:3} in flight: "
                              f"{r.calls_per_s:7,.0f} calls/s, p50 {r.p50_ms:.3f} ms, server CPU "
                              f"{cpu:5.0f} µs a call, errors {dict(r.errors) or 0}", flush=True)
        finally:
            for proc, _, _ in servers.values():
                proc.terminate()
                proc.wait(10)
            if cluster is not None:
                cluster.stop()


@click.command()
@click.option("--before", required=True, type=click.Path(exists=True, file_okay=False),
              help="A checkout of the code before (e.g. a git worktree).")
@click.option("--after", default=".", show_default=True,
              type=click.Path(exists=True, file_okay=False), help="The checkout to compare.")
@click.option("--backend", type=click.Choice(["postgres", "sqlite"]), default="postgres",
              show_default=True)
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(1, 20))
@click.option("--seconds", default=5.0, show_default=True, type=click.FloatRange(1, 60))
@click.option("--history", default=0, show_default=True, type=click.IntRange(0, 10_000_000),
              help="Requests sent to each server in batches first (its key index's runs).")
@click.option("--in-flight", "in_flight", default="1,64", show_default=True,
              help="The loads, as requests in flight, comma-separated (each 1-1024).")
def main(before: str, after: str, backend: str, rounds: int, seconds: float,
         history: int, in_flight: str) -> None:
    """Unary Consume from two checkouts side by side, at 1 and 64 in flight (or the
    --in-flight given)."""
    try:
        loads = tuple(int(x) for x in in_flight.split(","))
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of integers: {in_flight!r}",
                                 param_hint="--in-flight") from None
    if not loads or not all(1 <= n <= IN_FLIGHT_MAX for n in loads):
        raise click.BadParameter(f"each load is 1-{IN_FLIGHT_MAX} in flight; got {in_flight!r}",
                                 param_hint="--in-flight")
    print(f"load average {os.getloadavg()[0]:.2f} at the start")
    asyncio.run(run({"before": Path(before).resolve(), "after": Path(after).resolve()},
                    backend, rounds, seconds, history, loads))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
