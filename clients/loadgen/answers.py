"""Counting a ConsumeBatch answer in either view (FULL results or COMPACT columns) without
building a message per request, so the load generator keeps up with a fast server."""

from __future__ import annotations

from collections import Counter

from quota_ledger.v1 import quota_ledger_pb2 as qpb

VIEWS = {"full": qpb.CONSUME_BATCH_VIEW_FULL, "compact": qpb.CONSUME_BATCH_VIEW_COMPACT}


def count_answer(resp: qpb.ConsumeBatchResponse, k: int
                 ) -> tuple[int, int, int, Counter[int]]:
    """(acknowledged, billable, replayed, errors by numeric code) over the first k answers;
    a short answer leaves the rest uncounted (the caller records them as unknown)."""
    errors: Counter[int] = Counter()
    if not resp.results and resp.HasField("compact"):
        c = resp.compact
        codes = c.codes[:k]
        errors.update(code for code in codes if code)
        return (len(codes) - errors.total(), sum(c.billable[:k]), sum(c.replayed[:k]),
                errors)
    ok = billable = replayed = 0
    for r in resp.results[:k]:  # one result per request
        if r.HasField("response"):
            ok += 1
            response = r.response
            billable += response.billable
            replayed += response.replayed
        else:
            errors[r.error.code] += 1
    return ok, billable, replayed, errors
