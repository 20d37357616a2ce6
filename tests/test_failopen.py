"""Fail open fast (issue 21, R26: a CAPTCHA server keeps verifying while the ledger is down):
the circuit breaker's state machine, the latency budget on a hung ledger, a request the
ledger applied after its budget (replayed once, R12), queries
failing fast, many threads sharing one breaker, and the async client with batching.

Real servers on loopback (SQLite: the client's behaviour does not depend on the backend);
every wait is bounded. Nothing here is timed as a performance figure: ``make bench-outage``
measures latencies.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from clients.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Prober
from clients.client import AsyncLedgerClient, LedgerClient, LedgerError
from clients.failopen import UNREACHABLE_REASON
from clients.spool import Spool
from ledger.faults import ENV as FAULT_ENV

from .test_spool import FixedPortServer, free_port, payg_units_today, setup_account, wait_empty

WAIT_S = 30.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- the state machine (pure)
def test_breaker_opens_after_failures_in_a_row_and_a_success_resets_the_count():
    """Two failures, a success, two failures: still closed; the third in a row opens it."""
    moves: list[tuple[str, str]] = []
    b = CircuitBreaker(failures_to_open=3, on_state_change=lambda o, n: moves.append((o, n)),
                       clock=FakeClock())
    for outcome in ("f", "f", "s", "f", "f"):
        b.failed("UNAVAILABLE") if outcome == "f" else b.succeeded()
    assert b.state == CLOSED and b.allow() and moves == []
    b.failed("DEADLINE_EXCEEDED")
    assert b.state == OPEN and not b.allow() and moves == [(CLOSED, OPEN)] and b.opened == 1


def test_breaker_half_open_lets_one_trial_through_and_its_outcome_decides():
    """Open -> probe answered -> half-open: exactly one caller gets the trial; a failed trial
    reopens, a successful one closes; each transition is reported once."""
    clock = FakeClock()
    moves: list[tuple[str, str]] = []
    b = CircuitBreaker(failures_to_open=1, on_state_change=lambda o, n: moves.append((o, n)),
                       clock=clock)
    b.unreachable("channel in TRANSIENT_FAILURE")
    b.unreachable("again")  # already open: no second report
    assert b.state == OPEN
    clock.now += 1
    b.probe_answered()
    assert b.state == HALF_OPEN and b.since == clock.now
    assert [b.allow() for _ in range(3)] == [True, False, False]
    b.failed("UNAVAILABLE")
    assert b.state == OPEN and not b.allow()
    b.probe_answered()
    assert b.allow()
    b.succeeded()
    assert b.state == CLOSED and all(b.allow() for _ in range(3))
    assert moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN),
                     (HALF_OPEN, CLOSED)]


def test_breaker_survives_a_callback_that_raises_and_refuses_a_bad_threshold():
    def boom(old: str, new: str) -> None:
        raise RuntimeError("caller's bug")

    b = CircuitBreaker(failures_to_open=1, on_state_change=boom)
    b.failed("UNAVAILABLE")
    assert b.state == OPEN
    with pytest.raises(ValueError, match="at least 1"):
        CircuitBreaker(failures_to_open=0)


def test_prober_backs_off_and_starts_over_when_answered():
    p = Prober(interval_min_s=0.05, interval_max_s=0.5)
    pauses = [p.next_pause_s(False) for _ in range(6)]
    assert pauses == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert p.next_pause_s(True) == 0.05


# ---------------------------------------------------------------- against real servers
@pytest.fixture
def srv(tmp_path: Path) -> Iterator[FixedPortServer]:
    s = FixedPortServer(tmp_path, free_port()).start()
    try:
        yield s
    finally:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.send_signal(signal.SIGCONT)
        s.stop()


def wait_for(predicate, timeout_s: float = WAIT_S) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def journal_request_ids(srv: FixedPortServer) -> list[str]:
    from ledger.store import consume_entries
    conn = srv.read_conn()
    try:
        return [request_id for _, _, _, request_id, _ in consume_entries(conn)]
    finally:
        conn.close()


def test_budget_on_a_hung_ledger_spools_instead_of_waiting_the_deadline(
        srv: FixedPortServer, tmp_path: Path):
    """SIGSTOP: a consume() with a 0.2 s budget answers provisional, far before its 10 s
    timeout; after enough of them the breaker is open and the next one skips the network.
    SIGCONT: the breaker closes, and every request is in the journal exactly once."""
    setup_account(srv.target)
    moves: list[str] = []
    with LedgerClient(srv.target, spool_path=tmp_path / "spool.db", budget_s=0.2,
                      timeout_s=10.0, on_state_change=lambda o, n: moves.append(n)) as c:
        assert not c.consume("acme", request_id="before").provisional
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        hung = [c.consume("acme", request_id=f"hung-{i}") for i in range(5)]
        assert all(a.provisional for a in hung)
        assert time.monotonic() - started < 5.0, "waited for the deadline, not the budget"
        assert c.breaker is not None and c.breaker.state == OPEN and moves[0] == OPEN
        srv.proc.send_signal(signal.SIGCONT)
        assert wait_for(lambda: c.breaker.state == CLOSED), moves
        assert wait_for(lambda: Spool(tmp_path / "spool.db").status().pending == 0)
    ids = journal_request_ids(srv)
    assert sorted(ids) == sorted(["before", *[f"hung-{i}" for i in range(5)]]), ids


def test_a_request_applied_after_its_budget_is_replayed_once(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    """Every commit stalls 0.6 s (a fault point): the client gives up at its 0.2 s budget and
    spools; the ledger still commits it; the replay comes back `replayed` (R12). One unit
    charged, one journal entry."""
    monkeypatch.setenv(FAULT_ENV, "before_commit:1:1:0.6")
    srv = FixedPortServer(tmp_path, free_port()).start()
    try:
        setup_account(srv.target)
        path = tmp_path / "spool.db"
        with LedgerClient(srv.target, spool_path=path, budget_s=0.2) as c:
            answer = c.consume("acme", request_id="late-1")
            assert answer.provisional
            spool = wait_empty(path)
            assert spool.status().pending == 0 and spool.status().refused == 0
            assert c.replayer is not None and c.replayer.state.totals.replayed == 1
        assert journal_request_ids(srv) == ["late-1"]
        assert payg_units_today(srv.target, "acme") == 1
    finally:
        srv.stop()


def test_queries_fail_fast_while_the_breaker_is_open(srv: FixedPortServer, tmp_path: Path):
    """Ledger down, breaker open: get_remaining raises UNAVAILABLE / LEDGER_UNREACHABLE at
    once (no network attempt, no deadline spent) and is never spooled."""
    setup_account(srv.target)
    with LedgerClient(srv.target, spool_path=tmp_path / "spool.db", timeout_s=10.0) as c:
        srv.kill()
        assert wait_for(lambda: c.consume("acme").provisional and c.breaker.state == OPEN)
        started = time.monotonic()
        with pytest.raises(LedgerError) as err:
            c.get_remaining("acme")
        assert time.monotonic() - started < 1.0
        assert err.value.code is grpc.StatusCode.UNAVAILABLE
        assert err.value.reason == UNREACHABLE_REASON
    assert all(r["request_id"] != "" for r in Spool(tmp_path / "spool.db").db["pending"].rows)


def test_without_a_spool_the_budget_does_not_apply_and_calls_raise(srv: FixedPortServer):
    """No spool: no breaker, no budget; a consume() against a dead ledger raises UNAVAILABLE
    after its retries, as before issue 21."""
    setup_account(srv.target)
    with LedgerClient(srv.target, retries=1, timeout_s=2.0) as c:
        assert c.breaker is None
        srv.kill()
        with pytest.raises(LedgerError) as err:
            c.consume("acme")
        assert err.value.code is grpc.StatusCode.UNAVAILABLE


def test_many_threads_share_one_breaker(srv: FixedPortServer, tmp_path: Path):
    """16 threads consume through a kill and a restart: the breaker opens once for all of
    them, closes after the restart, and every request is in the journal exactly once."""
    setup_account(srv.target)
    path = tmp_path / "spool.db"
    moves: list[str] = []
    lock = threading.Lock()
    with LedgerClient(srv.target, spool_path=path,
                      on_state_change=lambda o, n: moves.append(n)) as c:
        stop = threading.Event()
        sent: list[str] = []

        def caller(n: int) -> None:
            for i in range(1_000):
                if stop.is_set():
                    return
                rid = f"t{n}-{i}"
                c.consume("acme", request_id=rid)
                with lock:
                    sent.append(rid)
                time.sleep(0.005)

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        srv.kill()
        assert wait_for(lambda: c.breaker.state == OPEN)
        time.sleep(0.3)
        srv.start()
        assert wait_for(lambda: c.breaker.state == CLOSED)
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(WAIT_S)
        assert wait_for(lambda: Spool(path).status().pending == 0)
        assert c.breaker.opened == 1 and moves.count(OPEN) == 1, moves
    ids = journal_request_ids(srv)
    assert len(ids) == len(set(ids)) and set(ids) == set(sent), (len(ids), len(sent))


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "unary"])
def test_async_client_fails_open_and_drains(srv: FixedPortServer, tmp_path: Path,
                                            batching: bool):
    """AsyncLedgerClient: 64 concurrent consume() calls while the ledger is down all answer
    provisional (a failed coalesced batch spools each of its requests; an open breaker skips
    batching); after the restart the breaker closes and the spool drains, once each."""
    setup_account(srv.target)
    path = tmp_path / "spool.db"

    async def run() -> None:
        async with AsyncLedgerClient(srv.target, spool_path=path, batching=batching) as c:
            assert not (await c.consume("acme", request_id="up")).provisional
            srv.kill()
            down = await asyncio.gather(*(c.consume("acme", request_id=f"a-{i}")
                                          for i in range(64)))
            assert all(a.provisional for a in down)
            assert c.breaker is not None and c.breaker.state == OPEN
            more = await asyncio.gather(*(c.consume("acme", request_id=f"b-{i}")
                                          for i in range(16)))
            assert all(a.provisional for a in more)
            srv.start()
            deadline = time.monotonic() + WAIT_S
            while (c.breaker.state != CLOSED or Spool(path).status().pending) and \
                    time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert c.breaker.state == CLOSED and Spool(path).status().pending == 0

    asyncio.run(run())
    ids = journal_request_ids(srv)
    expected = {"up", *[f"a-{i}" for i in range(64)], *[f"b-{i}" for i in range(16)]}
    assert len(ids) == len(expected) and set(ids) == expected


def test_spool_status_shows_the_breaker(srv: FixedPortServer, tmp_path: Path):
    """`ledgerctl spool status` lists the client process's breaker state."""
    from click.testing import CliRunner

    from clients.ledgerctl import main as ledgerctl

    setup_account(srv.target)
    path = tmp_path / "spool.db"
    with LedgerClient(srv.target, spool_path=path) as c:
        srv.kill()
        assert wait_for(lambda: c.consume("acme").provisional and c.breaker.state == OPEN)
        out = CliRunner().invoke(ledgerctl, ["spool", "status", "--spool", str(path),
                                             "--json"])
    assert out.exit_code == 0, out.output
    import json
    breakers = json.loads(out.output)["breakers"]
    assert breakers and breakers[0]["state"] == OPEN and breakers[0]["alive"] is True
