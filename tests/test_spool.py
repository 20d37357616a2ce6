"""The client's local spool (R26): fail open through an outage, replay exactly once.

Real servers on loopback, on a fixed port so that a restarted server is the same target; the
clients are the real ones with ``spool_path``. Every wait is bounded.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from clients.client import LedgerClient, LedgerError
from clients.ledgerctl import main as ledgerctl
from clients.spool import Spool, SpoolLimits
from ledger.store import consume_entries

from .conftest import ROOT, T0, ServerProcess, make_account

WAIT_S = 60.0  # every wait for a replay is bounded by this
DAY = 86_400
FAST = {"retries": 1, "timeout_s": 3.0}  # an unreachable ledger is given up on quickly


FIXED_PORTS = range(20_000, 32_000)  # below the ephemeral range: no outgoing connection
PORT_TRIES_MAX = 50                  # of any process takes one between the check and serve


def free_port() -> int:
    """A port free now, outside the range the kernel hands to outgoing connections."""
    rng = random.Random()
    for _ in range(PORT_TRIES_MAX):
        port = rng.choice(FIXED_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


class FixedPortServer(ServerProcess):
    """A server that comes back on the same port after a stop."""

    def __init__(self, tmp: Path, port: int, db: str | None = None) -> None:
        super().__init__(tmp, extra=["--listen", f"127.0.0.1:{port}"], db=db)
        self.fixed = port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.fixed}"


@pytest.fixture
def srv(tmp_path: Path, db: str) -> Iterator[FixedPortServer]:
    s = FixedPortServer(tmp_path, free_port(), db).start()
    try:
        yield s
    finally:
        s.stop()


def wait_empty(path: Path, timeout_s: float = WAIT_S) -> Spool:
    """Poll the spool until nothing is pending (bounded); return it, still open."""
    spool = Spool(path)
    deadline = time.monotonic() + timeout_s
    while spool.status().pending and time.monotonic() < deadline:
        time.sleep(0.1)
    return spool


def payg_units_today(target: str, account_id: str) -> int:
    with LedgerClient(target) as c:
        return c.get_remaining(account_id).payg_units


def setup_account(target: str, account_id: str = "acme") -> None:
    with LedgerClient(target) as c:
        c.set_time(T0)
        make_account(c, account_id, cash_micros=100_000_000)


def test_outage_spooled_then_recorded_exactly_once(srv: FixedPortServer, tmp_path: Path):
    """Server stopped: 20 consumes answer provisional; restarted: the replayer records each
    exactly once (no replays, 20 pay-as-you-go units), each entry keeping the instant the
    client saw it (R26), and the spool ends empty."""
    setup_account(srv.target)
    path = tmp_path / "spool.db"
    with LedgerClient(srv.target, spool_path=path, **FAST) as c:
        first = c.consume("acme")
        assert not first.provisional and first.billable
        srv.stop()
        seen_from = time.time_ns() // 1_000
        answers = [c.consume("acme", request_id=f"out-{i}") for i in range(20)]
        seen_to = time.time_ns() // 1_000
        assert all(a.provisional and a.request_id == f"out-{i}" for i, a in enumerate(answers))
        assert Spool(path).status().pending == 20
        srv.start()
        spool = wait_empty(path)
        assert spool.status().pending == 0 and spool.status().refused == 0
        assert c.replayer.state.totals.recorded == 20
        assert c.replayer.state.totals.replayed == 0
    assert payg_units_today(srv.target, "acme") == 21
    # R26: each entry keeps when the client saw the request (its first send), not when the
    # replay arrived on the ledger's (test) clock.
    conn = srv.read_conn()
    observed = {e[3]: e[4].get("client_ts_us") for e in consume_entries(conn)}
    conn.close()
    assert all(seen_from <= observed[f"out-{i}"] <= seen_to for i in range(20)), observed


ABRUPT_CHILD = textwrap.dedent("""
    import os, sys
    from clients.client import LedgerClient
    c = LedgerClient(sys.argv[1], spool_path=sys.argv[2], retries=0, timeout_s=2.0)
    for i in range(int(sys.argv[3])):
        assert c.consume("acme", request_id=f"abrupt-{i}").provisional
    os._exit(0)  # no close(), no flush: only what is durable survives
