"""Hostile input over the wire: malformed, extreme and abusive requests against a real server.

One server serves the whole module (a module-scoped fixture); hypothesis (strategies in
tests/hostile_strategies.py) drives every RPC of QuotaLedger, Accounts, Settlement and TestClock
through raw generated stubs on one channel. For every call the harness (tests/hostile_wire.py)
checks the status code against the CONTRACT, the ``google.rpc.ErrorInfo`` of a refusal, and
that the journal changes by exactly what an accepted request accounts for (R11, R25).

The last test checks that the server still answers a health check, that its log holds no
Traceback and that the module sent at least ``REQUESTS_MIN`` generated requests.

Regressions of bugs this suite found are pinned at the end, each on its own server.
"""

from __future__ import annotations

import os
import queue
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from quota_ledger.v1 import accounts_pb2 as apb
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import settlement_pb2 as spb
from quota_ledger.v1 import test_clock_pb2 as tpb

from .conftest import T0, ServerProcess
from .hostile_strategies import (
    CLOCK_CALLS,
    DAY_FIELD_TARGETS,
    OVERSIZE_TARGETS,
    account_rounds,
    batch_sizes,
    clock_request,
    consume_requests,
    query_rounds,
)
from .hostile_wire import (
    AMOUNT_MICROS_MAX,
    BATCH_SIZE_MAX,
    CALL_TIMEOUT_S,
    INT64_MAX,
    KNOWN_ACCOUNTS,
    MESSAGE_BYTES_MAX,
    US,
    C,
    Wire,
    _error_info,
    _unary,
    check_results,
    consume_well_formed,
    new_entry,
)

TOP_UP_WAVE = 400  # in-flight calls on one channel (over ~1,000, grpc cancels some)
REQUESTS_MIN = 5_000  # generated requests the module must send per run


