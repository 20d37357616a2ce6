"""Where a batch load's CPU goes, thread by thread (issue 19).

    python -m tests.bench_threads [--view compact] [--shape spread] [--seconds 10]

The server and accounts of ``make bench-batches`` (``tests/bench_batches.py``): ConsumeBatch
x1,000, 4 in flight, for --seconds, after a short warm-up. Each server thread's CPU is read
from ``/proc/PID/task/*/stat`` before and after, and printed in µs per billable request
beside the client's own CPU and the wall time per request. Where the writer's CPU is well
below the wall time while the writer is the bottleneck, it waits for the GIL.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import click

from .bench_batches import BATCH, IN_FLIGHT, REQUESTS_CAP, Server, setup
from .bench_loads import batch_load
from .yardstick import describe, group_floor_us

WARMUP_S = 1.5
SHOWN_US_MIN = 0.01  # threads below this many µs a request are left out


def threads_cpu(pid: int) -> dict[tuple[str, str], float]:
    """{(tid, name): CPU seconds} of every thread of a process."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:  # the thread ended
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[(tid, name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def run(view: str, shape: str, seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as d:
        srv = Server(Path(d)).start()
        try:
            accounts = (await setup(srv.target))[shape]
            await batch_load(srv.target, accounts, view=view, batch_size=BATCH, concurrency=2,
                             seconds=WARMUP_S, requests_max=REQUESTS_CAP)
            before, client0 = threads_cpu(srv.pid), time.process_time()
            r = await batch_load(srv.target, accounts, view=view, batch_size=BATCH,
                                 concurrency=IN_FLIGHT, seconds=seconds,
                                 requests_max=REQUESTS_CAP)
            after, client1 = threads_cpu(srv.pid), time.process_time()
        finally:
            srv.stop()
    n = r.billable
    print(f"{view} {shape}: {n / r.elapsed_s:,.0f} req/s; load average "
          f"{os.getloadavg()[0]:.2f} at the end")
    total = 0.0
    for key, cpu in sorted(after.items(), key=lambda kv: before.get(kv[0], 0) - kv[1]):
        used = cpu - before.get(key, 0.0)
        total += used
        if used / n * 1e6 >= SHOWN_US_MIN:
            print(f"  {key[1]:<20} {used / n * 1e6:6.2f} µs a request")
    client = (client1 - client0) / n * 1e6
    print(f"  server {total / n * 1e6:.2f} µs a request; client {client:.2f}; wall "
          f"{r.elapsed_s / n * 1e6:.2f}")


@click.command()
@click.option("--view", type=click.Choice(["compact", "full"]), default="compact",
              show_default=True)
@click.option("--shape", type=click.Choice(["spread", "hot"]), default="spread",
              show_default=True)
@click.option("--seconds", default=10.0, show_default=True, type=click.FloatRange(1, 120))
def main(view: str, shape: str, seconds: float) -> None:
    """CPU per request of each server thread under ConsumeBatch load (issue 19)."""
    print(f"load average {os.getloadavg()[0]:.2f} at the start; machine: "
          f"{describe(group_floor_us())}")
    asyncio.run(run(view, shape, seconds))


if __name__ == "__main__":
    main()
