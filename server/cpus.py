"""Where the server's front runs (``--front-cpus``, issue 18).

On a small virtual machine a lone call's latency depends more on where the server's threads
run than on its code: when the event loop and gRPC's own threads may run on any CPU, a
call's wake-ups cross between CPUs. Confined to one CPU they do not
(docs/performance-thirteenth-and-fourteenth.md, fourteenth sitting). The writer's thread,
and every thread started before the front is confined (the checkpointer, notice delivery,
the metrics server), keep all of the process's CPUs, so the commits of a busy ledger still
run beside the loop.

Linux only (``os.sched_setaffinity``); unset, nothing changes.
"""

from __future__ import annotations

import os
import re

from ledger.errors import InvalidArgument

_CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_cpus(text: str, source: str = "--front-cpus") -> frozenset[int]:
    """A CPU list as Linux writes one (``1``, ``0-1,3``): the set of CPU numbers."""
    spec = text.replace(" ", "")
    if not _CPU_LIST.match(spec):
        raise InvalidArgument(f"{source}: front_cpus must be a CPU list such as 1 or 0-1,3; "
                              f"got {text!r}")
    cpus: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last or first)
        if hi < lo:
            raise InvalidArgument(f"{source}: front_cpus range {part} runs backwards")
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def confine_front(text: str | None) -> None:
    """Confine the calling thread (the event loop's, before gRPC starts its own threads,
    which inherit it) to the CPUs of ``text``; nothing when ``text`` is unset. Raises
    InvalidArgument for CPUs this process may not use."""
    if not text:
        return
    cpus = parse_cpus(text)
    if not hasattr(os, "sched_setaffinity"):
        raise InvalidArgument("front_cpus needs Linux (os.sched_setaffinity)")
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise InvalidArgument(f"front_cpus {text}: this process may run only on CPUs "
                              f"{','.join(map(str, sorted(allowed)))}")
    os.sched_setaffinity(0, cpus)
