"""Account affinity (issue 20, point 2): with several ledger nodes, each account's calls go
to one home node.

Given several targets (``"10.0.0.1:50051,10.0.0.2:50051"``), a client ranks the nodes for
each account by rendezvous hashing (highest random weight): the weight of a node for an
account is a 64-bit hash of both, and the account's home is the node of highest weight.
So every client that knows the same nodes sends an account to the same node, and when a
node is added or removed only the accounts whose home it is move.

- A node that fails a call with UNAVAILABLE is skipped for ``NODE_RETRY_S``: its accounts
  go to the next node in their own ranking (the retry of that very call included), and come
  back once the pause is over and the node answers again.
- Calls that name no account (settlement, the test clock, listings) go to the first node
  that is not skipped.
- Correctness never depends on affinity: any node serves any account (the accounts' locks
  and versions, docs/scaling.md). Affinity only stops nodes from taking turns on the same
  accounts and reloading what the other changed.

``routing="round_robin"`` keeps gRPC's round robin over one channel instead.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

NODE_RETRY_S = 1.0  # how long a node that failed UNAVAILABLE is skipped
ROUTINGS = ("affinity", "round_robin")


def node_weight(node: str, account_id: str) -> int:
    """The rendezvous weight of a node for an account: stable across processes and
    machines (a keyed hash of both names, not Python's ``hash``)."""
    digest = hashlib.blake2b(f"{node}\x00{account_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranking(nodes: list[str], account_id: str) -> list[str]:
    """The nodes in the account's order of preference: its home first."""
    return sorted(nodes, key=lambda n: (node_weight(n, account_id), n), reverse=True)


def split_targets(target: str) -> list[str]:
    """The nodes of a comma-separated target (one node: a list of one)."""
    return [p.strip() for p in target.split(",") if p.strip()]


class Router:
    """Which node a call goes to, given the nodes that failed lately."""

    def __init__(self, nodes: list[str], now: Callable[[], float] = time.monotonic) -> None:
        if not nodes:
            raise ValueError("a router needs at least one node")
        self.nodes, self._now = list(nodes), now
        self._skipped_until: dict[str, float] = {}

    def pick(self, account_id: str = "") -> str:
        """The account's home, or the next node in its ranking while the home is skipped;
        with every node skipped, the home anyway (the call will tell)."""
        order = ranking(self.nodes, account_id) if account_id else self.nodes
        now = self._now()
        for node in order:
            if self._skipped_until.get(node, 0.0) <= now:
                return node
        return order[0]

    def failed(self, node: str) -> None:
        self._skipped_until[node] = self._now() + NODE_RETRY_S

    def answered(self, node: str) -> None:
        self._skipped_until.pop(node, None)
