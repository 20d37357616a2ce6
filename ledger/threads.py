"""The operating system's name for the ledger's own threads (Linux ``comm``), so that
``top -H``, py-spy and ``make bench``'s CPU accounting (``tests/bench_cpu.py``, issue 18)
can tell the writer, the checkpointer and the key-run builder from gRPC's threads."""

from __future__ import annotations

import threading

OS_THREAD_NAME_MAX = 15  # Linux keeps 15 bytes of a thread's comm


def name_this_thread() -> None:
    """Give the calling thread's Python name to the OS thread; a no-op where /proc is not."""
    t = threading.current_thread()
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(t.name[:OS_THREAD_NAME_MAX])
    except OSError:
        pass
