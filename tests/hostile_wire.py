"""The hostile-input harness (tests/test_hostile.py): raw stubs, oracles and per-call checks.

:class:`Wire` drives every RPC of QuotaLedger, Accounts, Settlement and TestClock through raw
generated stubs on one channel. For every call the harness checks:

- the status code is one the CONTRACT names (never INTERNAL or UNKNOWN; UNAVAILABLE only for
  overload);
- a non-OK status carries a ``google.rpc.ErrorInfo`` with an UPPER_SNAKE reason, except the
  RESOURCE_EXHAUSTED that grpc itself raises for a message over ``MESSAGE_BYTES_MAX``;
- the journal (read-only, on either backend) is unchanged by a refused request, and changed by
  exactly what an accepted one accounts for (R11, R25).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_status import rpc_status
from quota_ledger.v1 import accounts_pb2_grpc as apb_grpc
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import quota_ledger_pb2_grpc as qpb_grpc
from quota_ledger.v1 import settlement_pb2_grpc as spb_grpc
from quota_ledger.v1 import test_clock_pb2_grpc as tpb_grpc

from ledger.store import consume_entries

from .conftest import ServerProcess

# Limits restated from CONTRACT.md and docs/decisions.md (not imported: the tests are the check).
MESSAGE_BYTES_MAX = 4 * 1024 * 1024  # server/app.py: grpc's own receive limit
ID_LEN_MAX = 64
REQUEST_ID_LEN_MAX = 128
DISPLAY_NAME_LEN_MAX = 200
REASON_LEN_MAX = 500
SCENARIOS_MAX = 1_000
QUANTITY_MAX = 1_000_000
AMOUNT_MICROS_MAX = 10**15
BATCH_SIZE_MAX = 1_000
RANGE_DAYS_MAX = 366
US = 1_000_000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
TIMESTAMP_SECONDS_MIN = -62_135_596_800  # 0001-01-01T00:00:00Z, google.protobuf.Timestamp
TIMESTAMP_SECONDS_MAX = 253_402_300_799  # 9999-12-31T23:59:59Z


CALL_TIMEOUT_S = 30.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                   ("grpc.max_send_message_length", 64 * 1024 * 1024)]


C = grpc.StatusCode
CONTRACT_CODES = frozenset({C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS,
                            C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED, C.UNAVAILABLE})
OVERLOAD_REASONS = frozenset({"QUEUE_FULL", "OVERLOADED"})
REASON_RE = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*$")

KNOWN_ACCOUNTS = ("acme", "acme-2", "broke")
SPEC_IDS = ("month-100k", "month-1m", "year-1m", "year-10m", "year-100m")


# ---------------------------------------------------------------------------- oracles
# What the CONTRACT and docs/decisions.md say is well-formed, written independently of the
# server's own checks.


def _printable(s: str) -> bool:
    return all(" " <= ch <= "~" for ch in s)


def ok_id(s: str, max_len: int = ID_LEN_MAX) -> bool:
    return 1 <= len(s) <= max_len and _printable(s) and " " not in s


def ok_text(s: str, max_len: int, *, allow_empty: bool = False) -> bool:
    if not s:
        return allow_empty
    return len(s) <= max_len and _printable(s)


def ok_day(s: str) -> bool:
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", s):
        return False
    try:
        date.fromisoformat(s)
    except ValueError:
        return False
    return True


def ok_range(a: str, b: str) -> bool:
    if not (ok_day(a) and ok_day(b)):
        return False
    n = (date.fromisoformat(b) - date.fromisoformat(a)).days + 1
    return 1 <= n <= RANGE_DAYS_MAX


def ok_timestamp(t: Timestamp) -> bool:
    """google.protobuf.Timestamp's own rules: 0001-01-01..9999-12-31, nanos 0..999,999,999."""
    return (TIMESTAMP_SECONDS_MIN <= t.seconds <= TIMESTAMP_SECONDS_MAX
            and 0 <= t.nanos <= 999_999_999)


def consume_well_formed(r: qpb.ConsumeRequest) -> bool:
    """CONTRACT + decisions: ids, enums (never 0, never unknown), quantity 0..1,000,000, and a
    client timestamp, when given, that is a valid Timestamp."""
    return (ok_id(r.account_id) and ok_text(r.request_id, REQUEST_ID_LEN_MAX)
            and r.region in (1, 2) and r.captcha_type in (1, 2, 3, 4, 5)
            and r.architecture in (1, 2) and r.step in (1, 2)
            and 0 <= r.quantity <= QUANTITY_MAX
            and (not r.scenario_id or ok_id(r.scenario_id))
            and (not r.HasField("client_timestamp") or ok_timestamp(r.client_timestamp)))


