"""Hypothesis strategies for the hostile-input campaigns (tests/test_hostile.py).

Hostile text (NUL, controls, emoji, bidi marks, SQL, limits and their neighbours, very long
strings), numbers at the int64 and contract edges, billing days real and impossible, and one
strategy per campaign: Consume requests, rounds of Accounts calls and of query and Settlement
calls (each with its well-formedness by the oracles of tests/hostile_wire.py), TestClock moves,
and requests built to a given size.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import strategies as st
from quota_ledger.v1 import accounts_pb2 as apb
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import settlement_pb2 as spb
from quota_ledger.v1 import test_clock_pb2 as tpb

from server.services import ADVANCE_SECONDS_MAX  # the test clock's longest step

from .hostile_wire import (
    AMOUNT_MICROS_MAX,
    BATCH_SIZE_MAX,
    DISPLAY_NAME_LEN_MAX,
    ID_LEN_MAX,
    INT32_MAX,
    INT32_MIN,
    INT64_MAX,
    INT64_MIN,
    KNOWN_ACCOUNTS,
    QUANTITY_MAX,
    REASON_LEN_MAX,
    REQUEST_ID_LEN_MAX,
    SCENARIOS_MAX,
    SPEC_IDS,
    TIMESTAMP_SECONDS_MAX,
    TIMESTAMP_SECONDS_MIN,
    US,
    ok_day,
    ok_id,
    ok_range,
    ok_text,
    ok_timestamp,
)

# ---------------------------------------------------------------------------- strategies

EDGE_TEXT = (
    "", " ", "\x00", "a\x00b", "acme\x00", "a b", " acme", "acme ", "\t", "\n", "acme\n", "\x7f",
    "é", "ß", "\u202eacme", "\ufeff", "😀", "\U0010ffff", "\u0000" * 3, "a" * 64, "a" * 65,
    "r" * 128, "r" * 129, "~" * 64, "'; DROP TABLE journal; --", "%s%n%x", "{}", "null",
    "plan-1", "plan-0", "plan--1", "month-100k ", "MONTH-100K", "acme-2", "ACME",
)
# Characters that break parsers: NUL and controls, DEL, blanks, non-ASCII letters, emoji,
# bidi override, BOM, noncharacters, the last code point, combining marks, non-ASCII digits.
HOSTILE_CHARS = (*"aZ09-_.:~!#'\"\\/%", "\x00", "\x01", "\x1b", "\x1f", "\x7f", "\x80", " ", "\t",
                 "\n", "\r", "\u00a0", "é", "ß", "\u0130", "😀", "\u202e", "\u200b", "\ufeff",
                 "\uffff", "\U0010ffff", "\u0301", "\uff12", "\u0662")
ASCII_ID = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
ASCII_TEXT = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


def long_text(max_len: int) -> st.SearchStrategy[str]:
    """Up to max_len characters: one character repeated, or printable ASCII plus a tail."""
    return st.one_of(
        st.builds(lambda c, n: c * n, st.sampled_from(HOSTILE_CHARS), st.integers(0, max_len)),
        st.builds(lambda n, tail: "x" * n + tail, st.integers(0, max_len),
                  st.sampled_from(["", " ", "\x00", "é", "😀"])),
    )


def hostile_text(max_len: int = 10_000) -> st.SearchStrategy[str]:
    """Valid unicode only (protobuf strings cannot carry surrogates): NUL, controls, emoji,
    bidi marks, SQL, limits and their neighbours, any code point, very long strings."""
    return st.one_of(
        st.sampled_from(EDGE_TEXT),
        st.text(st.sampled_from(HOSTILE_CHARS), max_size=70),
        st.text(max_size=16),  # any code point but surrogates
        long_text(max_len),
    )


def sometimes(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
              ) -> st.SearchStrategy[Any]:
    """A field: valid, hostile, or missing (None: left unset on the message)."""
    return st.one_of(valid, hostile, st.none())


def enum_numbers(known: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, known + 1), st.integers(INT32_MIN, INT32_MAX))


INT64_EDGES = (0, 1, -1, QUANTITY_MAX, QUANTITY_MAX + 1, AMOUNT_MICROS_MAX, AMOUNT_MICROS_MAX + 1,
               INT64_MAX, INT64_MIN, 2**31, -(2**31), 2**53 + 1)
int64s = st.one_of(st.sampled_from(INT64_EDGES), st.integers(INT64_MIN, INT64_MAX))
known_accounts = st.sampled_from(KNOWN_ACCOUNTS)
valid_ids = st.text(ASCII_ID, min_size=1, max_size=ID_LEN_MAX)
valid_request_ids = st.one_of(st.text(ASCII_TEXT, min_size=1, max_size=REQUEST_ID_LEN_MAX),
                              st.sampled_from(["k1", "k2", "k3"]))  # reused keys (R12)
valid_request_ids = st.one_of(valid_request_ids, st.uuids().map(str))  # fresh keys too
timestamps = st.builds(Timestamp, seconds=int64s, nanos=st.integers(-(10**9), 2 * 10**9))
HOSTILE_TEXT = hostile_text()
SHORT_HOSTILE_TEXT = hostile_text(200)  # for batch and stream items (4 MiB per message)
# Field strategies, built once (building strategies inside a composite costs per example).
REGION, TYPE = sometimes(st.integers(1, 2), enum_numbers(2)), sometimes(st.integers(1, 5),
                                                                       enum_numbers(5))
ARCH, STEP = sometimes(st.integers(1, 2), enum_numbers(2)), sometimes(st.integers(1, 2),
                                                                     enum_numbers(2))
KIND = sometimes(st.integers(1, 2), enum_numbers(2))
QUANTITY = sometimes(st.integers(0, QUANTITY_MAX), int64s)
AMOUNT = sometimes(st.integers(1, 10**9), int64s)
MAYBE_BOOL = st.one_of(st.none(), st.booleans())
MAYBE_TS = st.one_of(st.none(), timestamps)
TEXTS = {short: {
    "account": sometimes(known_accounts, t), "request_id": sometimes(valid_request_ids, t),
    "id": sometimes(valid_ids, t), "any": t,
    "name": sometimes(st.text(ASCII_TEXT, max_size=DISPLAY_NAME_LEN_MAX), t),
    "spec": sometimes(st.sampled_from(SPEC_IDS), t),
    "plan": sometimes(st.builds("plan-{}".format, st.integers(-1, 60)), t),
    "reason": sometimes(st.text(ASCII_TEXT, max_size=REASON_LEN_MAX), t),
    "scenarios": st.lists(st.one_of(valid_ids, t), max_size=3),
} for short, t in ((False, HOSTILE_TEXT), (True, SHORT_HOSTILE_TEXT))}
WELL_FORMED_CONSUME = st.fixed_dictionaries({
    "account_id": known_accounts, "request_id": valid_request_ids,
    "region": st.integers(1, 2), "captcha_type": st.integers(1, 5),
    "architecture": st.integers(1, 2), "step": st.integers(1, 2),
    "quantity": st.one_of(st.integers(0, 3), st.integers(0, QUANTITY_MAX)),
    "dry_run": st.booleans(), "scenario_id": st.one_of(st.none(), st.just(""), valid_ids),
    "client_timestamp": MAYBE_TS})


def _build(cls: type, fields: dict[str, Any]) -> Any:
    return cls(**{k: v for k, v in fields.items() if v is not None})


@st.composite
def consume_requests(draw: st.DrawFn, short: bool = False) -> qpb.ConsumeRequest:
    """Two in three well-formed (so state changes too), the rest with each field valid,
    hostile or missing: unknown enum numbers, huge and negative quantities, junk ids."""
    if draw(st.integers(0, 2)):
        return _build(qpb.ConsumeRequest, draw(WELL_FORMED_CONSUME))
    t = TEXTS[short]
    f = {"account_id": draw(t["account"]), "request_id": draw(t["request_id"]),
         "region": draw(REGION), "captcha_type": draw(TYPE), "architecture": draw(ARCH),
         "step": draw(STEP), "quantity": draw(QUANTITY), "dry_run": draw(MAYBE_BOOL),
         "scenario_id": draw(t["id"]), "client_timestamp": draw(MAYBE_TS)}
    return _build(qpb.ConsumeRequest, f)


def _days() -> st.SearchStrategy[str]:
    """Billing days: real ones across the whole calendar, near ones, impossible ones, junk.

    Real days stop at 9999-12-30 and junk at 1,000 characters: SettleDay("9999-12-31") and
    long day strings are pinned as bugs in tests/test_hostile.py (its known bugs)."""
    return st.one_of(
        st.dates(date(1, 1, 1), date(9999, 12, 30)).map(date.isoformat),
        st.dates(date(2027, 1, 1), date(2028, 12, 31)).map(date.isoformat),
        st.sampled_from(["2027-02-29", "2028-02-29", "2027-13-01", "2027-00-10", "0000-01-01",
                         "2027-1-1", "20270310", "2027/03/10", "2027-03-10T00:00:00",
                         "2027-03-10\n", " 2027-03-10", "\u0662\u0660\u0662\u0667-03-10",
                         "\uff12\uff10\uff12\uff17-03-10", "-001-01-01", "+2027-03-10"]),
        hostile_text(1_000),
    )


DAYS = _days()
MAYBE_DAY = st.one_of(DAYS, st.none())
NEAR_DAYS = st.dates(date(2027, 1, 1), date(2032, 12, 31)).map(date.isoformat)


# ---------------------------------------------------------------------------- ConsumeBatch


batch_sizes = st.one_of(st.integers(0, 12), st.integers(BATCH_SIZE_MAX - 2, BATCH_SIZE_MAX + 2),
                        st.integers(BATCH_SIZE_MAX + 1, 3_000))


# ---------------------------------------------------------------------------- Accounts


ACCOUNT_OR_NEW = st.one_of(known_accounts, known_accounts, valid_ids, HOSTILE_TEXT, st.none())
GOOD_NAMES = st.text(ASCII_TEXT, max_size=40)
SCENARIO_COUNTS = st.one_of(st.integers(0, 6), st.integers(SCENARIOS_MAX - 1, SCENARIOS_MAX + 2))


@st.composite
def account_rounds(draw: st.DrawFn) -> list[tuple[str, Any, bool | None]]:
    """One hostile draw sent to every Accounts RPC: [(rpc, request, well-formed?)]."""
    n = draw(SCENARIO_COUNTS)
    ids = [f"s{i}" for i in range(n)]
    custom = draw(MAYBE_BOOL)
    if draw(st.booleans()):  # well-formed, so that state changes too
        acct = draw(st.one_of(known_accounts, valid_ids))
        rid, name = draw(valid_request_ids), draw(GOOD_NAMES)
        kind, amount = draw(st.integers(1, 2)), draw(st.integers(1, 10**9))
        spec, plan, reason = draw(st.sampled_from(SPEC_IDS)), "@latest", draw(GOOD_NAMES)
    else:
        t = TEXTS[False]
        acct = draw(ACCOUNT_OR_NEW)
        rid, name = draw(t["request_id"]), draw(t["name"])
        kind, amount = draw(KIND), draw(AMOUNT)
        ids += draw(t["scenarios"])
        spec, plan, reason = draw(t["spec"]), draw(t["plan"]), draw(t["reason"])
    a, r = acct or "", rid or ""
    ok_a, ok_r = ok_id(a), ok_text(r, REQUEST_ID_LEN_MAX)
    return [
        ("CreateAccount", _build(apb.CreateAccountRequest, {"account_id": acct,
                                                            "display_name": name}),
         ok_a and ok_text(name or "", DISPLAY_NAME_LEN_MAX, allow_empty=True)),
        ("GetAccount", _build(apb.GetAccountRequest, {"account_id": acct}), ok_a),
        ("TopUp", _build(apb.TopUpRequest, {"account_id": acct, "request_id": rid, "kind": kind,
                                            "amount_micros": amount}),
         ok_a and ok_r and kind in (1, 2) and 0 < (amount or 0) <= AMOUNT_MICROS_MAX),
        ("UpdateFeatures", _build(apb.UpdateFeaturesRequest, {
            "account_id": acct, "request_id": rid, "scenario_ids": ids,
            "custom_policy_enabled": custom}),
         ok_a and ok_r and len(ids) <= SCENARIOS_MAX and all(ok_id(s) for s in ids)
         and len(set(ids)) == len(ids)),
        ("PurchasePlan", _build(apb.PurchasePlanRequest, {"account_id": acct, "request_id": rid,
                                                          "spec_id": spec}),
         ok_a and ok_r and ok_id(spec or "")),
        ("RefundPlan", _build(apb.RefundPlanRequest, {"plan_id": plan, "request_id": rid,
                                                      "reason": reason}),
         ok_id(plan or "") and ok_r and ok_text(reason or "", REASON_LEN_MAX, allow_empty=True)),
        ("Reactivate", _build(apb.ReactivateRequest, {"account_id": acct, "request_id": rid}),
         ok_a and ok_r),
        ("ListPlanSpecs", apb.ListPlanSpecsRequest(), True),
    ]


# ---------------------------------------------------------------------------- queries, Settlement


@st.composite
def query_rounds(draw: st.DrawFn) -> list[tuple[str, Any, bool | None]]:
    """One hostile draw sent to every query and Settlement RPC."""
    if draw(st.booleans()):  # well-formed: known accounts, days near the ledger's time
        acct, d1 = draw(known_accounts), draw(NEAR_DAYS)
        d2 = (date.fromisoformat(d1) + timedelta(days=draw(st.integers(0, 400)))).isoformat()
    else:
        acct, d1, d2 = draw(TEXTS[False]["account"]), draw(MAYBE_DAY), draw(MAYBE_DAY)
    inactive = draw(MAYBE_BOOL)
    a, ok_a = acct or "", ok_id(acct or "")
    ranged = ok_a and ok_range(d1 or "", d2 or "")
    return [
        ("GetRemaining", _build(qpb.GetRemainingRequest, {"account_id": acct}), ok_a),
        ("ListPlans", _build(qpb.ListPlansRequest, {"account_id": acct,
                                                    "include_inactive": inactive}), ok_a),
        ("GetUsage", _build(qpb.GetUsageRequest, {"account_id": acct, "from_day": d1,
                                                  "to_day": d2}), ranged),
        ("ListBills", _build(spb.ListBillsRequest, {"account_id": acct, "from_day": d1,
                                                    "to_day": d2}), ranged),
        ("GetBill", _build(spb.GetBillRequest, {"account_id": a, "billing_day": d1}),
         ok_a and ok_day(d1 or "")),
        ("SettleDay", _build(spb.SettleDayRequest, {"billing_day": d1}), ok_day(d1 or "")),
    ]


# ---------------------------------------------------------------------------- TestClock


CLOCK_CALLS = st.one_of(
    # SetTime to an absolute instant: anywhere in int64 seconds, nanos in or out of range.
    st.tuples(st.just("SetTime"), st.just("abs"), st.tuples(int64s, st.one_of(
        st.integers(0, 999_999_999), st.integers(INT32_MIN, INT32_MAX)))),
    st.tuples(st.just("SetTime"), st.just("abs"), st.tuples(
        st.integers(TIMESTAMP_SECONDS_MIN - 2, TIMESTAMP_SECONDS_MAX + 2),
        st.integers(0, 999_999_999))),
    # SetTime relative to the ledger's time, in µs: backwards, same, a little ahead, too far.
    st.tuples(st.just("SetTime"), st.just("rel"), st.one_of(
        st.integers(-(10**15), -1), st.just(0), st.integers(0, 2 * 86_400 * US),
        st.integers(ADVANCE_SECONDS_MAX * US - 2, ADVANCE_SECONDS_MAX * US + 2),
        st.integers(ADVANCE_SECONDS_MAX * US + 1, 10**17))),
    # SetTime a few seconds ahead with a malformed nanos field.
    st.tuples(st.just("SetTime"), st.just("bad-nanos"), st.one_of(
        st.integers(INT32_MIN, -1), st.integers(10**9, INT32_MAX))),
    st.tuples(st.just("SetTime"), st.just("missing"), st.none()),
    # AdvanceTime: negative, a little, just past the cap, huge, or missing (0 seconds).
    st.tuples(st.just("AdvanceTime"), st.just("secs"), st.one_of(
        st.integers(INT64_MIN, -1), st.integers(0, 2 * 86_400),
        st.integers(ADVANCE_SECONDS_MAX + 1, ADVANCE_SECONDS_MAX + 3),
        st.integers(ADVANCE_SECONDS_MAX + 1, INT64_MAX), st.none())),
)


def clock_request(which: str, kind: str, arg: Any, now_us: int) -> tuple[Any, bool]:
    """(request, refused?) for one CLOCK_CALLS draw, given the ledger's time."""
    cap_us = ADVANCE_SECONDS_MAX * US
    if which == "AdvanceTime":
        secs = arg or 0
        return _build(tpb.AdvanceTimeRequest, {"seconds": arg}), not 0 <= secs <= (
            ADVANCE_SECONDS_MAX)
    if kind == "missing":
        return tpb.SetTimeRequest(), True
    if kind == "abs":
        t = Timestamp(seconds=arg[0], nanos=arg[1])
        to_us = arg[0] * US + arg[1] // 1_000
        return tpb.SetTimeRequest(now=t), not (ok_timestamp(t) and 0 <= to_us - now_us <= cap_us)
    if kind == "bad-nanos":
        return tpb.SetTimeRequest(now=Timestamp(seconds=now_us // US + 10, nanos=arg)), True
    to_us = now_us + arg
    t = Timestamp(seconds=to_us // US, nanos=to_us % US * 1_000)
    return tpb.SetTimeRequest(now=t), not 0 <= arg <= cap_us


# ---------------------------------------------------------------------------- oversized messages

OVERSIZE_TARGETS: dict[str, Callable[[str], Any]] = {
    "Consume": lambda s: qpb.ConsumeRequest(account_id="acme", request_id=s, region=1,
                                            captcha_type=1, architecture=1, step=1),
    "ConsumeBatch": lambda s: qpb.ConsumeBatchRequest(requests=[
        qpb.ConsumeRequest(account_id="acme", request_id=s[: len(s) // 2]),
        qpb.ConsumeRequest(account_id="acme", scenario_id=s[len(s) // 2:])]),
    "GetRemaining": lambda s: qpb.GetRemainingRequest(account_id=s),
    "ListPlans": lambda s: qpb.ListPlansRequest(account_id=s),
    "CreateAccount": lambda s: apb.CreateAccountRequest(account_id="big", display_name=s),
    "GetAccount": lambda s: apb.GetAccountRequest(account_id=s),
    "TopUp": lambda s: apb.TopUpRequest(account_id="acme", request_id=s, kind=1,
                                        amount_micros=1),
    "UpdateFeatures": lambda s: apb.UpdateFeaturesRequest(
        account_id="acme", request_id="uf", scenario_ids=[s[i:i + 65_536]
                                                          for i in range(0, len(s), 65_536)]),
    "PurchasePlan": lambda s: apb.PurchasePlanRequest(account_id="acme", request_id="p",
                                                      spec_id=s),
    "RefundPlan": lambda s: apb.RefundPlanRequest(plan_id="plan-1", request_id="rf", reason=s),
    "Reactivate": lambda s: apb.ReactivateRequest(account_id=s, request_id="re"),
    # Day fields only over the limit: under it, test_long_billing_day_is_not_echoed_whole.
    "SettleDay": lambda s: spb.SettleDayRequest(billing_day=s),
    "GetBill": lambda s: spb.GetBillRequest(account_id="acme", billing_day=s),
    "GetUsage": lambda s: qpb.GetUsageRequest(account_id="acme", from_day=s, to_day=s),
    "ListBills": lambda s: spb.ListBillsRequest(account_id="acme", from_day="2027-01-01",
                                                to_day=s),
}
DAY_FIELD_TARGETS = frozenset({"SettleDay", "GetBill", "GetUsage", "ListBills"})
