"""The faults of a history run (issue 23), from a seeded schedule.

Kinds:

- ``kill_node``: SIGKILL a ledger node, restart it ``down_s`` later on the same port; the
  log gives when the process was gone (``dead_from``) and when its successor was spawned
  (``spawned``), which bound when an unknown outcome sent to it can take effect
  (:func:`.checker.windows`);
- ``pause_node``: SIGSTOP a node for ``down_s`` (longer than the callers' deadline), then
  SIGCONT: its in-flight calls time out at the clients and may still commit afterwards;
- ``restart_pg``: ``pg_ctl restart -m immediate`` (a crash of PostgreSQL, WAL replay);
- ``kill_client``: SIGKILL one client process mid-call, start a fresh one in its place.

The schedule depends only on the seed and the run's length, so a failing run is replayed
with its seed (the order in which the faults meet the load still varies).
"""

from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass
from typing import Any

KINDS = ("kill_node", "pause_node", "restart_pg", "kill_client")
FIRST_FAULT_S = (1.5, 3.0)  # from the start of the load
GAP_S = (2.0, 5.0)  # between the end of one fault and the start of the next
DOWN_S = (1.2, 2.5)  # a node killed or paused this long (the callers' deadline is 1 s)
QUIET_END_S = 2.0  # no fault starts this close to the end of the load


@dataclass(frozen=True)
class Fault:
    at_s: float  # from the start of the load
    kind: str
    target: int  # the node or client process index
    down_s: float


def schedule(seed: int, seconds: float, nodes: int, clients: int) -> list[Fault]:
    rng = random.Random(seed)
    faults, t = [], rng.uniform(*FIRST_FAULT_S)
    while t < seconds - QUIET_END_S:
        kind = rng.choice(KINDS)
        down = rng.uniform(*DOWN_S)
        target = rng.randrange(clients if kind == "kill_client" else nodes)
        faults.append(Fault(round(t, 3), kind, target, round(down, 3)))
        t += down + rng.uniform(*GAP_S)
    return faults


class Nemesis:
    """Applies a schedule to the run's nodes, cluster and client processes (``run`` gives
    them); logs each fault with its monotonic start and end."""

    def __init__(self, nodes: list[Any], cluster: Any, clients: Any, log: list[dict]) -> None:
        self.nodes, self.cluster, self.clients, self.log = nodes, cluster, clients, log
        self.paused: set[int] = set()

    def apply(self, f: Fault) -> None:
        start = time.monotonic_ns()
        extra = {}
        if f.kind == "kill_node":
            node = self.nodes[f.target]
            node.kill()  # returns once the process is gone
            extra["dead_from"] = time.monotonic_ns()
            time.sleep(f.down_s)
            extra["spawned"] = time.monotonic_ns()  # no process on that port until now
            node.start()
        elif f.kind == "pause_node":
            proc = self.nodes[f.target].proc
            proc.send_signal(signal.SIGSTOP)
            self.paused.add(f.target)
            time.sleep(f.down_s)
            proc.send_signal(signal.SIGCONT)
            self.paused.discard(f.target)
        elif f.kind == "restart_pg":
            self.cluster.restart("immediate")
        elif f.kind == "kill_client":
            self.clients.kill_and_replace(f.target)
        self.log.append({"kind": f.kind, "target": f.target, "at_s": f.at_s,
                         "start": start, "end": time.monotonic_ns(), **extra})

    def heal(self) -> None:
        """Every node running and resumed (the final state is read from them)."""
        for i in list(self.paused):
            self.nodes[i].proc.send_signal(signal.SIGCONT)
        self.paused.clear()