""")


def test_abrupt_end_a_fresh_process_replays_everything(srv: FixedPortServer, tmp_path: Path):
    """A client process that spools 15 requests and ends with os._exit leaves them durable;
    a fresh client on the same spool sends all 15 once the ledger is back."""
    setup_account(srv.target)
    srv.stop()
    path = tmp_path / "spool.db"
    child = subprocess.run([sys.executable, "-c", ABRUPT_CHILD, srv.target, str(path), "15"],
                           cwd=ROOT, capture_output=True, timeout=120)
    assert child.returncode == 0, child.stderr.decode()
    assert Spool(path).status().pending == 15
    srv.start()
    with LedgerClient(srv.target, spool_path=path):
        spool = wait_empty(path)
        assert spool.status().pending == 0
    assert payg_units_today(srv.target, "acme") == 15


def test_ambiguous_failure_is_replayed_and_charged_once(srv: FixedPortServer, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    """The server commits the request and dies before it replies (fault point after_commit):
    the client spools it; at replay the ledger answers `replayed`, and it is charged once."""
    setup_account(srv.target)
    srv.stop()
    monkeypatch.setenv("QUOTA_LEDGER_FAULT", "after_commit:1.0:1")
    srv.start()
    monkeypatch.delenv("QUOTA_LEDGER_FAULT")
    path = tmp_path / "spool.db"
    with LedgerClient(srv.target, spool_path=path, **FAST) as c:
        answer = c.consume("acme", request_id="ambiguous-1")
        assert answer.provisional
        assert srv.proc is not None and srv.proc.wait(10) != 0  # it did die after the commit
        srv.stop()
        srv.start()
        wait_empty(path)
        assert c.replayer.state.totals.replayed == 1
    assert payg_units_today(srv.target, "acme") == 1


def suspend(c: LedgerClient, account_id: str) -> None:
    """Pay-as-you-go with no money: the bill stays unpaid; 8 days later the account is
    suspended (R22, R23)."""
    c.set_time(T0)
    make_account(c, account_id)
    c.consume(account_id, quantity=10)  # a bill that rounds to at least a cent
    c.advance_time(DAY)  # the day is settled: its bill stays unpaid (overdue, R22)
    c.advance_time(8 * DAY)  # more than 168 hours later (R23)
    assert c.get_account(account_id).status == 3  # ACCOUNT_STATUS_SUSPENDED


def test_refused_at_replay_is_moved_out_and_reported(srv: FixedPortServer, tmp_path: Path):
    """A spooled request for a suspended account is refused at replay: it leaves the pending
    rows for the refused table (never retried) and `ledgerctl spool status` reports it."""
    with LedgerClient(srv.target) as c:
        suspend(c, "late")
    srv.stop()
    path = tmp_path / "spool.db"
    with LedgerClient(srv.target, spool_path=path, **FAST) as c:
        assert c.consume("late", request_id="refuse-me").provisional
        srv.start()
        spool = wait_empty(path)
        assert spool.status().refused == 1
        assert c.replayer.state.totals.refused == 1
    result = CliRunner().invoke(ledgerctl, ["spool", "status", "--spool", str(path), "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert (status["pending"], status["refused"]) == (0, 1)
    assert status["refused_examples"][0]["reason"] == "ACCOUNT_SUSPENDED"
    assert status["refused_examples"][0]["request_id"] == "refuse-me"


def test_spool_full_raises_and_drops_nothing(tmp_path: Path):
    """Past rows_max the call raises SPOOL_FULL and the rows already kept stay."""
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    path = tmp_path / "spool.db"
    with LedgerClient(dead, spool_path=path, spool_limits=SpoolLimits(rows_max=3),
                      **FAST) as c:
        assert all(c.consume("acme").provisional for _ in range(3))
        with pytest.raises(LedgerError) as err:
            c.consume("acme")
        assert err.value.reason == "SPOOL_FULL"
        assert err.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert Spool(path).status().pending == 3


def test_spool_limits_on_bytes_and_age(tmp_path: Path):
    """bytes_max and age_max_s refuse a new request the same way (SPOOL_FULL)."""
    now = [1_000.0]
    spool = Spool(tmp_path / "s.db", SpoolLimits(bytes_max=200, age_max_s=60),
                  clock=lambda: now[0])
    request = LedgerClient.consume_request("acme", request_id="x" * 100)
    spool.add(request)
    with pytest.raises(LedgerError, match="bytes_max"):
        spool.add(LedgerClient.consume_request("acme", request_id="y" * 100))
    now[0] += 61
    with pytest.raises(LedgerError, match="age_max_s"):
        spool.add(LedgerClient.consume_request("acme", request_id="z"))
    assert spool.status().pending == 1


SHARING_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from clients.client import LedgerClient
    from clients.spool import Spool
    target, path, n, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    with LedgerClient(target, spool_path=path, retries=0, timeout_s=2.0) as c:
        for i in range(n):
            assert c.consume("acme", request_id=f"{tag}-{i}").provisional
        Path(path + "." + tag).touch()  # spooled: the test may start the ledger
        spool, deadline = Spool(path), time.monotonic() + 60
        while spool.status().pending and time.monotonic() < deadline:
            time.sleep(0.1)
        sys.exit(1 if spool.status().pending else 0)
""")