# Derandomized, so a run is repeatable and bounded in time; HOSTILE_RANDOM=1 hunts afresh.
HOSTILE = settings(
    deadline=None, database=None, derandomize=os.environ.get("HOSTILE_RANDOM") != "1",
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


@pytest.fixture(scope="module")
def wire(tmp_path_factory: pytest.TempPathFactory, module_db: str) -> Iterator[Wire]:
    srv = ServerProcess(tmp_path_factory.mktemp("hostile"), db=module_db).start()
    w = Wire(srv)
    try:
        t0 = Timestamp()
        t0.FromDatetime(T0)
        w.now_us = _unary(w, "SetTime", tpb.SetTimeRequest(now=t0)).now.ToMicroseconds()
        for a in KNOWN_ACCOUNTS:
            _unary(w, "CreateAccount", apb.CreateAccountRequest(account_id=a, display_name=a))
        _unary(w, "TopUp", apb.TopUpRequest(account_id="acme", request_id="seed-cash", kind=1,
                                            amount_micros=10**13))
        _unary(w, "TopUp", apb.TopUpRequest(account_id="acme-2", request_id="seed-v", kind=2,
                                            amount_micros=10**9))
        _unary(w, "PurchasePlan", apb.PurchasePlanRequest(account_id="acme",
                                                          request_id="seed-plan",
                                                          spec_id="month-100k"))
        _unary(w, "UpdateFeatures", apb.UpdateFeaturesRequest(
            account_id="acme-2", request_id="seed-f", scenario_ids=[f"s{i}" for i in range(5)],
            custom_policy_enabled=True))
        yield w
    finally:
        w.close()
        srv.stop()


# ---------------------------------------------------------------------------- QuotaLedger


@settings(HOSTILE, max_examples=600)
@given(req=consume_requests())
def test_r12_consume_hostile_retried_and_batched(wire: Wire, req: qpb.ConsumeRequest) -> None:
    """R5/R11/R12: any Consume gets a contract answer; its retry and 1-item batch agree."""
    well = consume_well_formed(req)
    first = wire.call("Consume", req, well_formed=well)
    if not well:
        assert first.code is C.INVALID_ARGUMENT, first
    second = wire.call("Consume", req, well_formed=well)
    assert second.code is first.code, (first, second)
    if first.code is C.OK and new_entry(req, first.resp):
        r1, r2 = first.resp, second.resp
        assert r2.replayed and r2.journal_seq == r1.journal_seq, (r1, r2)
        assert (r2.allocations, r2.payg_units, r2.recorded_at, r2.billing_day) == (
            r1.allocations, r1.payg_units, r1.recorded_at, r1.billing_day)
        assert (req.account_id, req.request_id) in wire.keys_at(r1.journal_seq)
    batch = wire.call("ConsumeBatch", qpb.ConsumeBatchRequest(requests=[req]))
    assert batch.code is C.OK, batch
    (item,) = batch.resp.results
    if second.code is C.OK:
        assert item.WhichOneof("outcome") == "response" and item.response == second.resp, item
    else:
        assert item.WhichOneof("outcome") == "error", item
        assert (item.error.code, item.error.reason) == (second.code.value[0], second.reason)


@settings(HOSTILE, max_examples=150)
@given(items=st.lists(consume_requests(short=True), min_size=1, max_size=6),
       size=batch_sizes, unique_keys=st.booleans())
def test_r11_consume_batch_hostile(wire: Wire, items: list[qpb.ConsumeRequest], size: int,
                               unique_keys: bool) -> None:
    """ConsumeBatch of any size: one result per item in order, each bad item failing alone."""
    reqs = []
    for i in range(size):
        r = qpb.ConsumeRequest()
        r.CopyFrom(items[i % len(items)])
        if unique_keys:
            r.request_id = f"{r.request_id}#{i}"
        reqs.append(r)
    batch = qpb.ConsumeBatchRequest(requests=reqs)
    wire.items += size
    ans = wire.call("ConsumeBatch", batch, well_formed=False if size > BATCH_SIZE_MAX else None)
    if size > BATCH_SIZE_MAX:
        assert ans.code in (C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED), ans
        return
    if batch.ByteSize() > MESSAGE_BYTES_MAX:
        assert ans.code is C.RESOURCE_EXHAUSTED, ans
        return
    assert ans.code is C.OK, ans
    check_results(wire, reqs, list(ans.resp.results), complete=True)


# ---------------------------------------------------------------------------- ConsumeStream


def _feed(q: queue.Queue[qpb.ConsumeRequest | None]) -> Iterator[qpb.ConsumeRequest]:
    while (item := q.get()) is not None:
        yield item


@settings(HOSTILE, max_examples=100)
@given(items=st.lists(consume_requests(short=True), min_size=1, max_size=5),
       size=st.one_of(st.integers(0, 20), st.integers(200, 2_000)),
       mode=st.sampled_from(["all", "all", "cancel", "half-close-empty", "cancel-empty"]),
       read_before_cancel=st.integers(0, 30), unique_keys=st.booleans())
def test_r11_consume_stream_abuse(wire: Wire, items: list[qpb.ConsumeRequest], size: int, mode: str,
                              read_before_cancel: int, unique_keys: bool) -> None:
    """R11: ConsumeStream abuse (bad items, cancel, empty half-close) loses and adds nothing."""
    reqs = []
    for i in range(0 if mode.endswith("empty") else size):
        r = qpb.ConsumeRequest()
        r.CopyFrom(items[i % len(items)])
        if unique_keys:
            r.request_id = f"{r.request_id}~{i}"
        reqs.append(r)
    wire.sent["ConsumeStream"] += 1
    wire.items += len(reqs)
    before = wire.journal()
    q: queue.Queue[qpb.ConsumeRequest | None] = queue.Queue()
    for r in reqs:
        q.put(r)
    if mode in ("all", "half-close-empty"):
        q.put(None)  # half-close after the last request (at once when there is none)
    call = wire.ql.ConsumeStream(_feed(q), timeout=CALL_TIMEOUT_S)
    got: list[qpb.ConsumeResult] = []
    status = C.OK
    try:
        if mode.startswith("cancel"):
            for _ in range(min(read_before_cancel, len(reqs))):
                got.append(next(call))
            call.cancel()
        for res in call:
            got.append(res)
    except grpc.RpcError as err:
        status = err.code()
    finally:
        q.put(None)  # let grpc's request-consuming thread finish
    if mode.startswith("cancel"):
        assert status in (C.CANCELLED, C.OK), status  # CANCELLED is the client's own doing
        wire.quiesce()  # whatever the server had already taken commits now
    else:
        assert status is C.OK, status
    new = check_results(wire, reqs, got, complete=not mode.startswith("cancel"))
    after = wire.journal()
    if mode.startswith("cancel"):
        sent_new_max = sum(consume_well_formed(r) and not r.dry_run for r in reqs)
        assert new <= after - before <= sent_new_max, (before, after, new, sent_new_max)
    else:
        assert after - before == new, (before, after, new)


# ---------------------------------------------------------------------------- Accounts


@settings(HOSTILE, max_examples=350)
@given(calls=account_rounds())
def test_r25_accounts_hostile(wire: Wire, calls: list[tuple[str, Any, bool | None]]) -> None:
    """Every Accounts RPC, hostile fields: contract statuses; malformed input never journaled."""
    for name, req, well in calls:
        if name == "RefundPlan" and req.plan_id == "@latest":  # the newest plan, refundable
            req.plan_id = wire.latest_plan()
        wire.call(name, req, well_formed=well)


# ---------------------------------------------------------------------------- queries, Settlement


@settings(HOSTILE, max_examples=350)
@given(calls=query_rounds())
def test_r25_queries_and_settlement_hostile(wire: Wire,
                                        calls: list[tuple[str, Any, bool | None]]) -> None:
    """Queries and Settlement, hostile ids and days: contract statuses; only settling writes."""
    for name, req, well in calls:
        wire.call(name, req, well_formed=well)


# ---------------------------------------------------------------------------- TestClock


@settings(HOSTILE, max_examples=300)
@given(c=CLOCK_CALLS)
@example(c=("SetTime", "abs", (253_402_300_800, 0)))  # 10000-01-01: past Timestamp's range
@example(c=("SetTime", "abs", (253_402_041_600, 0)))  # 9999-12-30: ~2.9M days to settle
@example(c=("SetTime", "abs", (-62_135_596_801, 0)))  # before 0001-01-01
@example(c=("SetTime", "bad-nanos", 2_000_000_000))
@example(c=("SetTime", "bad-nanos", -1))
@example(c=("AdvanceTime", "secs", INT64_MAX))
def test_r2_test_clock_hostile(wire: Wire, c: tuple[str, str, Any]) -> None:
    """R2: hostile TestClock calls are refused or land exactly; time never goes backwards."""
    which, kind, arg = c
    before = wire.now_us
    req, refused = clock_request(which, kind, arg, before)
    ans = wire.call(which, req, well_formed=not refused)
    if refused:
        assert ans.code is C.INVALID_ARGUMENT, ans
    else:
        assert ans.code is C.OK, ans
        now = ans.resp.now.ToMicroseconds()
        assert now >= before, "the ledger's time went backwards (R2)"
        if which == "SetTime":
            assert now == req.now.ToMicroseconds()
        else:
            assert now == before + req.seconds * US
        wire.now_us = now
    got = wire.call("GetTime", tpb.GetTimeRequest())
    assert got.code is C.OK and got.resp.now.ToMicroseconds() == wire.now_us, got


# ---------------------------------------------------------------------------- oversized messages


@settings(HOSTILE, max_examples=40)
@given(name=st.sampled_from(sorted(OVERSIZE_TARGETS)),
       size=st.one_of(st.sampled_from([MESSAGE_BYTES_MAX - 64, MESSAGE_BYTES_MAX,
                                       MESSAGE_BYTES_MAX + 1, 2 * MESSAGE_BYTES_MAX]),
                      st.integers(MESSAGE_BYTES_MAX - 256, MESSAGE_BYTES_MAX + 256)),
       fill=st.sampled_from(["x", "é", "\x00"]))
def test_oversized_messages(wire: Wire, name: str, size: int, fill: str) -> None:
    """Over 4 MiB: grpc's own RESOURCE_EXHAUSTED; just under: the server's own refusal."""
    if name in DAY_FIELD_TARGETS:
        size = max(size, MESSAGE_BYTES_MAX + 16)
    s = fill * (size // len(fill.encode()))
    req = OVERSIZE_TARGETS[name](s)
    ans = wire.call(name, req, well_formed=None if name == "ConsumeBatch" else False)
    if req.ByteSize() > MESSAGE_BYTES_MAX:
        assert ans.code is C.RESOURCE_EXHAUSTED, ans
    elif name == "ConsumeBatch":  # refused item by item: both fields are far too long
        assert ans.code is C.OK, ans
        assert all(r.WhichOneof("outcome") == "error" for r in ans.resp.results), ans


# ---------------------------------------------------------------------------- the server lives on


def test_r25_server_survives_every_hostile_request(wire: Wire, request: pytest.FixtureRequest
                                               ) -> None:
    """The server outlives every hostile request: healthy, no Traceback, no journal gap."""
    with grpc.insecure_channel(wire.srv.target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                     timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert wire.srv.proc is not None and wire.srv.proc.poll() is None, "the server died"
    log = Path(wire.srv.tmp / "server.log").read_text(errors="replace")
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 500):][:4_000]
    wire.journal()  # opens the read-only view
    assert wire.db is not None
    count, top = wire.db.execute("SELECT count(*), coalesce(max(seq), 0) FROM journal").fetchone()
    assert count == top, "the journal has gaps (R25)"
    total = sum(wire.sent.values())
    print(f"\nhostile requests sent: {total:,} ({dict(wire.sent)}); batch/stream items: "
          f"{wire.items:,}; journal entries: {count:,}")
    ran = {i.name for i in request.session.items if i.module is request.module}
    if ran >= set(_GENERATOR_TESTS):  # the whole generated suite ran
        assert total >= REQUESTS_MIN, f"only {total:,} requests sent"


_GENERATOR_TESTS = (
    "test_r12_consume_hostile_retried_and_batched", "test_r11_consume_batch_hostile",
    "test_r11_consume_stream_abuse", "test_r25_accounts_hostile",
    "test_r25_queries_and_settlement_hostile", "test_r2_test_clock_hostile",
    "test_oversized_messages")


# ---------------------------------------------------------------------------- known bugs
# Each on its own server (conftest's `server` fixture): these leave a server broken or busy.


def _code_and_reason(fn: Callable[[], Any]) -> tuple[grpc.StatusCode, str | None]:
    try:
        fn()
    except grpc.RpcError as err:
        info = _error_info(err)
        return err.code(), info.reason if info else None
    return C.OK, None


def test_r17_settle_last_calendar_day_is_day_not_ended(server: ServerProcess) -> None:
    """R17: SettleDay("9999-12-31") is refused DAY_NOT_ENDED, with no Traceback."""
    w = Wire(server)
    try:
        code, reason = _code_and_reason(lambda: w.bill.SettleDay(
            spb.SettleDayRequest(billing_day="9999-12-31"), timeout=10))
        log = (server.tmp / "server.log").read_text()
        assert (code, reason, "Traceback" in log) == (C.FAILED_PRECONDITION, "DAY_NOT_ENDED",
                                                      False)
    finally:
        w.close()


def test_long_billing_day_is_not_echoed_whole(server: ServerProcess) -> None:
    """An 8,000-character billing day gets an INVALID_ARGUMENT a client can read."""
    w = Wire(server)
    try:
        code, reason = _code_and_reason(lambda: w.bill.SettleDay(
            spb.SettleDayRequest(billing_day="x" * 8_000), timeout=10))
        assert (code, reason) == (C.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    finally:
        w.close()


def test_top_up_balance_overflow_is_refused(server: ServerProcess) -> None:
    """TopUps past int64 are refused with a contract code, never UNAVAILABLE/INTERNAL."""
    w = Wire(server)
    try:
        w.acc.CreateAccount(apb.CreateAccountRequest(account_id="rich"), timeout=10)
        codes: Counter[tuple[str, str | None]] = Counter()
        n = INT64_MAX // AMOUNT_MICROS_MAX + 2  # enough to pass int64 by one top-up
        for wave in range(0, n, TOP_UP_WAVE):  # concurrent, so the writer groups them
            futures = [w.acc.TopUp.future(apb.TopUpRequest(
                account_id="rich", request_id=f"t{i}", kind=1, amount_micros=AMOUNT_MICROS_MAX),
                timeout=60) for i in range(wave, min(n, wave + TOP_UP_WAVE))]
            for f in futures:
                try:
                    f.result()
                    codes[("OK", None)] += 1
                except grpc.RpcError as err:
                    info = _error_info(err)
                    codes[(err.code().name, info.reason if info else None)] += 1
        bad = {k: v for k, v in codes.items()
               if k[0] not in ("OK", "FAILED_PRECONDITION", "INVALID_ARGUMENT")}
        log = (server.tmp / "server.log").read_text()
        assert not bad and "Traceback" not in log, bad
    finally:
        w.close()
