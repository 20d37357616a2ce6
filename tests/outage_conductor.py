"""The conductor of `make bench-outage` (tests/bench_outage.py): the server and its faults,
the two client processes, the report and the checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from clients.client import LedgerClient
from clients.failopen import DEFAULT_BUDGET_S

from .bench_outage import (
    ACCOUNTS,
    CLOSE_WITHIN_S,
    DRAIN_WAIT_S,
    OPEN_MAX_MS,
    OPEN_P99_MS,
    OPEN_WITHIN_S,
    OVER_BUDGET_MS,
    PHASES,
    first_move_after,
    open_calls,
    phase_stats,
)
from .conftest import ROOT, T0, make_account
from .test_failopen import journal_request_ids
from .test_spool import FixedPortServer, free_port

CLIENT_START_S = 2.0  # the client processes import and connect before the schedule starts


def _setup(target: str) -> None:
    with LedgerClient(target) as c:
        c.set_time(T0)
        for account in ACCOUNTS:
            make_account(c, account, cash_micros=100_000_000)


def _spawn(kind: str, srv: FixedPortServer, tmp: Path, rate: float, seconds: float
           ) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp / f"{kind}.json"
    cmd = [sys.executable, "-m", "tests.bench_outage", "--drive", kind, "--target", srv.target,
           "--spool", str(tmp / f"{kind}-spool.db"), "--rate", str(rate),
           "--seconds", str(seconds), "--out", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT), out


def _faults(srv: FixedPortServer, phase_s: float, start: float) -> list[float]:
    """Phase boundaries (wall clock) as the faults were applied."""
    marks = [time.time()]
    for n, act in enumerate((srv.kill, srv.start, lambda: srv.proc.send_signal(signal.SIGSTOP),
                             lambda: srv.proc.send_signal(signal.SIGCONT)), start=1):
        time.sleep(max(0.0, start + n * phase_s - time.monotonic()))
        marks.append(time.time())
        act()
    time.sleep(max(0.0, start + len(PHASES) * phase_s - time.monotonic()))
    marks.append(time.time())
    return marks


def conduct(phase_s: float, rate: float, json_out: str | None) -> None:
    console = Console()
    console.print(f"load average before: {os.getloadavg()[0]:.2f} (a figure above 1 is not "
                  "evidence)")
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as d:
        tmp = Path(d)
        srv = FixedPortServer(tmp, free_port()).start()
        try:
            _setup(srv.target)
            total_s = len(PHASES) * phase_s
            procs = [_spawn(k, srv, tmp, rate, total_s + CLIENT_START_S) for k in ("sync", "async")]
            time.sleep(CLIENT_START_S)
            marks = _faults(srv, phase_s, time.monotonic())
            for proc, _ in procs:
                proc.wait(total_s + DRAIN_WAIT_S * 2)
            runs = {k: json.loads(out.read_text()) for k, (_, out) in zip(("sync", "async"), procs,
                                                                        strict=True)}
            journal = journal_request_ids(srv)
            srv.stop()
            verify = subprocess.run([sys.executable, "-m", "server", "verify", "--db", str(srv.db)],
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
        finally:
            if srv.proc is not None and srv.proc.poll() is None:
                srv.proc.send_signal(signal.SIGCONT)
            srv.stop()
    report(console, runs, marks, journal, verify, json_out)


def report(console: Console, runs: dict[str, Any], marks: list[float], journal: list[str],
           verify: subprocess.CompletedProcess[str], json_out: str | None) -> None:
    table = Table("client", "phase", "calls", "p50 ms", "p99 ms", "max ms", "provisional",
                  "errors", title="consume() per phase")
    checks: list[tuple[str, bool, str]] = []
    summary: dict[str, Any] = {"marks": marks}
    for kind, run in runs.items():
        calls, moves = run["calls"], run["moves"]
        stats = phase_stats(calls, marks)
        for s in stats:
            table.add_row(kind, s["phase"], str(s["calls"]), f"{s['p50_ms']:.2f}",
                          f"{s['p99_ms']:.2f}", f"{s['max_ms']:.2f}",
                          f"{s['provisional']:.0%}", str(s["errors"]))
        opened = [first_move_after(moves, marks[i], "open") for i in (1, 3)]
        closed = [first_move_after(moves, marks[i], "closed") for i in (2, 4)]
        while_open = open_calls(calls, moves)
        worst = max((c[1] * 1000 for c in calls), default=0.0)
        p99_open = sorted(while_open)[int(0.99 * (len(while_open) - 1))] if while_open else 0.0
        summary[kind] = {"phases": stats, "open_after_s": opened, "closed_after_s": closed,
                         "open_calls": len(while_open), "open_p99_ms": p99_open,
                         "open_max_ms": max(while_open, default=0.0), "max_ms": worst,
                         "moves": moves}
        fmt = lambda xs: ", ".join("never" if x is None else f"{x:.2f} s" for x in xs)  # noqa: E731
        checks += [
            (f"{kind}: breaker open <= {OPEN_WITHIN_S} s after kill, stop ({fmt(opened)})",
             all(x is not None and x <= OPEN_WITHIN_S for x in opened), ""),
            (f"{kind}: breaker closed <= {CLOSE_WITHIN_S} s after restart, resume "
             f"({fmt(closed)})", all(x is not None and x <= CLOSE_WITHIN_S for x in closed), ""),
            (f"{kind}: while open ({len(while_open)} calls) p99 {p99_open:.2f} ms <= "
             f"{OPEN_P99_MS}, max {max(while_open, default=0):.2f} ms <= {OPEN_MAX_MS}",
             bool(while_open) and p99_open <= OPEN_P99_MS
             and max(while_open) <= OPEN_MAX_MS, ""),
            (f"{kind}: no call over budget + {OVER_BUDGET_MS:.0f} ms "
             f"(max {worst:.1f} ms)", worst <= DEFAULT_BUDGET_S * 1000 + OVER_BUDGET_MS, ""),
            (f"{kind}: no call raised", not any(c[3] for c in calls), ""),
        ]
    sent = [c[4] for run in runs.values() for c in run["calls"]]
    once = len(journal) == len(set(journal)) and set(journal) == set(sent)
    checks += [(f"every request in the journal exactly once ({len(sent):,} sent, "
                f"{len(journal):,} recorded)", once, ""),
               (f"quota-ledger verify: {verify.stdout.strip() or verify.stderr.strip()}",
                verify.returncode == 0, "")]
    console.print(table)
    for label, ok, _ in checks:
        console.print(f"[{'green' if ok else 'red'}]{'MET   ' if ok else 'MISSED'}[/] {label}")
    console.print(f"load average after: {os.getloadavg()[0]:.2f}")
    summary["checks"] = [(label, ok) for label, ok, _ in checks]
    if json_out:
        Path(json_out).write_text(json.dumps(summary, indent=2))
    if not all(ok for _, ok, _ in checks):
        sys.exit(1)
