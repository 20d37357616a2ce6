"""Crash campaign (R11, R12, R25): start, load, SIGKILL at random moments, restart, check.

Each iteration is seeded. It kills the server either at a random instant or from inside the
commit path (``ledger/faults.py``: before the transaction, after the rows are written but
before COMMIT, after COMMIT but before any reply). After each restart it checks that every
acknowledged request is there exactly once with its original result, that units and money
are conserved, and at the end that ``verify`` passes.

The default suite runs CRASH_ITERATIONS_CI iterations; ``make crash`` runs 200.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from typing import Any

import pytest

from clients.client import LedgerClient, LedgerError
from clients.routing import ROUTINGS, ranking
from ledger.store import consume_entries
from ledger.verify import verify

from .conftest import T0, ServerProcess

CRASH_ITERATIONS_CI = 20
CRASH_ITERATIONS_FULL = 200
ACCOUNTS = ("crash-a", "crash-b", "crash-c")
WORKERS = 4
REQUESTS_PER_WORKER_MAX = 400
LOAD_SECONDS_MAX = 4.0
MODES = ("timer", "before_commit", "during_commit", "after_commit")


def _fund(srv: ServerProcess) -> None:
    with srv.client() as c:
        c.set_time(T0)
        for acct in ACCOUNTS:
            c.create_account(acct)
            c.top_up(acct, 1_000_000_000, request_id=f"fund-{acct}")
            c.purchase_plan(acct, "month-100k", request_id=f"plan-{acct}")


def _load(srv: ServerProcess, seed: int, acked: dict[str, tuple], stop: threading.Event,
          accounts: tuple[str, ...] = ACCOUNTS) -> None:
    rng = random.Random(seed)
    with LedgerClient(srv.target, timeout_s=2, retries=0) as c:
        for i in range(REQUESTS_PER_WORKER_MAX):
            if stop.is_set():
                return
            acct = rng.choice(accounts)
            qty = rng.randint(1, 60)
            region = rng.choice(("mainland", "outside"))
            rid = f"s{seed}-{i}"
            try:
                r = c.consume(acct, quantity=qty, region=region, request_id=rid)
            except LedgerError:
                return  # the server died under us: this request is unacknowledged
            acked[rid] = (acct, qty, region, [(a.plan_id, a.units) for a in r.allocations],
                          r.payg_units, r.journal_seq)


def _iteration(srv: ServerProcess, seed: int, monkeypatch: pytest.MonkeyPatch) -> int:
    rng = random.Random(seed)
    mode = MODES[seed % len(MODES)]
    if mode == "timer":
        monkeypatch.delenv("QUOTA_LEDGER_FAULT", raising=False)
    else:
        monkeypatch.setenv("QUOTA_LEDGER_FAULT", f"{mode}:{rng.uniform(0.005, 0.05)}:{seed}")
    srv.start()
    monkeypatch.delenv("QUOTA_LEDGER_FAULT", raising=False)
    acked: dict[str, tuple] = {}
    stop = threading.Event()
    workers = [threading.Thread(target=_load, args=(srv, seed * 100 + w, acked, stop))
               for w in range(WORKERS)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + (rng.uniform(0.05, 1.5) if mode == "timer"
                                   else LOAD_SECONDS_MAX)
    while time.monotonic() < deadline and srv.proc.poll() is None:
        time.sleep(0.01)
    if srv.proc.poll() is None:
        srv.kill()
    else:
        srv.log.close()
    stop.set()
    for w in workers:
        w.join(30)
    srv.start()  # restart without faults
    _replay_acked(srv, acked)
    srv.stop()
    _check_conserved(srv, acked)
    return len(acked)


def _replay_acked(srv: ServerProcess, acked: dict[str, tuple], **client: Any) -> None:
    """R12: every acknowledged request, sent again, replays its original result."""
    with srv.client(**client) as c:
        for rid, (acct, qty, region, alloc, payg, seq) in acked.items():
            again = c.consume(acct, quantity=qty, region=region, request_id=rid)
            assert again.replayed, rid
            assert [(a.plan_id, a.units) for a in again.allocations] == alloc, rid
            assert (again.payg_units, again.journal_seq) == (payg, seq), rid


def _check_conserved(srv: ServerProcess, acked: dict[str, tuple]) -> None:
    conn = srv.read_conn()
    try:
        entries = list(consume_entries(conn))
        keys = Counter(e[3] for e in entries)
        assert all(keys[rid] == 1 for rid in acked), "an acknowledged request is missing"
        payloads = [e[4] for e in entries]
        taken = sum(n for p in payloads for _, n in p["alloc"])
        payg = sum(p["payg_units"] for p in payloads)
        assert taken + payg == sum(p["qty"] for p in payloads)  # units conserved
        offsets = conn.execute("SELECT coalesce(sum(units), 0) FROM offsets_daily").fetchone()[0]
        usage = conn.execute("SELECT coalesce(sum(payg_units), 0), coalesce(sum(payg_micros), 0)"
                             " FROM usage_daily").fetchone()
        assert offsets == taken and usage[0] == payg
        assert usage[1] == sum(p["payg_micros"] for p in payloads)  # money conserved
        for total, remaining, forfeited, plan_id in conn.execute(
                "SELECT units_total, units_remaining, units_forfeited, plan_id FROM plans"):
            used = conn.execute("SELECT coalesce(sum(units), 0) FROM offsets_daily"
                                " WHERE plan_id = ?", (plan_id,)).fetchone()[0]
            assert total == remaining + forfeited + used and remaining >= 0  # no unit twice
    finally:
        conn.close()


def _campaign(tmp_path, monkeypatch, iterations: int, db: str) -> None:
    srv = ServerProcess(tmp_path, db=db)
    srv.start()
    _fund(srv)
    srv.stop()
    acknowledged = 0
    for seed in range(iterations):
        try:
            acknowledged += _iteration(srv, seed, monkeypatch)
        except AssertionError as exc:
            raise AssertionError(f"crash campaign failed at seed {seed} "
                                 f"(mode {MODES[seed % len(MODES)]}): {exc}") from exc
    report = verify(str(srv.db))
    assert report.ok, report.problems
    assert acknowledged > iterations  # the load really ran
    print(f"crash campaign: {iterations} iterations, {acknowledged} acknowledged requests, "
          f"{report.entries} journal entries, verify ok")


def test_r11_crash_campaign_short(tmp_path, monkeypatch, db):
    """20 seeded SIGKILLs (timer and inside the commit path): nothing acknowledged is lost."""
    _campaign(tmp_path, monkeypatch, CRASH_ITERATIONS_CI, db)


@pytest.mark.slow
def test_r11_crash_campaign_full(tmp_path, monkeypatch, db):
    """`make crash`: the same campaign, 200 iterations."""
    _campaign(tmp_path, monkeypatch, int(os.environ.get("CRASH_ITERATIONS",
                                                        CRASH_ITERATIONS_FULL)), db)


# ------------------------------------------------ several nodes on PostgreSQL (issue 11)

PG_CRASH_ITERATIONS_CI = 6
PG_CRASH_ITERATIONS_FULL = 50
PG_MODES = ("kill_node", "before_commit", "during_commit", "after_commit",
            "restart_postgres")
PG_AFTER_RESTART_S = 0.5  # load goes on this long after PostgreSQL came back


def _pg_iteration(nodes: list[ServerProcess], cluster, seed: int,
                  monkeypatch: pytest.MonkeyPatch, routing: str = "round_robin") -> int:
    """Two nodes under load; one node dies (at a random instant or inside its commit
    path), or PostgreSQL restarts (-m immediate). Then every acknowledged request replays
    exactly through the node that lived, and units and money are conserved.

    ``routing``: each node gets every account ("round_robin": the nodes' optimistic groups
    lose to each other most of the time), or only the accounts whose home it is by the
    clients' rendezvous ranking ("affinity", issue 20); the replay goes through the node
    that lived, the home or not."""
    rng = random.Random(seed)
    mode = PG_MODES[seed % len(PG_MODES)]
    victim, other = nodes[seed % 2], nodes[1 - seed % 2]
    for node in nodes:
        if node is victim and mode not in ("kill_node", "restart_postgres"):
            monkeypatch.setenv("QUOTA_LEDGER_FAULT", f"{mode}:{rng.uniform(0.01, 0.1)}:{seed}")
        node.start()
        monkeypatch.delenv("QUOTA_LEDGER_FAULT", raising=False)
    acked: dict[str, tuple] = {}
    stop = threading.Event()
    targets = [n.target for n in nodes]
    mine = {t: tuple(a for a in ACCOUNTS if ranking(targets, a)[0] == t) for t in targets}
    workers = [threading.Thread(target=_load, args=(
        nodes[w % 2], seed * 100 + w, acked, stop,
        (mine[nodes[w % 2].target] or ACCOUNTS) if routing == "affinity" else ACCOUNTS))
        for w in range(WORKERS)]
    for w in workers:
        w.start()
    at_random = mode in ("kill_node", "restart_postgres")
    deadline = time.monotonic() + (rng.uniform(0.05, 1.5) if at_random else LOAD_SECONDS_MAX)
    while time.monotonic() < deadline and victim.proc.poll() is None:
        time.sleep(0.01)
    if mode == "restart_postgres":
        cluster.restart(mode="immediate")
        time.sleep(PG_AFTER_RESTART_S)
    elif victim.proc.poll() is None:
        victim.kill()
    else:
        victim.log.close()
    stop.set()
    for w in workers:
        w.join(30)
    _replay_acked(other, acked, timeout_s=30)  # retries UNAVAILABLE while it reconnects
    for node in nodes:
        node.stop()
    _check_conserved(other, acked)
    return len(acked)


def _pg_campaign(tmp_path, monkeypatch, pg_url, cluster, iterations: int,
                 routing: str = "round_robin") -> None:
    nodes = []
    for i in range(2):
        (tmp_path / f"node{i}").mkdir()
        nodes.append(ServerProcess(tmp_path / f"node{i}", db=pg_url))
    nodes[0].start()
    _fund(nodes[0])
    nodes[0].stop()
    acknowledged = 0
    for seed in range(iterations):
        try:
            acknowledged += _pg_iteration(nodes, cluster, seed, monkeypatch, routing)
        except AssertionError as exc:
            raise AssertionError(f"PostgreSQL crash campaign failed at seed {seed} "
                                 f"(mode {PG_MODES[seed % len(PG_MODES)]}, {routing}): {exc}"
                                 ) from exc
    report = verify(pg_url)
    assert report.ok, report.problems
    assert acknowledged > iterations
    print(f"PostgreSQL crash campaign: {iterations} iterations, {acknowledged} acknowledged "
          f"requests, {report.entries} journal entries, verify ok")


@pytest.mark.parametrize("routing", ROUTINGS)
def test_postgres_crash_campaign_nodes_and_database_short(tmp_path, monkeypatch, pg_url,
                                                          pg_cluster, routing):
    _pg_campaign(tmp_path, monkeypatch, pg_url, pg_cluster, PG_CRASH_ITERATIONS_CI, routing)


@pytest.mark.slow
def test_postgres_crash_campaign_nodes_and_database_full(tmp_path, monkeypatch, pg_url,
                                                         pg_cluster):
    """`make crash`: 50 iterations killing nodes and restarting PostgreSQL."""
    _pg_campaign(tmp_path, monkeypatch, pg_url, pg_cluster,
                 int(os.environ.get("PG_CRASH_ITERATIONS", PG_CRASH_ITERATIONS_FULL)))
