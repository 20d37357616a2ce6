"""Account affinity (issue 20, point 2): given several nodes, the clients send each
account's calls to its home node (rendezvous hashing), fail over to the next node in the
account's ranking, and come back. Correctness never depends on it (docs/scaling.md)."""

from __future__ import annotations

import asyncio
import time

import grpc

from clients.client import AsyncLedgerClient, LedgerClient, LedgerError
from clients.routing import NODE_RETRY_S, Router, ranking

from .conftest import T0, ServerProcess, make_account

NODES = ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"]
ACCOUNTS = [f"acct-{i:04d}" for i in range(2_000)]


def test_rendezvous_routing_is_stable_and_spreads_accounts():
    homes = {a: ranking(NODES, a)[0] for a in ACCOUNTS}
    assert homes == {a: ranking(list(reversed(NODES)), a)[0] for a in ACCOUNTS}  # any order
    share = {n: sum(h == n for h in homes.values()) / len(ACCOUNTS) for n in NODES}
    assert all(0.25 < s < 0.42 for s in share.values()), share


def test_a_dead_node_moves_only_its_own_accounts():
    """Without node 3, its accounts go to their second choice; no other account moves."""
    before = {a: ranking(NODES, a) for a in ACCOUNTS}
    after = {a: ranking(NODES[:2], a)[0] for a in ACCOUNTS}
    for a in ACCOUNTS:
        expect = before[a][0] if before[a][0] != NODES[2] else before[a][1]
        assert after[a] == expect, a


def test_the_router_fails_over_and_comes_back():
    now = [0.0]
    router = Router(NODES, now=lambda: now[0])
    account = ACCOUNTS[7]
    home, second = ranking(NODES, account)[:2]
    assert router.pick(account) == home
    router.failed(home)
    assert router.pick(account) == second
    now[0] += NODE_RETRY_S + 0.01
    assert router.pick(account) == home  # tried again once the pause is over
    for node in NODES:
        router.failed(node)
    assert router.pick(account) == home  # all skipped: the home, and the call will tell
    assert router.pick("") == NODES[0]  # no account: the first node


def _node_of(node: ServerProcess, account_ids: list[str]) -> dict[str, set[int]]:
    conn = node.read_conn()
    try:
        rows = conn.execute("SELECT account_id, node FROM consume_keys", ()).fetchall()
    finally:
        conn.close()
    out: dict[str, set[int]] = {a: set() for a in account_ids}
    for account_id, n in rows:
        if account_id in out:
            out[account_id].add(n)
    return out


def test_postgres_each_account_goes_to_one_home_node(two_nodes):
    a, b = two_nodes
    accounts = [f"home-{i}" for i in range(16)]
    with LedgerClient(f"{a.target},{b.target}") as c:
        assert c.router is not None
        c.set_time(T0)
        for account in accounts:
            make_account(c, account, cash_micros=10_000_000)
            for i in range(3):
                assert c.consume(account, request_id=f"{account}-{i}").billable
    nodes = _node_of(a, accounts)
    assert all(len(n) == 1 for n in nodes.values()), nodes
    assert len(set().union(*nodes.values())) == 2, "every account's home was one node"


def test_postgres_failover_to_the_next_node_and_back(tmp_path, two_nodes, pg_url):
    a, b = two_nodes
    with LedgerClient(f"{a.target},{b.target}", timeout_s=10) as c:
        c.set_time(T0)
        homed_b = [acct for acct in (f"fo-{i}" for i in range(40))
                   if ranking([a.target, b.target], acct)[0] == b.target][:4]
        for account in homed_b:
            make_account(c, account, cash_micros=10_000_000)
            c.consume(account, request_id=f"{account}-before")
        b_node = _node_of(a, homed_b)[homed_b[0]]
        port = b.port
        b.stop()
        for account in homed_b:  # b is down: a serves them, once each
            assert c.consume(account, request_id=f"{account}-during").billable
        (tmp_path / "b2").mkdir()
        b2 = ServerProcess(tmp_path / "b2", db=pg_url, extra=["--listen", f"127.0.0.1:{port}"])
        two_nodes[1] = b2.start()
        time.sleep(NODE_RETRY_S + 0.2)
        deadline = time.monotonic() + 10
        while True:  # the channel reconnects within gRPC's backoff
            try:
                c.consume(homed_b[0], request_id=f"{homed_b[0]}-probe-{time.monotonic()}")
                break
            except LedgerError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        time.sleep(NODE_RETRY_S + 0.2)
        for account in homed_b:
            assert c.consume(account, request_id=f"{account}-after").billable
    conn = a.read_conn()
    try:
        rows = dict(conn.execute(
            "SELECT request_id, node FROM consume_keys WHERE request_id LIKE ?",
            ("fo-%",)).fetchall())
    finally:
        conn.close()
    for account in homed_b:
        assert rows[f"{account}-before"] in b_node
        assert rows[f"{account}-during"] not in b_node  # b was down: a took them
        assert rows[f"{account}-after"] in b_node  # and back home


def test_postgres_a_batch_split_across_nodes_keeps_each_callers_result(two_nodes):
    a, b = two_nodes
    accounts = [f"split-{i}" for i in range(8)]
    with LedgerClient(f"{a.target},{b.target}") as c:
        c.set_time(T0)
        for account in accounts:
            make_account(c, account, cash_micros=10_000_000)

    async def main() -> list:
        async with AsyncLedgerClient(f"{a.target},{b.target}", retries=0) as ac:
            assert len(ac.coalescers) == 2
            return await asyncio.gather(*(
                ac.consume("nobody" if i % 5 == 0 else accounts[i % 8],
                           request_id=f"s-{i}") for i in range(64)),
                return_exceptions=True)

    outcomes = asyncio.run(main())
    for i, o in enumerate(outcomes):
        if i % 5 == 0:
            assert isinstance(o, LedgerError) and o.code is grpc.StatusCode.NOT_FOUND, o
        else:
            assert o.billable and o.request_id == f"s-{i}" and not o.replayed, o
    with LedgerClient(a.target) as c:
        used = sum(c.get_remaining(acct).payg_units for acct in accounts)
    assert used == sum(1 for i in range(64) if i % 5)
