"""The COMPACT batch view (CONTRACT, additions of 2026-11-29) answers item by item what FULL
answers for the same requests: codes, billable, replayed, pay-as-you-go units and amounts,
errors by index (bad items, unknown and suspended accounts, a reused key), replays, and the
batch transaction's own billing day and instant."""

from __future__ import annotations

import re
from datetime import timedelta

import grpc
import pytest
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import quota_ledger_pb2_grpc as qpb_grpc

from clients.client import LedgerClient

from .conftest import T0, make_account

COMPACT, FULL = qpb.CONSUME_BATCH_VIEW_COMPACT, qpb.CONSUME_BATCH_VIEW_FULL
OK = grpc.StatusCode.OK.value[0]


def req(account_id: str, request_id: str, **kw) -> qpb.ConsumeRequest:
    return LedgerClient.consume_request(account_id, request_id=request_id, **kw)


def setup_side(c: LedgerClient, side: str) -> None:
    """One side's accounts, made identically: a small plan that runs out within the batch,
    a pay-as-you-go account and an account that ends up suspended (R23)."""
    make_account(c, f"{side}-plan", cash_micros=100_000_000)
    c.purchase_plan(f"{side}-plan", "month-100k")
    make_account(c, f"{side}-payg", cash_micros=10_000_000)
    make_account(c, f"{side}-late")
    c.consume(f"{side}-late", request_id=f"{side}-owed", quantity=10)  # payg, nothing paid


def suspend_late(c: LedgerClient) -> None:
    """Settle the day (unpaid bill: overdue, R22), then more than 168 hours (R23)."""
    c.set_time(T0 + timedelta(days=1))
    c.set_time(T0 + timedelta(days=9))
    for side in ("a", "b"):
        assert c.get_account(f"{side}-late").status == 3  # SUSPENDED


def batch(side: str) -> list[qpb.ConsumeRequest]:
    """Fresh items, in-batch and earlier replays, every kind of refusal, a plan emptied
    part-way (R8: the rest pays as you go, R10)."""
    items = [req(f"{side}-plan", f"{side}-plan-{i}", quantity=30_000) for i in range(4)]
    items += [req(f"{side}-payg", f"{side}-payg-{i}", region=1 + i % 2) for i in range(5)]
    items += [
        req(f"{side}-payg", f"{side}-payg-0", region=1),  # replay inside the batch (R12)
        req(f"{side}-payg", f"{side}-early"),  # replay of an earlier unary call
        req(f"{side}-payg", f"{side}-early", quantity=2),  # same key, other content
        req(f"{side}-late", f"{side}-late-1"),  # suspended (R23)
        req(f"{side}-nobody", f"{side}-nobody-1"),  # unknown account
        req(f"{side}-payg", f"{side}-bad-1", quantity=2_000_000),  # bad item
        qpb.ConsumeRequest(account_id=f"{side}-payg", request_id=f"{side}-bad-2"),  # region 0
        req(f"{side}-payg", f"{side}-free", step="4.1"),  # not billable (R3)
        req(f"{side}-plan", f"{side}-dry", dry_run=True),
    ]
    return items


def same_error(compact_err, full_err, a: str, b: str) -> None:
    assert (compact_err.code, compact_err.reason) == (full_err.code, full_err.reason)
    assert re.sub(rf"\b{a}-", f"{b}-", compact_err.message) == full_err.message


def check_item_by_item(compact: qpb.CompactResults, full: list[qpb.ConsumeResult]) -> None:
    n = len(full)
    assert (len(compact.codes), len(compact.billable), len(compact.replayed),
            len(compact.payg_units), len(compact.payg_amount_micros)) == (n,) * 5
    errors = {e.index: e.error for e in compact.errors}
    assert len(errors) == len(compact.errors) == sum(1 for r in full if r.HasField("error"))
    assert [e.index for e in compact.errors] == sorted(errors)
    for i, r in enumerate(full):
        if r.HasField("error"):
            assert compact.codes[i] == r.error.code != OK
            same_error(errors[i], r.error, "a", "b")
            assert not compact.billable[i] and not compact.replayed[i]
            assert compact.payg_units[i] == compact.payg_amount_micros[i] == 0
        else:
            o = r.response
            assert compact.codes[i] == OK and i not in errors
            assert (compact.billable[i], compact.replayed[i], compact.payg_units[i],
                    compact.payg_amount_micros[i]) == (o.billable, o.replayed, o.payg_units,
                                                       o.payg_amount_micros), i


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as ch:
        yield qpb_grpc.QuotaLedgerStub(ch)


