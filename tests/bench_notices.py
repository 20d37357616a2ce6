"""`make bench` (issue 22): Consume throughput with notices configured, against without.

    python -m tests.bench_notices [--runs 5] [--seconds 8]

Two ledgers side by side, each `python -m server serve` on a temporary SQLite journal (the
durable default), identical but for ``--notices FILE`` (one webhook, a receiver on
127.0.0.1 that this process runs). Both get the same accounts (each with a year-100m plan)
and the same loads, one after the other, the order alternating by run: Consume with 64 in
flight, and ConsumeBatch x1,000 COMPACT with 4 in flight. A Consume never causes a notice,
so what this measures is the cost of the notice machinery beside the hot path: the delivery
thread's polls of the outbox and of its sidecar. Target: the median with notices at least
95% of the median without (``RATIO_MIN``).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console

from clients.loadgen import LoadConfig, prepare_accounts

from .bench import MEASURES, drive
from .bench_servers import Proc
from .webhook_receiver import Receiver, notices_file

RATIO_MIN = 0.95
PLAN_ACCOUNTS = 1_000
WARMUP_S = 1.5
SECRET = "bench-secret-0123456789"
KEYS = ("unary64", "batch_compact")


def serve(tmp: Path, name: str, extra: list[str]) -> Proc:
    return Proc(name, [sys.executable, "-m", "server", "serve", "--listen", "127.0.0.1:0",
                       "--db", str(tmp / f"{name}.db"), "--port-file",
                       str(tmp / f"{name}.json"), "--log-level", "warning", *extra],
                tmp / f"{name}.json", tmp / f"{name}.log")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--runs", default=5, show_default=True, type=click.IntRange(1),
              help="Repeat; the medians are compared (3 proved too few to beat the noise).")
@click.option("--seconds", default=8.0, show_default=True, type=click.FloatRange(0.2),
              help="Duration of each load.")
def main(runs: int, seconds: float) -> None:
    """Consume throughput with notices configured against without (issue 22)."""
    console = Console() if sys.stdout.isatty() else Console(width=160)
    load_start = os.getloadavg()[0]
    console.print(f"notices bench: load average {load_start:.2f}, {runs} runs of "
                  f"{seconds:g} s per load")
    measures = [m for m in MEASURES if m.key in KEYS]
    receiver = Receiver(SECRET)
    got: dict[str, dict[str, list[float]]] = {m.key: {"plain": [], "notices": []}
                                              for m in measures}
    with tempfile.TemporaryDirectory(prefix="ledger-bench-notices-") as tmp_name:
        tmp = Path(tmp_name)
        path = notices_file(tmp / "notices.toml", receiver.url, SECRET)
        procs = {"plain": serve(tmp, "plain", []),
                 "notices": serve(tmp, "notices", ["--notices", path])}
        try:
            for p in procs.values():
                p.start()

            async def run() -> None:
                accounts: list[str] = []
                for p in procs.values():
                    cfg = LoadConfig(target=p.target, accounts=PLAN_ACCOUNTS,
                                     account_prefix="bench-plan-", plan="year-100m",
                                     top_up_micros=10_000_000)
                    await prepare_accounts(cfg)
                    accounts = cfg.ids()
                    for m in measures:
                        await drive(p.target, accounts, m.load, WARMUP_S)
                for r in range(runs):
                    for m in measures:
                        order = ["plain", "notices"] if r % 2 == 0 else ["notices", "plain"]
                        for name in order:
                            result = await drive(procs[name].target, accounts, m.load, seconds)
                            got[m.key][name].append(m.value(result))
                        console.print(f"  run {r + 1} {m.label}: without "
                                      f"{got[m.key]['plain'][-1]:,.0f} / with notices "
                                      f"{got[m.key]['notices'][-1]:,.0f} {m.unit}")

            asyncio.run(run())
        finally:
            for p in procs.values():
                p.stop()
            receiver.close()
    failed = False
    for m in measures:
        plain = statistics.median(got[m.key]["plain"])
        with_notices = statistics.median(got[m.key]["notices"])
        ratio = with_notices / plain
        verdict = "MET" if ratio >= RATIO_MIN else "MISSED"
        failed |= ratio < RATIO_MIN
        console.print(f"{m.label}: without {plain:,.0f}, with notices {with_notices:,.0f} "
                      f"{m.unit} (medians) = {ratio:.3f}x, target >= {RATIO_MIN} {verdict}")
    console.print(f"load average at the end {os.getloadavg()[0]:.2f} (start {load_start:.2f});"
                  f" figures taken above 1 are not evidence")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
