"""The ledger's time never goes backwards (R2): in the clocks themselves, over the wire, and
across restarts, with the test clock and with the system clock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from quota_ledger.v1 import accounts_pb2 as apb
from quota_ledger.v1 import accounts_pb2_grpc as apb_grpc
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import quota_ledger_pb2_grpc as qpb_grpc
from quota_ledger.v1 import test_clock_pb2 as tpb
from quota_ledger.v1 import test_clock_pb2_grpc as tpb_grpc

from ledger import clock as clock_mod
from ledger.clock import SystemClock, TestClock
from ledger.errors import InvalidArgument

from .conftest import T0, ServerProcess

US = 1_000_000
TIMEOUT_S = 10.0
# Ahead of the host's wall clock (like conftest's T0), and within the test clock's 3-year step.
FUTURE = datetime(2029, 6, 15, 12, 0, tzinfo=UTC)
LATER = T0 + timedelta(days=40)


def ts(dt: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(dt)
    return t


class Stubs:
    def __init__(self, srv: ServerProcess) -> None:
        self.channel = grpc.insecure_channel(srv.target)
        self.clock = tpb_grpc.TestClockStub(self.channel)
        self.ql = qpb_grpc.QuotaLedgerStub(self.channel)
        self.acc = apb_grpc.AccountsStub(self.channel)

    def now_us(self) -> int:
        return self.clock.GetTime(tpb.GetTimeRequest(), timeout=TIMEOUT_S).now.ToMicroseconds()

    def consume(self, request_id: str) -> qpb.ConsumeResponse:
        return self.ql.Consume(qpb.ConsumeRequest(
            account_id="acme", request_id=request_id, region=1, captcha_type=1,
            architecture=1, step=1), timeout=TIMEOUT_S)

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def stubs(server: ServerProcess) -> Iterator[Stubs]:
    s = Stubs(server)
    try:
        yield s
    finally:
        s.close()


def newest_entry_us(srv: ServerProcess) -> int:
    conn = srv.read_conn()
    try:
        return conn.execute("SELECT max(at_us) FROM journal").fetchone()[0]
    finally:
        conn.close()


# ---------------------------------------------------------------------------- the clocks


def test_r2_system_clock_holds_when_the_host_clock_steps_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """R2: SystemClock never goes backwards when the host clock steps back."""
    base = 1_900_000_000 * 10**9
    readings = iter([base, base - 10**9, base - 3_600 * 10**9, base + 1_000, base + 1_000,
                     base - 1, base + 2 * 10**9, 0, base + 3 * 10**9])
    monkeypatch.setattr(clock_mod.time, "time_ns", lambda: next(readings))
    clock = SystemClock()
    seen = [clock.now_us() for _ in range(9)]
    assert seen == sorted(seen), seen
    assert seen[0] == base // 1_000 and seen[-1] == (base + 3 * 10**9) // 1_000


def test_r2_system_clock_starts_no_earlier_than_its_floor(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """R2: a floored SystemClock reads no earlier than its floor, then follows the host."""
    host = [1_800_000_000 * 10**9]  # the host is years behind the journal
    monkeypatch.setattr(clock_mod.time, "time_ns", lambda: host[0])
    clock = SystemClock()
    floor_us = 1_900_000_000 * US
    clock.floor(floor_us)
    clock.floor(floor_us - 5 * US)  # a lower floor changes nothing
    assert clock.now_us() == floor_us
    host[0] = (floor_us - 1) * 1_000  # catching up, still behind: holds
    assert clock.now_us() == floor_us
    host[0] = (floor_us + 7 * US) * 1_000  # past the floor: follows the host
    assert clock.now_us() == floor_us + 7 * US


def test_r2_test_clock_set_backwards_is_refused() -> None:
    """R2: TestClock.set to an earlier instant raises InvalidArgument and keeps its time."""
    clock = TestClock(1_900_000_000 * US)
    with pytest.raises(InvalidArgument):
        clock.set(1_900_000_000 * US - 1)
    assert clock.now_us() == 1_900_000_000 * US
    clock.set(1_900_000_000 * US)
    clock.set(1_900_000_001 * US)
    clock.floor(0)  # flooring lower never moves it back
    assert clock.now_us() == 1_900_000_001 * US


# ---------------------------------------------------------------------------- over the wire


def test_r2_set_time_earlier_is_invalid_argument_and_time_stays(stubs: Stubs) -> None:
    """R2: SetTime earlier, AdvanceTime negative: INVALID_ARGUMENT, GetTime unchanged."""
    stubs.clock.SetTime(tpb.SetTimeRequest(now=ts(T0)), timeout=TIMEOUT_S)
    before = stubs.now_us()
    earlier = [before - 1, before - 3 * 365 * 86_400 * US]
    for t_us in earlier:
        back = Timestamp(seconds=t_us // US, nanos=t_us % US * 1_000)
        with pytest.raises(grpc.RpcError) as refused:
            stubs.clock.SetTime(tpb.SetTimeRequest(now=back), timeout=TIMEOUT_S)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(refused.value)
        assert status is not None and any(
            d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) for d in status.details)
        assert stubs.now_us() == before
    with pytest.raises(grpc.RpcError) as refused:
        stubs.clock.AdvanceTime(tpb.AdvanceTimeRequest(seconds=-1), timeout=TIMEOUT_S)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert stubs.now_us() == before


# ---------------------------------------------------------------------------- restarts


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_r2_test_clock_resumes_after_restart(tmp_path: Path, how: str, db: str) -> None:
    """R2: a --test-clock server restarted (stopped or killed) resumes no earlier."""
    srv = ServerProcess(tmp_path, db=db).start()
    try:
        s = Stubs(srv)
        s.clock.SetTime(tpb.SetTimeRequest(now=ts(T0)), timeout=TIMEOUT_S)
        s.acc.CreateAccount(apb.CreateAccountRequest(account_id="acme"), timeout=TIMEOUT_S)
        s.consume("before-restart")
        s.clock.SetTime(tpb.SetTimeRequest(now=ts(LATER)), timeout=TIMEOUT_S)
        s.clock.AdvanceTime(tpb.AdvanceTimeRequest(seconds=90), timeout=TIMEOUT_S)
        before = s.now_us()
        s.close()
        if how == "kill":
            srv.kill()
        else:
            assert srv.stop() == 0
        srv.start()
        s = Stubs(srv)
        after = s.now_us()
        assert after >= before, f"restart moved the clock back by {(before - after) / US} s"
        r = s.consume("after-restart")
        assert r.recorded_at.ToMicroseconds() >= before
        s.close()
    finally:
        srv.stop()


def test_r2_system_clock_floors_at_the_newest_journal_entry(tmp_path: Path, db: str) -> None:
    """R2: a system-clock server floors at the journal's newest (future) entry on restart."""
    srv = ServerProcess(tmp_path, db=db).start()
    try:
        s = Stubs(srv)
        s.clock.SetTime(tpb.SetTimeRequest(now=ts(T0)), timeout=TIMEOUT_S)
        s.clock.SetTime(tpb.SetTimeRequest(now=ts(FUTURE)), timeout=TIMEOUT_S)
        s.acc.CreateAccount(apb.CreateAccountRequest(account_id="acme"), timeout=TIMEOUT_S)
        s.consume("in-2030")
        s.close()
        assert srv.stop() == 0
    finally:
        srv.stop()
    newest = newest_entry_us(srv)
    assert newest >= int(FUTURE.timestamp()) * US, "the test clock did not stamp 2029"

    wall = ServerProcess(tmp_path, test_clock=False, db=db).start()
    try:
        s = Stubs(wall)
        r = s.consume("on-the-system-clock")
        assert r.billable and not r.replayed
        assert r.recorded_at.ToMicroseconds() >= newest, (
            "the system clock recorded an entry earlier than the journal's newest one")
        again = s.consume("on-the-system-clock-2")
        assert again.recorded_at.ToMicroseconds() >= r.recorded_at.ToMicroseconds()
        with pytest.raises(grpc.RpcError) as no_test_clock:  # served only with --test-clock
            s.clock.GetTime(tpb.GetTimeRequest(), timeout=TIMEOUT_S)
        assert no_test_clock.value.code() is grpc.StatusCode.UNIMPLEMENTED
        s.close()
    finally:
        wall.stop()
    conn = wall.read_conn()
    try:
        ats = [a for (a,) in conn.execute("SELECT at_us FROM journal ORDER BY seq", ())]
    finally:
        conn.close()
    assert ats == sorted(ats), "journal time went backwards across the restart (R2, R25)"
