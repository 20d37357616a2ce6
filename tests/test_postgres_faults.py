"""Faults with several nodes on PostgreSQL (issue 11, point 4), on a real cluster:

- PostgreSQL restarted under load (``pg_ctl restart -m immediate``): nodes answer
  UNAVAILABLE, never a false OK, reconnect by themselves and serve again; nothing
  acknowledged is lost.
- One node SIGKILLed: the other goes on, and the dead node's acknowledged requests replay
  through it (R12).
"""

from __future__ import annotations

import threading
import time

import grpc

from clients.client import LedgerClient, LedgerError
from ledger.verify import verify

from .conftest import T0, make_account, start_nodes

WORKERS = 4
LOAD_S = 6.0  # load on both nodes around the fault
RECOVER_DEADLINE_S = 60.0


def consumes_by_id(node) -> dict[str, int]:
    """request_id -> how many consume entries the journal holds for it."""
    from ledger.store import consume_entries
    conn = node.read_conn()
    try:
        counts: dict[str, int] = {}
        for _, _, _, request_id, _ in consume_entries(conn):
            counts[request_id] = counts.get(request_id, 0) + 1
        return counts
    finally:
        conn.close()


class Load:
    """WORKERS threads sending unique requests round-robin to the nodes, no client retries:
    every answer (OK or the gRPC code) is recorded per request_id."""

    def __init__(self, nodes, prefix: str) -> None:
        self.nodes, self.prefix = nodes, prefix
        self.acked: dict[str, object] = {}
        self.failed: dict[str, grpc.StatusCode] = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(w,)) for w in range(WORKERS)]

    def _run(self, worker: int) -> None:
        clients = [LedgerClient(n.target, retries=0, timeout_s=5) for n in self.nodes]
        try:
            i = 0
            while not self.stop.is_set() and i < 100_000:
                rid = f"{self.prefix}-{worker}-{i}"
                try:
                    r = clients[i % len(clients)].consume("acme", request_id=rid)
                    with self.lock:
                        self.acked[rid] = r
                except LedgerError as exc:  # the code is checked below
                    with self.lock:
                        self.failed[rid] = exc.code
                    time.sleep(0.05)
                i += 1
        finally:
            for c in clients:
                c.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def resend_until_acked(node, ids: list[str]) -> dict[str, object]:
    out = {}
    deadline = time.monotonic() + RECOVER_DEADLINE_S
    with LedgerClient(node.target, timeout_s=10) as c:
        for rid in ids:
            while True:
                assert time.monotonic() < deadline, "the node never served again"
                try:
                    out[rid] = c.consume("acme", request_id=rid)
                    break
                except Exception:  # noqa: BLE001  (still recovering: retry until the deadline)
                    time.sleep(0.2)
    return out


def test_postgres_restarted_under_load_loses_nothing_acknowledged(tmp_path, pg_url,
                                                                   pg_cluster):
    nodes = start_nodes(tmp_path, pg_url)
    try:
        with nodes[0].client() as c:
            c.set_time(T0)
            make_account(c, cash_micros=100_000_000)
        with Load(nodes, "pg-restart") as load:
            time.sleep(LOAD_S / 3)
            pg_cluster.restart(mode="immediate")
            time.sleep(LOAD_S * 2 / 3)
        assert load.acked, "nothing was acknowledged before or after the restart"
        assert load.failed, "the restart was not seen by any request"
        assert set(load.failed.values()) == {grpc.StatusCode.UNAVAILABLE}, load.failed
        # Both nodes serve again by themselves, and each failed request applies once.
        for node in nodes:
            resend_until_acked(node, [f"after-{node.port}"])
        retried = resend_until_acked(nodes[1], sorted(load.failed))
        counts = consumes_by_id(nodes[0])
        for rid in load.acked:
            assert counts.get(rid) == 1, f"acknowledged {rid} is not in the journal once"
        for rid in load.failed:
            assert counts.get(rid) == 1, f"{rid} applied {counts.get(rid)} times"
        assert all(r.journal_seq for r in retried.values())
    finally:
        for node in nodes:
            node.stop()
    report = verify(pg_url)
    assert report.ok, report.problems


def test_postgres_a_killed_node_leaves_the_other_serving_and_its_requests_replay(
        tmp_path, pg_url):
    a, b = start_nodes(tmp_path, pg_url)
    try:
        with a.client() as c:
            c.set_time(T0)
            make_account(c, cash_micros=100_000_000)
            c.purchase_plan("acme", "month-100k")
            acked = {f"on-a-{i}": c.consume("acme", request_id=f"on-a-{i}") for i in range(50)}
        a.kill()
        with b.client() as c:
            replays = {rid: c.consume("acme", request_id=rid) for rid in acked}
            fresh = c.consume("acme", request_id="on-b-after")
        for rid, first in acked.items():
            again = replays[rid]
            assert again.replayed and not first.replayed
            assert (again.journal_seq, again.plan_units_remaining,
                    [(x.plan_id, x.units) for x in again.allocations]) == \
                (first.journal_seq, first.plan_units_remaining,
                 [(x.plan_id, x.units) for x in first.allocations])
        assert not fresh.replayed and fresh.plan_units_remaining == 100_000 - 51
    finally:
        b.stop()
    report = verify(pg_url)
    assert report.ok, report.problems
