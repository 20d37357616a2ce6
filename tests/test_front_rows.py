"""A ConsumeBatch's items checked column by column give exactly what checking them one by
one gives (issue 19): the same rows, and for a batch with any bad item the same refusals,
each with its own message (bad input never reaches the journal)."""

from __future__ import annotations

import uuid

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st
from quota_ledger.v1 import quota_ledger_pb2 as qpb

from ledger.errors import LedgerError
from server import convert, services

from .hostile_strategies import HOSTILE_CHARS, consume_requests

FIELDS = ("account_id", "request_id", "scenario_id")


def one_by_one(requests: list[qpb.ConsumeRequest]) -> list[tuple | str]:
    out: list[tuple | str] = []
    for req in requests:
        try:
            out.append(convert.consume_row(req))
        except LedgerError as exc:
            out.append(str(exc))
    return out


def at_once(requests: list[qpb.ConsumeRequest]) -> list[tuple | str]:
    rows, where, refused = services._validated(requests)
    out: list[tuple | str | None] = [None] * len(requests)
    for j, row in enumerate(rows):
        out[where[j] if where else j] = row
    for i, exc in refused:
        out[i] = str(exc)
    assert None not in out
    return out  # type: ignore[return-value]


@settings(max_examples=300, deadline=None)
@given(st.lists(consume_requests(short=True), min_size=1, max_size=12))
def test_columns_agree_with_items(requests: list[qpb.ConsumeRequest]) -> None:
    assert at_once(requests) == one_by_one(requests)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.integers(0, 8),
                          st.sampled_from(HOSTILE_CHARS)), max_size=3),
       st.integers(1, 8))
def test_one_character_off(edits: list[tuple[str, int, str]], n: int) -> None:
    """Well-formed items with one character put into an id: a space, a control, non-ASCII."""
    requests = [qpb.ConsumeRequest(account_id=f"acct-{i}", request_id=f"req {i}",
                                   scenario_id="sc", region=1, captcha_type=1,
                                   architecture=1, step=1) for i in range(n)]
    for k, (field, at, char) in enumerate(edits):
        req = requests[k % n]
        value = getattr(req, field)
        setattr(req, field, value[:at] + char + value[at:])
    assert at_once(requests) == one_by_one(requests)


def test_a_valid_batch_takes_the_columns_path() -> None:
    """Plain items, R5's quantity 0, a scenario and R26's client instants (either name):
    all through the column checks, with the rows the item checks give."""
    stamp = Timestamp(seconds=1_800_000_000, nanos=5_000)
    requests = [qpb.ConsumeRequest(account_id=f"acct-{i % 3}", request_id=str(uuid.uuid4()),
                                   region=1 + i % 2, captcha_type=1 + i % 5,
                                   architecture=1 + i % 2, step=1 + i % 2, quantity=i % 3)
                for i in range(30)]
    requests[4].scenario_id = "checkout"
    requests[5].client_observed_at.CopyFrom(stamp)
    requests[6].client_timestamp.CopyFrom(stamp)
    rows = convert.consume_rows(requests)
    assert rows is not None
    assert rows == one_by_one(requests)
    assert rows[0][7] == 1 and rows[4][6] == "checkout"  # R5: quantity 0 means 1
    assert rows[5][9] == rows[6][9] == 1_800_000_000_000_005


def test_one_bad_item_sends_the_batch_item_by_item() -> None:
    requests = [qpb.ConsumeRequest(account_id="a", request_id=f"r{i}", region=1,
                                   captcha_type=1, architecture=1, step=1) for i in range(4)]
    requests[2].account_id = "has space"
    assert convert.consume_rows(requests) is None
    rows, where, refused = services._validated(requests)
    assert where == [0, 1, 3] and [i for i, _ in refused] == [2]
    assert "must not contain spaces" in str(refused[0][1])
    assert len(rows) == 3
