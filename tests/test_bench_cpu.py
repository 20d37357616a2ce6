"""The benchmarks' CPU meter counts a server's child processes (tests/bench_cpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from .bench_cpu import CpuMeter, child_pids

BURN_S = 0.3  # the child's busy loop
SHARE = 0.8  # of it, at least, read from /proc (10 ms ticks)
WAIT_S = 10.0  # at most, for it to finish


def test_a_child_process_cpu_counts_in_the_parents() -> None:
    meter = CpuMeter(os.getpid())
    meter.start()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              f"while time.process_time() - t < {BURN_S}: pass\n"
                              "time.sleep(30)"])
    try:
        assert child.pid in child_pids(os.getpid())
        deadline = time.monotonic() + WAIT_S
        got: dict = {}
        child_us = 0.0
        while time.monotonic() < deadline:
            got = meter.stop(1)
            child_us = sum(us for name, us in got["threads"].items()
                           if name.startswith("child "))
            if child_us >= BURN_S * 1e6 * SHARE:
                break
            time.sleep(0.05)
        assert child_us >= BURN_S * 1e6 * SHARE, got
        assert got["us_per_call"] >= child_us - 1, got  # the total holds the child's share
    finally:
        child.kill()
        child.wait()
