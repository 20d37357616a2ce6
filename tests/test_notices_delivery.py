"""Webhook delivery under faults (issue 22), on both backends, against a real receiver on
127.0.0.1: the receiver down then up, the ledger SIGKILLed mid-delivery, a crash before a
notice's entry commits, and two PostgreSQL nodes delivering side by side."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import T0, ServerProcess, end_day_and_die, make_account, start_nodes
from .webhook_receiver import WAIT_S, Receiver, notices_file

SECRET = "s3cret-for-the-tests-only"
ACCOUNTS = 4  # each: a bill and an overdue notice when its day is settled


@pytest.fixture
def receiver():
    r = Receiver(SECRET)
    yield r
    r.close()


def owe(c, day_offset: int = 0) -> None:
    """ACCOUNTS accounts without funds use pay-as-you-go on one day (R10)."""
    c.set_time(T0 + timedelta(days=day_offset))
    for i in range(ACCOUNTS):
        make_account(c, f"a{i}")
        c.consume(f"a{i}", quantity=1_000 + i)


def notice_ids(c) -> set[str]:
    return {n.notice_id for n in c.list_notices(page_size=1_000).notices}


def test_receiver_down_then_up_every_notice_arrives(tmp_path: Path, db: str,
                                                    receiver: Receiver) -> None:
    receiver.status = 503
    path = notices_file(tmp_path / "notices.toml", receiver.url, SECRET)
    srv = ServerProcess(tmp_path, db=db, extra=["--notices", path]).start()
    try:
        with srv.client() as c:
            owe(c)
            c.set_time(T0 + timedelta(days=1))  # settled: a bill and overdue each
            ids = notice_ids(c)
            assert len(ids) == 2 * ACCOUNTS
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline and len({json.loads(p["body"])["id"]
                                                       for p in receiver.posts}) < len(ids):
                time.sleep(0.1)
            pending = c.list_notices(undelivered_only=True, page_size=1_000).notices
            assert {n.notice_id for n in pending} == ids
            assert all(d.state == "pending" and d.attempts >= 1 and d.last_error == "HTTP 503"
                       for n in pending for d in n.deliveries)
            families = _scrape(srv.metrics_port)
            assert _value(families, "ledger_notices_pending") == len(ids)
            assert _value(families, "ledger_notice_delivery_failures_total") >= len(ids)
            receiver.status = 200
            got = receiver.wait_for(ids)
            assert set(got) == ids
            assert all(p["header_id"] == json.loads(p["body"])["id"] and p["signed"]
                       for p in receiver.posts)  # every POST can be deduplicated by its id
            _wait(lambda: not c.list_notices(undelivered_only=True).notices)
            families = _scrape(srv.metrics_port)
            assert _value(families, "ledger_notices_pending") == 0
            assert _value(families, "ledger_notices_delivered_total") == len(ids)
    finally:
        srv.stop()


def test_sigkill_during_delivery_loses_nothing(tmp_path: Path, db: str,
                                               receiver: Receiver) -> None:
    receiver.hold_s = 0.5  # each POST in flight half a second: the kill lands inside one
    path = notices_file(tmp_path / "notices.toml", receiver.url, SECRET)
    srv = ServerProcess(tmp_path, db=db, extra=["--notices", path]).start()
    try:
        with srv.client() as c:
            owe(c)
            c.set_time(T0 + timedelta(days=1))
            ids = notice_ids(c)
        _wait(lambda: receiver.in_flight and any(receiver.in_flight.values()))
        srv.kill()
        assert len(receiver.acknowledged()) < len(ids)
        receiver.hold_s = 0.0
        srv.start()
        assert set(receiver.wait_for(ids)) == ids
        with srv.client() as c:
            _wait(lambda: not c.list_notices(undelivered_only=True).notices)
    finally:
        srv.stop()


@pytest.mark.parametrize("point", ["before_commit", "during_commit"])
def test_a_notice_whose_entry_did_not_commit_is_never_sent(tmp_path: Path, db: str,
                                                           receiver: Receiver,
                                                           monkeypatch, point: str) -> None:
    """SIGKILL inside the settlement's commit: no bill, so no bill_issued reaches the
    receiver; after the restart the day is settled and each notice arrives, same ids."""
    path = notices_file(tmp_path / "notices.toml", receiver.url, SECRET)
    srv = ServerProcess(tmp_path, db=db, extra=["--notices", path]).start()
    with srv.client() as c:
        owe(c)
    srv.stop()
    end_day_and_die(srv, monkeypatch, point)  # inside the settlement's commit
    time.sleep(1.0)  # a delivery thread would have had time to post
    assert receiver.posts == []
    srv.start()
    try:
        with srv.client() as c:
            c.set_time(T0 + timedelta(days=1))
            ids = notice_ids(c)
        assert len(ids) == 2 * ACCOUNTS
        assert set(receiver.wait_for(ids)) == ids
    finally:
        srv.stop()


def test_two_postgres_nodes_deliver_each_notice_one_at_a_time(tmp_path: Path, pg_url: str,
                                                              receiver: Receiver) -> None:
    """Both nodes deliver; a POST is never in flight twice for one notice (row locks held
    through the POST, SKIP LOCKED); one node SIGKILLed mid-delivery loses nothing. The one
    overlap allowed is a notice in flight when the node died: its lock went with its
    connection, while the receiver still held the dead node's POST (failed once so)."""
    receiver.hold_s = 0.3
    path = notices_file(tmp_path / "notices.toml", receiver.url, SECRET)
    nodes = start_nodes(tmp_path, pg_url, env_extra=["--notices", path])
    try:
        with nodes[0].client() as c:
            owe(c)
            c.set_time(T0 + timedelta(days=1))
            ids = notice_ids(c)
        _wait(lambda: any(receiver.in_flight.values()))
        before_kill = list(receiver.overlaps)
        os.kill(nodes[1].proc.pid, signal.SIGKILL)
        with receiver._lock:
            in_flight_at_kill = {nid for nid, n in receiver.in_flight.items() if n}
        nodes[1].proc.wait(10)
        nodes[1].log.close()
        assert set(receiver.wait_for(ids)) == ids
        assert before_kill == []
        assert set(receiver.overlaps) <= in_flight_at_kill, (receiver.overlaps,
                                                             in_flight_at_kill)
        with nodes[0].client() as c:
            _wait(lambda: not c.list_notices(undelivered_only=True).notices)
    finally:
        for node in nodes:
            node.stop()


def test_bad_notices_file_stops_the_server_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "notices.toml"
    path.write_text('[[webhook]]\nname = "x"\nurl = "http://hooks.example.com/h"\n'
                    'secret = "0123456789abcdef"\n')
    srv = ServerProcess(tmp_path, extra=["--notices", str(path)])
    with pytest.raises(RuntimeError) as err:
        srv.start()
    lines = [ln for ln in str(err.value).splitlines() if ln.strip()]
    assert any("is not loopback, so it needs https://" in ln for ln in lines)


# -- helpers ----------------------------------------------------------------------------------
def _wait(check, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def _scrape(port: int) -> list:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return list(text_string_to_metric_families(reply.read().decode()))


def _value(families: list, name: str) -> float:
    return sum(s.value for f in families for s in f.samples if s.name == name)