def test_two_processes_share_one_spool_file(srv: FixedPortServer, tmp_path: Path):
    """Two client processes spool into one file at the same time, then both replayers run
    against it: every request is recorded exactly once and the spool ends empty."""
    setup_account(srv.target)
    srv.stop()
    path = tmp_path / "shared.db"
    Spool(path).close()  # created once, before the writers race
    children = [subprocess.Popen([sys.executable, "-c", SHARING_CHILD, srv.target, str(path),
                                  "30", tag], cwd=ROOT, stderr=subprocess.PIPE)
                for tag in ("a", "b")]
    deadline = time.monotonic() + WAIT_S
    while not all(Path(f"{path}.{t}").exists() for t in "ab") and time.monotonic() < deadline:
        assert all(ch.poll() is None for ch in children), [ch.stderr.read() for ch in children]
        time.sleep(0.1)
    assert Spool(path).status().pending == 60
    srv.start()
    for ch in children:
        assert ch.wait(WAIT_S + 30) == 0, ch.stderr.read().decode()
    assert Spool(path).status().pending == 0
    assert payg_units_today(srv.target, "acme") == 60


def test_ledgerctl_spool_replay_drains_and_exits_0(srv: FixedPortServer, tmp_path: Path):
    """`ledgerctl spool replay` sends a spool left by a client and exits 0 once it is empty;
    against a ledger that is down it gives up with exit 1 and keeps every row."""
    setup_account(srv.target)
    srv.stop()
    path = tmp_path / "spool.db"
    with LedgerClient(srv.target, spool_path=path, **FAST) as c:
        for i in range(12):
            assert c.consume("acme", request_id=f"ctl-{i}").provisional
    runner = CliRunner()
    down = runner.invoke(ledgerctl, ["--target", srv.target, "--timeout", "1", "spool",
                                     "replay", "--spool", str(path), "--give-up-after", "2"])
    assert down.exit_code == 1 and Spool(path).status().pending == 12
    srv.start()
    done = runner.invoke(ledgerctl, ["spool", "replay", "--spool", str(path), "--target",
                                     srv.target])
    assert done.exit_code == 0, done.output
    assert "recorded 12" in done.output
    assert Spool(path).status().pending == 0
    assert payg_units_today(srv.target, "acme") == 12
