"""One outcome per request from a ``ConsumeBatch`` answer, FULL or COMPACT.

Both the coalescer (callers' requests sent together) and the spool's replay read batch
answers here. The coalescer asks for the FULL view by default, so that a coalesced caller
gets the very answer a unary call gives (issue 18: coalescing is the clients' default);
``compact_answers=True`` asks for COMPACT, and the spool's replay always does. A server that
answers FULL anyway (one that predates COMPACT) is read just as well.

What a COMPACT answer gives a caller (docs/decisions.md, "Coalesced consume() results"):
``billable``, ``replayed``, ``payg_units``, ``payg_amount_micros``, the batch's
``billing_day`` and ``recorded_at``, and the ``request_id``. It has no ``allocations``,
``plan_units_remaining`` or ``journal_seq``: those stay at their zero values.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from quota_ledger.v1 import common_pb2 as pb
from quota_ledger.v1 import quota_ledger_pb2 as qpb

from clients.wire import LedgerError

Outcome = qpb.ConsumeResponse | LedgerError
_CODES = {sc.value[0]: sc for sc in grpc.StatusCode}


def item_error(error: pb.Error) -> LedgerError:
    """The LedgerError a request alone would have raised, from a batch item's ``Error``."""
    code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
    return LedgerError(code, error.reason or code.name, error.message)


def batch_request(requests: Sequence[qpb.ConsumeRequest], compact: bool = True
                  ) -> qpb.ConsumeBatchRequest:
    return qpb.ConsumeBatchRequest(requests=requests, view=qpb.CONSUME_BATCH_VIEW_COMPACT
                                   if compact else qpb.CONSUME_BATCH_VIEW_FULL)


def batch_outcomes(requests: Sequence[qpb.ConsumeRequest], answer: qpb.ConsumeBatchResponse
                   ) -> list[Outcome]:
    """Request i's response or error. A short answer leaves the rest UNKNOWN (their fate is
    not known: a retry under the same request_id settles it, R12)."""
    n = len(requests)
    if answer.results:
        out: list[Outcome] = [r.response if r.HasField("response") else item_error(r.error)
                              for r in answer.results[:n]]
    else:
        out = _compact(requests, answer.compact)
    missing = LedgerError(grpc.StatusCode.UNKNOWN, "SHORT_ANSWER",
                          f"the batch answered {len(out)} of {n} requests")
    return out + [missing] * (n - len(out))


def _compact(requests: Sequence[qpb.ConsumeRequest], c: qpb.CompactResults) -> list[Outcome]:
    """Each response is a copy of one made for the batch (its billing_day and recorded_at),
    then its own fields: far cheaper than building each from keyword arguments."""
    errors = {e.index: e.error for e in c.errors}
    template = qpb.ConsumeResponse(billing_day=c.billing_day)
    if c.HasField("recorded_at"):
        template.recorded_at.CopyFrom(c.recorded_at)
    out: list[Outcome] = []
    columns = zip(requests, c.codes, c.billable, c.replayed, c.payg_units,  # noqa: B905
                  c.payg_amount_micros)  # the shortest column bounds the answer
    for i, (r, code, billable, replayed, units, amount) in enumerate(columns):
        if code:
            out.append(item_error(errors.get(i, pb.Error(code=code))))
            continue
        response = qpb.ConsumeResponse()
        response.CopyFrom(template)
        response.request_id = r.request_id
        if billable:
            response.billable = True
        if replayed:
            response.replayed = True
        if units:
            response.payg_units = units
        if amount:
            response.payg_amount_micros = amount
        out.append(response)
    return out