def test_compact_matches_full_item_by_item(client, stub):
    """The same batch to two identical sides, COMPACT and FULL, then both again (replays)."""
    for side in ("a", "b"):
        setup_side(client, side)
    suspend_late(client)
    for side in ("a", "b"):
        client.consume(f"{side}-payg", request_id=f"{side}-early")
    got_compact = stub.ConsumeBatch(qpb.ConsumeBatchRequest(requests=batch("a"), view=COMPACT))
    got_full = stub.ConsumeBatch(qpb.ConsumeBatchRequest(requests=batch("b"), view=FULL))
    assert not got_compact.results and not got_full.HasField("compact")
    compact, full = got_compact.compact, list(got_full.results)
    check_item_by_item(compact, full)
    S = grpc.StatusCode
    codes = [S.OK] * 11 + [S.ALREADY_EXISTS, S.FAILED_PRECONDITION, S.NOT_FOUND,
                           S.INVALID_ARGUMENT, S.INVALID_ARGUMENT, S.OK, S.OK]
    assert list(compact.codes) == [c.value[0] for c in codes]
    assert [e.error.reason for e in compact.errors][:2] == ["IDEMPOTENCY_KEY_REUSED",
                                                           "ACCOUNT_SUSPENDED"]
    assert any(compact.replayed) and any(compact.payg_units) and not all(compact.billable)
    assert compact.payg_units[3] > 0  # the plan ran out within the batch (R8, R10)
    assert not compact.billable[16] and compact.codes[16] == OK  # R3: acknowledged only
    fresh = [r.response for r in full if r.HasField("response") and r.response.billable
             and not r.response.replayed and r.response.journal_seq]
    assert compact.billing_day == fresh[0].billing_day
    assert compact.recorded_at == fresh[0].recorded_at
    # Again, both views: every billable item now replays, still item by item alike.
    again_c = stub.ConsumeBatch(qpb.ConsumeBatchRequest(requests=batch("a"), view=COMPACT))
    again_f = stub.ConsumeBatch(qpb.ConsumeBatchRequest(requests=batch("b")))
    check_item_by_item(again_c.compact, list(again_f.results))
    assert sum(again_c.compact.replayed) == 11  # every billable item but the dry run


def test_compact_edges(client, stub):
    """An empty batch and an all-refused batch still carry the transaction's day and time;
    an unknown view is refused."""
    empty = stub.ConsumeBatch(qpb.ConsumeBatchRequest(view=COMPACT))
    assert empty.HasField("compact") and not empty.compact.codes
    assert empty.compact.billing_day == (T0 + timedelta(hours=8)).strftime("%Y-%m-%d")
    assert empty.compact.recorded_at.ToDatetime().replace(tzinfo=T0.tzinfo) == T0
    refused = stub.ConsumeBatch(qpb.ConsumeBatchRequest(
        requests=[req("ghost", "g-1"), qpb.ConsumeRequest(account_id="ghost")], view=COMPACT))
    assert [e.index for e in refused.compact.errors] == [0, 1]
    assert list(refused.compact.codes) == [grpc.StatusCode.NOT_FOUND.value[0],
                                           grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    assert refused.compact.billing_day == empty.compact.billing_day
    with pytest.raises(grpc.RpcError) as err:
        stub.ConsumeBatch(qpb.ConsumeBatchRequest(requests=[req("ghost", "g-2")], view=7))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
