"""Malformed input over raw gRPC stubs: exact status, readable message, ErrorInfo, no change.

The requests are built with the generated stubs (not the client library), so nothing is
validated before it reaches the server.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from quota_ledger.v1 import accounts_pb2 as apb
from quota_ledger.v1 import accounts_pb2_grpc as apb_grpc
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import quota_ledger_pb2_grpc as qpb_grpc
from quota_ledger.v1 import settlement_pb2 as spb
from quota_ledger.v1 import settlement_pb2_grpc as spb_grpc
from quota_ledger.v1 import test_clock_pb2 as tpb
from quota_ledger.v1 import test_clock_pb2_grpc as tpb_grpc

from .conftest import T0, ServerProcess, make_account

C = grpc.StatusCode
UPPER_SNAKE = re.compile(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*")
CALL_TIMEOUT_S = 10.0
ACCOUNT = "acme"


def ts(dt) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(dt)
    return t


def consume(**overrides: Any) -> qpb.ConsumeRequest:
    """A valid Consume for the shared account; each case spoils one field."""
    fields: dict[str, Any] = dict(account_id=ACCOUNT, request_id="bad-input-1", region=1,
                                  captcha_type=1, architecture=1, step=1, quantity=1)
    fields.update(overrides)
    return qpb.ConsumeRequest(**fields)


def top_up(**overrides: Any) -> apb.TopUpRequest:
    fields: dict[str, Any] = dict(account_id=ACCOUNT, request_id="bad-topup-1", kind=1,
                                  amount_micros=1_000_000)
    fields.update(overrides)
    return apb.TopUpRequest(**fields)


def purchase(**overrides: Any) -> apb.PurchasePlanRequest:
    fields: dict[str, Any] = dict(account_id=ACCOUNT, request_id="bad-buy-1",
                                  spec_id="month-100k")
    fields.update(overrides)
    return apb.PurchasePlanRequest(**fields)


def usage(from_day: str, to_day: str, account_id: str = ACCOUNT) -> qpb.GetUsageRequest:
    return qpb.GetUsageRequest(account_id=account_id, from_day=from_day, to_day=to_day)


def features(scenario_ids: list[str], request_id: str = "bad-feat-1"
             ) -> apb.UpdateFeaturesRequest:
    return apb.UpdateFeaturesRequest(account_id=ACCOUNT, request_id=request_id,
                                     scenario_ids=scenario_ids, custom_policy_enabled=False)


@dataclass(frozen=True)
class Case:
    id: str
    stub: str  # ledger | accounts | settlement | clock
    method: str
    request: Callable[[], Any]
    code: grpc.StatusCode
    words: tuple[str, ...]  # the message must mention at least one of these
    reason: str | None = None  # only where the contract names the reason
    marks: tuple = field(default=())


def _bad_consumes() -> list[Case]:
    cases = [
        Case("consume-request_id-empty", "ledger", "Consume", lambda: consume(request_id=""),
             C.INVALID_ARGUMENT, ("request_id",)),
        Case("consume-request_id-129", "ledger", "Consume",
             lambda: consume(request_id="r" * 129), C.INVALID_ARGUMENT, ("request_id",)),
        Case("consume-request_id-control-char", "ledger", "Consume",
             lambda: consume(request_id="abc\x01def"), C.INVALID_ARGUMENT, ("request_id",)),
        Case("consume-request_id-newline", "ledger", "Consume",
             lambda: consume(request_id="abc\n"), C.INVALID_ARGUMENT, ("request_id",)),
        Case("consume-request_id-del", "ledger", "Consume",
             lambda: consume(request_id="abc\x7f"), C.INVALID_ARGUMENT, ("request_id",)),
        Case("consume-request_id-non-ascii", "ledger", "Consume",
             lambda: consume(request_id="r\u00e9quete"), C.INVALID_ARGUMENT, ("request_id",)),
        Case("consume-account_id-empty", "ledger", "Consume", lambda: consume(account_id=""),
             C.INVALID_ARGUMENT, ("account_id",)),
        Case("consume-account_id-over-long", "ledger", "Consume",
             lambda: consume(account_id="a" * 1_000), C.INVALID_ARGUMENT, ("account_id",)),
        Case("consume-account_id-control-char", "ledger", "Consume",
             lambda: consume(account_id="ac\x00me"), C.INVALID_ARGUMENT, ("account_id",)),
        Case("consume-scenario_id-over-long", "ledger", "Consume",
             lambda: consume(scenario_id="s" * 1_000), C.INVALID_ARGUMENT, ("scenario_id",)),
        Case("consume-quantity-negative", "ledger", "Consume", lambda: consume(quantity=-1),
             C.INVALID_ARGUMENT, ("quantity",)),
        Case("consume-quantity-1000001", "ledger", "Consume",
             lambda: consume(quantity=1_000_001), C.INVALID_ARGUMENT, ("quantity",)),
        Case("consume-quantity-huge", "ledger", "Consume", lambda: consume(quantity=2**62),
             C.INVALID_ARGUMENT, ("quantity",)),
        Case("consume-unknown-account", "ledger", "Consume",
             lambda: consume(account_id="ghost"), C.NOT_FOUND, ("ghost",)),
    ]
    for name in ("region", "captcha_type", "architecture", "step"):
        for value in (0, 99, -1):
            label = {0: "unspecified", 99: "99", -1: "minus-1"}[value]
            cases.append(Case(f"consume-{name}-{label}", "ledger", "Consume",
                              lambda n=name, v=value: consume(**{n: v}),
                              C.INVALID_ARGUMENT, (name,)))
    return cases


def _big_batch() -> qpb.ConsumeBatchRequest:
    return qpb.ConsumeBatchRequest(requests=[consume(request_id=f"big-{i}")
                                             for i in range(1_001)])


CASES: list[Case] = [
    *_bad_consumes(),
    Case("batch-of-1001", "ledger", "ConsumeBatch", _big_batch, C.INVALID_ARGUMENT,
         ("1,000", "1000", "batch")),
    # --- TopUp
    Case("topup-kind-unspecified", "accounts", "TopUp", lambda: top_up(kind=0),
         C.INVALID_ARGUMENT, ("kind",)),
    Case("topup-kind-99", "accounts", "TopUp", lambda: top_up(kind=99),
         C.INVALID_ARGUMENT, ("kind",)),
    Case("topup-amount-zero", "accounts", "TopUp", lambda: top_up(amount_micros=0),
         C.INVALID_ARGUMENT, ("amount",)),
    Case("topup-amount-negative", "accounts", "TopUp", lambda: top_up(amount_micros=-5),
         C.INVALID_ARGUMENT, ("amount",)),
    Case("topup-amount-over-10e15", "accounts", "TopUp",
         lambda: top_up(amount_micros=10**15 + 1), C.INVALID_ARGUMENT, ("amount",)),
    Case("topup-amount-int64-max", "accounts", "TopUp",
         lambda: top_up(amount_micros=2**63 - 1), C.INVALID_ARGUMENT, ("amount",)),
    Case("topup-request_id-empty", "accounts", "TopUp", lambda: top_up(request_id=""),
         C.INVALID_ARGUMENT, ("request_id",)),
    Case("topup-unknown-account", "accounts", "TopUp", lambda: top_up(account_id="ghost"),
         C.NOT_FOUND, ("ghost",)),
    # --- PurchasePlan
    Case("purchase-unknown-spec", "accounts", "PurchasePlan",
         lambda: purchase(spec_id="month-1"), C.NOT_FOUND, ("month-1",)),
    Case("purchase-spec_id-empty", "accounts", "PurchasePlan", lambda: purchase(spec_id=""),
         C.INVALID_ARGUMENT, ("spec_id",)),
    Case("purchase-request_id-129", "accounts", "PurchasePlan",
         lambda: purchase(request_id="p" * 129), C.INVALID_ARGUMENT, ("request_id",)),
    Case("purchase-unknown-account", "accounts", "PurchasePlan",
         lambda: purchase(account_id="ghost"), C.NOT_FOUND, ("ghost",)),
    # --- other account RPCs
    Case("create-account_id-empty", "accounts", "CreateAccount",
         lambda: apb.CreateAccountRequest(account_id=""), C.INVALID_ARGUMENT, ("account_id",)),
    Case("create-account_id-over-long", "accounts", "CreateAccount",
         lambda: apb.CreateAccountRequest(account_id="a" * 1_000), C.INVALID_ARGUMENT,
         ("account_id",)),
    Case("create-account_id-non-ascii", "accounts", "CreateAccount",
         lambda: apb.CreateAccountRequest(account_id="\u5ba2\u6237"), C.INVALID_ARGUMENT,
         ("account_id",)),
    Case("create-existing-account", "accounts", "CreateAccount",
         lambda: apb.CreateAccountRequest(account_id=ACCOUNT), C.ALREADY_EXISTS, (ACCOUNT,)),
    Case("get-account-unknown", "accounts", "GetAccount",
         lambda: apb.GetAccountRequest(account_id="ghost"), C.NOT_FOUND, ("ghost",)),
    Case("features-duplicate-scenario-ids", "accounts", "UpdateFeatures",
         lambda: features(["checkout", "login", "checkout"]), C.INVALID_ARGUMENT,
         ("scenario",)),
    Case("features-empty-scenario-id", "accounts", "UpdateFeatures",
         lambda: features(["login", ""]), C.INVALID_ARGUMENT, ("scenario",)),
    Case("features-request_id-empty", "accounts", "UpdateFeatures",
         lambda: features(["login"], request_id=""), C.INVALID_ARGUMENT, ("request_id",)),
    # --- queries
    Case("remaining-unknown-account", "ledger", "GetRemaining",
         lambda: qpb.GetRemainingRequest(account_id="ghost"), C.NOT_FOUND, ("ghost",)),
    Case("remaining-account_id-empty", "ledger", "GetRemaining",
         lambda: qpb.GetRemainingRequest(account_id=""), C.INVALID_ARGUMENT, ("account_id",)),
    Case("list-plans-unknown-account", "ledger", "ListPlans",
         lambda: qpb.ListPlansRequest(account_id="ghost"), C.NOT_FOUND, ("ghost",)),
    Case("usage-unknown-account", "ledger", "GetUsage",
         lambda: usage("2027-03-01", "2027-03-10", "ghost"), C.NOT_FOUND, ("ghost",)),
    Case("usage-from-after-to", "ledger", "GetUsage", lambda: usage("2027-03-11", "2027-03-10"),
         C.INVALID_ARGUMENT, ("from_day", "after", "before")),
    *[Case(f"usage-bad-day-{label}", "ledger", "GetUsage", lambda d=day: usage(d, "2027-03-10"),
           C.INVALID_ARGUMENT, ("day", "date"))
      for label, day in [("empty", ""), ("no-padding", "2027-3-10"), ("slashes", "2027/03/10"),
                         ("feb-30", "2027-02-30"), ("month-13", "2027-13-01"),
                         ("dmy", "10-03-2027"), ("with-time", "2027-03-10T00:00"),
                         ("word", "yesterday"), ("trailing-newline", "2027-03-10\n"),
                         ("arabic-digits", "\u0662\u0660\u0662\u0667-\u0660\u0663-\u0661\u0660")]],
    Case("usage-bad-to-day", "ledger", "GetUsage", lambda: usage("2027-03-01", "2027-03-32"),
         C.INVALID_ARGUMENT, ("day", "date")),
    Case("usage-range-over-366-days", "ledger", "GetUsage",
         lambda: usage("2026-01-01", "2027-03-10"), C.INVALID_ARGUMENT, ("366", "range")),
    Case("consume-client_timestamp-bad-nanos", "ledger", "Consume",
         lambda: consume(request_id="ts-case", client_timestamp=Timestamp(
             seconds=1_804_672_800, nanos=-1)), C.INVALID_ARGUMENT,
         ("client_timestamp", "nanos", "timestamp")),
    # --- refunds and reactivation
    Case("refund-unknown-plan", "accounts", "RefundPlan",
         lambda: apb.RefundPlanRequest(plan_id="plan-999999", request_id="rf-1"), C.NOT_FOUND,
         ("plan-999999",)),
    Case("refund-request_id-empty", "accounts", "RefundPlan",
         lambda: apb.RefundPlanRequest(plan_id="plan-1", request_id=""), C.INVALID_ARGUMENT,
         ("request_id",)),
    Case("refund-reason-over-long", "accounts", "RefundPlan",
         lambda: apb.RefundPlanRequest(plan_id="plan-1", request_id="rf-2", reason="x" * 10_000),
         C.INVALID_ARGUMENT, ("reason",)),
    Case("reactivate-unknown-account", "accounts", "Reactivate",
         lambda: apb.ReactivateRequest(account_id="ghost", request_id="ra-1"), C.NOT_FOUND,
         ("ghost",)),
    Case("reactivate-not-suspended", "accounts", "Reactivate",
         lambda: apb.ReactivateRequest(account_id=ACCOUNT, request_id="ra-2"),
         C.FAILED_PRECONDITION, ("suspended",)),
    # --- settlement
    Case("settle-bad-day", "settlement", "SettleDay",
         lambda: spb.SettleDayRequest(billing_day="2027-02-30"), C.INVALID_ARGUMENT,
         ("day", "date")),
    Case("bill-unknown-account", "settlement", "GetBill",
         lambda: spb.GetBillRequest(account_id="ghost", billing_day="2027-03-01"), C.NOT_FOUND,
         ("ghost",)),
    Case("bill-not-issued", "settlement", "GetBill",
         lambda: spb.GetBillRequest(account_id=ACCOUNT, billing_day="2027-03-01"), C.NOT_FOUND,
         ("bill",)),
    Case("bills-from-after-to", "settlement", "ListBills",
         lambda: spb.ListBillsRequest(account_id=ACCOUNT, from_day="2027-03-02",
                                      to_day="2027-03-01"), C.INVALID_ARGUMENT,
         ("from_day", "after", "before")),
    Case("settle-day-not-ended", "settlement", "SettleDay",
         lambda: spb.SettleDayRequest(billing_day="2027-03-10"), C.FAILED_PRECONDITION,
         ("2027-03-10",), reason="DAY_NOT_ENDED"),
    # --- test clock
    Case("settime-backwards", "clock", "SetTime",
         lambda: tpb.SetTimeRequest(now=ts(T0 - timedelta(hours=1))), C.INVALID_ARGUMENT,
         ("backwards", "before")),
    Case("settime-missing-now", "clock", "SetTime", lambda: tpb.SetTimeRequest(),
         C.INVALID_ARGUMENT, ("now",)),
    Case("advance-negative", "clock", "AdvanceTime", lambda: tpb.AdvanceTimeRequest(seconds=-1),
         C.INVALID_ARGUMENT, ("seconds",)),
    Case("advance-int64-max", "clock", "AdvanceTime",
         lambda: tpb.AdvanceTimeRequest(seconds=2**63 - 1), C.INVALID_ARGUMENT, ("seconds",)),
]


def stubs_for(channel: grpc.Channel) -> dict[str, Any]:
    return {"ledger": qpb_grpc.QuotaLedgerStub(channel),
            "accounts": apb_grpc.AccountsStub(channel),
            "settlement": spb_grpc.SettlementStub(channel),
            "clock": tpb_grpc.TestClockStub(channel)}


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)  # also checks code and message match the call's
    assert status is not None, "no google.rpc.Status in the trailing metadata"
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1, f"expected one ErrorInfo, got {status.details}"
    return infos[0]


def assert_human_message(message: str, words: tuple[str, ...]) -> None:
    assert message and message.strip() == message, repr(message)
    assert len(message.split()) >= 3, f"not a sentence: {message!r}"
    assert "Traceback" not in message and "Exception" not in message, message
    assert any(w.lower() in message.lower() for w in words), (
        f"message {message!r} mentions none of {words}")


def assert_refused(err: grpc.RpcError, code: grpc.StatusCode, words: tuple[str, ...],
                   reason: str | None = None) -> error_details_pb2.ErrorInfo:
    assert err.code() == code, f"{err.code()} {err.details()!r}, expected {code}"
    assert_human_message(err.details() or "", words)
    info = error_info(err)
    assert UPPER_SNAKE.fullmatch(info.reason), info.reason
    if reason is not None:
        assert info.reason == reason
    return info


def assert_alive(target: str) -> None:
    with grpc.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                       timeout=CALL_TIMEOUT_S)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        acct = apb_grpc.AccountsStub(ch).GetAccount(apb.GetAccountRequest(account_id=ACCOUNT),
                                                    timeout=CALL_TIMEOUT_S)
        assert acct.account_id == ACCOUNT


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory, module_db) -> Iterator[ServerProcess]:
    """One server for the whole table: every case is refused, so none changes it."""
    srv = ServerProcess(tmp_path_factory.mktemp("bad_input"), db=module_db).start()
    try:
        with srv.client() as c:
            c.set_time(T0)
            make_account(c, ACCOUNT, cash_micros=100_000_000)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def raw(shared_server) -> Iterator[dict[str, Any]]:
    with grpc.insecure_channel(shared_server.target) as ch:
        yield stubs_for(ch)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_malformed_request_is_refused_exactly_and_changes_nothing(case, shared_server, raw):
    """Each malformed request gets its exact code, a sentence, an ErrorInfo, and no entry."""
    before = shared_server.journal_count()
    with pytest.raises(grpc.RpcError) as exc:
        getattr(raw[case.stub], case.method)(case.request(), timeout=CALL_TIMEOUT_S)
    assert_refused(exc.value, case.code, case.words, case.reason)
    assert shared_server.journal_count() == before
    assert_alive(shared_server.target)


def test_limits_at_the_boundary_are_accepted(server, client):
    """Largest valid values pass: 128-char key, quantity 1,000,000, 1,000-item batch, 10**15."""
    make_account(client, ACCOUNT)
    with grpc.insecure_channel(server.target) as ch:
        raw = stubs_for(ch)
        r = raw["ledger"].Consume(consume(request_id="r" * 128, quantity=1_000_000),
                                  timeout=CALL_TIMEOUT_S)
        assert r.billable and r.payg_units == 1_000_000 and r.payg_amount_micros == 700_000_000
        r0 = raw["ledger"].Consume(consume(request_id="q0", quantity=0), timeout=CALL_TIMEOUT_S)
        assert r0.payg_units == 1  # R5: quantity 0 means 1
        batch = raw["ledger"].ConsumeBatch(qpb.ConsumeBatchRequest(requests=[
            consume(request_id=f"full-{i}") for i in range(1_000)]), timeout=CALL_TIMEOUT_S)
        assert [r.WhichOneof("outcome") for r in batch.results] == ["response"] * 1_000
        acct = raw["accounts"].TopUp(top_up(request_id="t" * 128, amount_micros=10**15),
                                     timeout=CALL_TIMEOUT_S)
        assert acct.cash_balance_micros == 10**15


def test_batch_bad_item_fails_alone_and_results_keep_order(server, client):
    """In a ConsumeBatch, bad items fail alone with their own code; the rest succeed in order."""
    make_account(client, ACCOUNT)
    items = [consume(request_id="b-1"),
             consume(request_id="b-2", region=0),
             consume(request_id="b-3", quantity=2),
             consume(request_id="b-4", quantity=-1),
             consume(request_id="b-1", quantity=5),  # key reused with other content (R12)
             consume(request_id="b-6", account_id="ghost"),
             consume(request_id="b-7", region=2)]
    before = server.journal_count()
    with grpc.insecure_channel(server.target) as ch:
        resp = stubs_for(ch)["ledger"].ConsumeBatch(qpb.ConsumeBatchRequest(requests=items),
                                                    timeout=CALL_TIMEOUT_S)
    assert [r.request_id for r in resp.results] == [i.request_id for i in items]
    kinds = [r.WhichOneof("outcome") for r in resp.results]
    assert kinds == ["response", "error", "response", "error", "error", "error", "response"]
    expected_errors = {1: (C.INVALID_ARGUMENT, "region"), 3: (C.INVALID_ARGUMENT, "quantity"),
                       4: (C.ALREADY_EXISTS, "request_id"), 5: (C.NOT_FOUND, "ghost")}
    for i, (code, word) in expected_errors.items():
        err = resp.results[i].error
        assert err.code == code.value[0], (i, err)
        assert UPPER_SNAKE.fullmatch(err.reason), err.reason
        assert_human_message(err.message, (word,))
    assert resp.results[4].error.reason == "IDEMPOTENCY_KEY_REUSED"
    good = [resp.results[i].response for i in (0, 2, 6)]
    assert [(g.payg_units, g.payg_amount_micros) for g in good] == [(1, 700), (2, 1400),
                                                                    (1, 1000)]
    assert all(g.billable and not g.replayed for g in good)
    assert server.journal_count() == before + 3


def test_stream_bad_item_fails_alone_and_results_keep_order(server, client):
    """In a ConsumeStream, one result per request in order; a bad item fails alone."""
    make_account(client, ACCOUNT)
    items = [consume(request_id="s-1"), consume(request_id="s-2", step=99),
             consume(request_id="s-3", quantity=3)]
    before = server.journal_count()
    with grpc.insecure_channel(server.target) as ch:
        results = list(stubs_for(ch)["ledger"].ConsumeStream(iter(items),
                                                             timeout=CALL_TIMEOUT_S))
    assert [r.request_id for r in results] == ["s-1", "s-2", "s-3"]
    assert [r.WhichOneof("outcome") for r in results] == ["response", "error", "response"]
    assert results[1].error.code == C.INVALID_ARGUMENT.value[0]
    assert_human_message(results[1].error.message, ("step",))
    assert results[2].response.payg_units == 3
    assert server.journal_count() == before + 2


def test_settime_with_invalid_timestamp_nanos_is_refused(server, client):
    """A google.protobuf.Timestamp with nanos outside 0..999,999,999 is malformed input."""
    make_account(client, ACCOUNT)
    before = server.journal_count()
    bad = ts(T0 + timedelta(minutes=1))
    bad.nanos = -1
    with grpc.insecure_channel(server.target) as ch, pytest.raises(grpc.RpcError) as exc:
        stubs_for(ch)["clock"].SetTime(tpb.SetTimeRequest(now=bad), timeout=CALL_TIMEOUT_S)
    assert_refused(exc.value, C.INVALID_ARGUMENT, ("now", "nanos", "timestamp"))
    assert server.journal_count() == before


def test_settime_beyond_timestamp_range_is_refused_at_once(server, client):
    """SetTime to 10000-01-02 (outside Timestamp's range) is INVALID_ARGUMENT, quickly."""
    make_account(client, ACCOUNT)
    far = Timestamp(seconds=253_402_300_800 + 86_400)  # 10000-01-02T00:00:00Z
    caught: grpc.RpcError | None = None
    with grpc.insecure_channel(server.target) as ch:
        try:
            stubs_for(ch)["clock"].SetTime(tpb.SetTimeRequest(now=far), timeout=3.0)
        except grpc.RpcError as err:
            caught = err
    if caught is not None and caught.code() == C.DEADLINE_EXCEEDED:
        server.kill()  # the writer is busy settling ~2.9 million days: do not wait for it
    assert caught is not None, "SetTime to year 10000 was accepted"
    assert_refused(caught, C.INVALID_ARGUMENT, ("now", "time", "range", "9999"))
