"""Server CPU per call, thread by thread, for `make bench` (issue 18, point 1).

Read from ``/proc/PID/task/TID/stat`` (user + system time, in clock ticks) before and after a
load, for the ledger and for the no-op baseline alike, so that the gap between them is
printed in microseconds per call, not only as a ratio. The ledger names its own threads for
the OS (``ledger/threads.py``: ``ledger-writer``, ``ledger-checkpoint``, ``ledger-keyrun``);
the main thread (the event loop) is reported as ``loop``; gRPC's C threads under their own
names. Threads that ended during the load (a key-run builder) are counted in the process's
total (``/proc/PID/stat``), shown as ``ended``. A server's child processes (a floor whose
commit runs in a process of its own, ``tests/floor_process.py``) count in its CPU, each as
``child <name>``.

The clock tick is 10 ms: over a load of 8 s at a few thousand calls a second that is well
under a microsecond per call.
"""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOP = "loop"
ENDED = "ended"


def _cpu_s(stat_text: str) -> tuple[str, float]:
    """(comm, user + system seconds) from one stat line (comm may hold spaces)."""
    comm = stat_text[stat_text.index("(") + 1:stat_text.rindex(")")]
    fields = stat_text[stat_text.rindex(")") + 2:].split()
    return comm, (int(fields[11]) + int(fields[12])) / CLK_TCK  # stat fields 14, 15


def process_cpu_s(pid: int) -> float:
    """The process's CPU seconds so far, its ended threads included."""
    return _cpu_s(Path(f"/proc/{pid}/stat").read_text())[1]


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds so far of each live thread, by name (threads of one name summed)."""
    out: dict[str, float] = defaultdict(float)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm, s = _cpu_s(Path(f"/proc/{pid}/task/{tid}/stat").read_text())
        except (OSError, ValueError):  # the thread ended meanwhile
            continue
        out[LOOP if int(tid) == pid else comm] += s
    return dict(out)


def child_pids(pid: int) -> list[int]:
    """The process's live child processes (``/proc/PID/task/TID/children``)."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return out


def _tree_cpu_s(pid: int) -> tuple[dict[str, float], float]:
    """(CPU seconds by thread, and of each child process as ``child NAME``; the total)."""
    threads, total = thread_cpu_s(pid), process_cpu_s(pid)
    for child in child_pids(pid):
        try:
            comm, s = _cpu_s(Path(f"/proc/{child}/stat").read_text())
        except (OSError, ValueError):  # it ended meanwhile
            continue
        threads[f"child {comm}"] = threads.get(f"child {comm}", 0.0) + s
        total += s
    return threads, total


class CpuMeter:
    """CPU of one server process (and its children) over one load, per call: ``start()``,
    then ``stop(calls)``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._threads: dict[str, float] = {}
        self._total = 0.0

    def start(self) -> None:
        self._threads, self._total = _tree_cpu_s(self.pid)

    def stop(self, calls: int) -> dict[str, object]:
        """{"us_per_call": total, "threads": {name: µs per call}} since start()."""
        threads, total = _tree_cpu_s(self.pid)
        n = max(1, calls)
        per = {name: (s - self._threads.get(name, 0.0)) * 1e6 / n for name, s in threads.items()}
        live = sum(per.values())
        whole = (total - self._total) * 1e6 / n
        if whole - live > 0.5:
            per[ENDED] = whole - live
        return {"us_per_call": whole,
                "threads": {k: round(v, 1) for k, v in sorted(per.items(), key=lambda kv: -kv[1])
                            if v >= 0.5}}


# --------------------------------------------------------------------------- the report

CPU_MEASURES = ("unary64", "unary64_hot", "unary1", "stream")
CPU_OVER_NOOP_64_US = 90  # issue 18: unary at 64 in flight, server CPU <= no-op + 90 µs
CPU_OVER_COMMIT_1_US = 50  # issue 18: at 1 in flight, <= no-op + one-row commit CPU + 50 µs


def cpu_rows(add: Callable[..., None], series: Callable[..., list[float]],
             runs: list[dict[str, Any]], lone_rows: list[tuple[str, str]]) -> None:
    """The report's rows for server CPU per call (bench.report's ``add`` and ``series``;
    ``lone_rows``: who is measured at 1 in flight, and the row's label)."""
    def cpu(d: dict[str, Any]) -> float:
        return float(d["cpu"]["us_per_call"])

    base = "baseline server"
    for key, where in (("unary64", "spread"), ("unary64_hot", "one account")):
        add(f"Consume unary, 64 in flight, {where}", "server CPU µs/call",
            series(key, "ledger", cpu), base, series(key, "baseline", cpu), "{:,.0f}",
            f"<= no-op + {CPU_OVER_NOOP_64_US} µs",
            lambda ml, mr, q: ml <= mr + CPU_OVER_NOOP_64_US, "ledger")
    commit = statistics.median(r["commit_floor"]["cpu_us"] for r in runs)
    for who, label in lone_rows:
        add(label, "server CPU µs/call", series("unary1", who, cpu),
            base, series("unary1", "baseline", cpu), "{:,.0f}",
            f"<= no-op + commit CPU ({commit:.0f}) + {CPU_OVER_COMMIT_1_US} µs",
            lambda ml, mr, q: ml <= mr + commit + CPU_OVER_COMMIT_1_US, "ledger")


def thread_table(runs: list[dict[str, Any]], console: Console) -> None:
    """Median µs per call of each thread, ledger beside baseline, for each measured load."""
    table = Table(title="server CPU per call by thread, µs (median of runs)")
    for col in ("load", "server", "total", "threads"):
        table.add_column(col, justify="left")
    for key in CPU_MEASURES:
        for who in ("ledger", "baseline"):
            got = [r["network"][key][who]["cpu"] for r in runs if "cpu" in r["network"][key][who]]
            if not got:
                continue
            names = {n for g in got for n in g["threads"]}
            per = {n: statistics.median(g["threads"].get(n, 0.0) for g in got) for n in names}
            shown = ", ".join(f"{n} {v:.0f}" for n, v in sorted(per.items(), key=lambda kv: -kv[1])
                              if v >= 1)
            table.add_row(key, who, f"{statistics.median(g['us_per_call'] for g in got):.0f}",
                          shown)
    console.print(table)