# ---------------------------------------------------------------------------- the harness


@dataclass
class Answer:
    code: grpc.StatusCode
    resp: Any = None
    reason: str | None = None
    details: str = ""


def _error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError as exc:  # details disagree with the status code
        raise AssertionError(f"{err.code().name}: inconsistent status details: {exc}") from None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


class Lazy:
    """A failure message built only when an assertion fails (reprs of 4 MiB messages are slow)."""

    def __init__(self, make: Callable[[], str]) -> None:
        self.make = make

    def __str__(self) -> str:
        return self.make()

    __repr__ = __str__


def _short(msg: Any) -> str:
    text = repr(msg)
    return text if len(text) <= 400 else text[:400] + f"... ({len(text):,} chars)"


class Wire:
    """Raw stubs on one channel, a read-only view of the journal, and request counters."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.channel = grpc.insecure_channel(srv.target, options=CHANNEL_OPTIONS)
        self.ql = qpb_grpc.QuotaLedgerStub(self.channel)
        self.acc = apb_grpc.AccountsStub(self.channel)
        self.bill = spb_grpc.SettlementStub(self.channel)
        self.clock = tpb_grpc.TestClockStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.db: Any = None
        self.sent: Counter[str] = Counter()  # generated requests, per RPC
        self.items = 0  # ConsumeBatch / ConsumeStream items inside those requests
        self.now_us = 0

    def method(self, name: str) -> Callable[..., Any]:
        for stub in (self.ql, self.acc, self.bill, self.clock):
            if hasattr(stub, name):
                return getattr(stub, name)
        raise KeyError(name)

    def journal(self) -> int:
        """The journal's entries (a block's consumes one each), read-only."""
        if self.db is None:  # either backend (ServerProcess.read_conn)
            self.db = self.srv.read_conn()
        others = self.db.execute("SELECT count(*) FROM journal"
                                 " WHERE kind NOT IN ('consume', 'consume_block')").fetchone()[0]
        return others + sum(1 for _ in consume_entries(self.db))

    def keys_at(self, seq: int) -> list[tuple[str | None, str | None]]:
        """(account_id, request_id) of each entry stored at seq: one, or a block's items."""
        assert self.db is not None
        entries = [(e[2], e[3]) for e in consume_entries(self.db, "AND seq = ?", (seq,))]
        return entries or self.db.execute(
            "SELECT account_id, request_id FROM journal WHERE seq = ?", (seq,)).fetchall()

    def latest_plan(self) -> str:
        self.journal()
        assert self.db is not None
        row = self.db.execute("SELECT plan_id FROM plans ORDER BY purchase_seq DESC LIMIT 1"
                              ).fetchone()
        return row[0] if row else "plan-0"

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        self.channel.close()

    # ------------------------------------------------------------------ one checked call

    def call(self, name: str, request: Any, *, well_formed: bool | None = None,
             count: bool = True) -> Answer:
        """Send one request; check its status, details and journal accounting."""
        before = self.journal()
        if count:
            self.sent[name] += 1
        try:
            resp = self.method(name)(request, timeout=CALL_TIMEOUT_S)
            ans = Answer(C.OK, resp)
        except grpc.RpcError as err:
            ans = Answer(err.code(), None, None, err.details() or "")
            check_error(err, request, ans, name)
        after = self.journal()
        where = Lazy(lambda: f"{name}({_short(request)}) -> {ans.code.name} {ans.reason} "
                             f"{ans.details[:200]!r}")
        if ans.code is not C.OK:
            assert after == before, f"a refused request changed the journal: {where}"
        else:
            lo, hi = accounted(name, request, ans.resp)
            assert lo <= after - before <= hi, (
                f"journal grew by {after - before}, expected {lo}..{hi}: {where}")
        if well_formed is False:
            assert ans.code is not C.OK, f"malformed request accepted: {where}"
        if well_formed is True:
            assert ans.code is not C.INVALID_ARGUMENT, f"well-formed request refused: {where}"
        return ans

    def quiesce(self) -> None:
        """Wait until nothing is left in the writer: a barrier through its FIFO, twice stable.

        The barrier is a non-billable Consume (R3: V2 step 4.1), which writes nothing."""
        barrier = qpb.ConsumeRequest(account_id="acme", request_id="barrier", region=1,
                                     captcha_type=1, architecture=1, step=2)
        last, stable = -1, 0
        while stable < 2:
            try:
                self.ql.Consume(barrier, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as err:
                assert err.code() is C.FAILED_PRECONDITION, err  # acme suspended: still FIFO
            now = self.journal()
            stable = stable + 1 if now == last else 0
            last = now


def check_error(err: grpc.RpcError, request: Any, ans: Answer, name: str) -> None:
    code = ans.code
    where = Lazy(lambda: f"{name}({_short(request)}) -> {code.name} {ans.details[:300]!r}")
    assert code in CONTRACT_CODES, f"status outside the contract: {where}"
    info = _error_info(err)
    if info is None:
        assert code is C.RESOURCE_EXHAUSTED and request.ByteSize() > MESSAGE_BYTES_MAX, (
            f"non-OK status without google.rpc.ErrorInfo: {where}")
        return
    ans.reason = info.reason
    assert REASON_RE.match(info.reason), f"reason {info.reason!r} is not UPPER_SNAKE: {where}"
    if code is C.UNAVAILABLE:
        assert info.reason in OVERLOAD_REASONS, f"UNAVAILABLE that is not overload: {where}"


def check_item_error(e: Any, where: Lazy) -> None:
    """A ConsumeBatch / ConsumeStream item error: a contract code and an UPPER_SNAKE reason."""
    code = next((c for c in C if c.value[0] == e.code), None)
    assert code in CONTRACT_CODES and code is not C.OK, f"item code {e.code}: {where}"
    assert REASON_RE.match(e.reason), f"item reason {e.reason!r}: {where}"
    if code is C.UNAVAILABLE:
        assert e.reason in OVERLOAD_REASONS, f"item UNAVAILABLE not overload: {where}"


def new_entry(req: qpb.ConsumeRequest, resp: qpb.ConsumeResponse) -> bool:
    """Did this answered Consume write a journal entry (billable, first time, not dry)?"""
    return resp.billable and not resp.replayed and not req.dry_run


def accounted(name: str, request: Any, resp: Any) -> tuple[int | float, int | float]:
    """The journal growth an accepted request accounts for: (least, most)."""
    if name == "Consume":
        n = int(new_entry(request, resp))
        return n, n
    if name == "ConsumeBatch":
        n = sum(new_entry(q, r.response) for q, r in zip(request.requests, resp.results,
                                                          strict=True)
                if r.WhichOneof("outcome") == "response")
        return n, n
    if name == "CreateAccount":
        return 1, 1
    if name in ("TopUp", "UpdateFeatures", "PurchasePlan", "RefundPlan", "Reactivate"):
        return 0, 1  # 0 for a replay (R12)
    if name in ("SettleDay", "SetTime", "AdvanceTime"):
        return 0, math.inf  # settlements, expiries and suspensions that fell due (R17, R9)
    return 0, 0  # queries


def _unary(wire: Wire, name: str, request: Any) -> Any:
    """Unchecked setup call (seeding), outside the counted requests."""
    return wire.method(name)(request, timeout=CALL_TIMEOUT_S)


def check_results(wire: Wire, reqs: list[qpb.ConsumeRequest], results: list[qpb.ConsumeResult],
                  *, complete: bool) -> int:
    """Batch / stream results: one per request, in order, each bad item failing alone; every
    new entry is journaled under its own key. Returns how many new entries were answered."""
    if complete:
        assert len(results) == len(reqs), (len(results), len(reqs))
    seqs = []
    for req, res in zip(reqs, results, strict=False):
        where = Lazy(lambda req=req, res=res: f"item {_short(req)} -> {_short(res)}")
        assert res.request_id == req.request_id, where
        if res.WhichOneof("outcome") == "error":
            check_item_error(res.error, where)
            refused = res.error.code == C.INVALID_ARGUMENT.value[0]
            assert consume_well_formed(req) != refused, where
        else:
            assert res.WhichOneof("outcome") == "response", where
            assert consume_well_formed(req), f"malformed item accepted: {where}"
            if new_entry(req, res.response):
                key = (req.account_id, req.request_id)
                seqs.append((res.response.journal_seq, *key))
                assert key in wire.keys_at(res.response.journal_seq), where
    assert len(seqs) == len(set(seqs)), "two items claimed one journal entry"
    return len(seqs)
