"""The gRPC servicers: convert, submit to the writer or read committed state, convert back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from quota_ledger.v1 import common_pb2 as pb
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import quota_ledger_pb2_grpc as qpb_grpc
from quota_ledger.v1 import settlement_pb2 as spb
from quota_ledger.v1 import settlement_pb2_grpc as spb_grpc
from quota_ledger.v1 import test_clock_pb2 as tpb
from quota_ledger.v1 import test_clock_pb2_grpc as tpb_grpc

from ledger import calendar as cal
from ledger import model as m
from ledger import store as q
from ledger.consume_group import ConsumeRows, GroupResult
from ledger.errors import InvalidArgument, LedgerError, NotFound
from ledger.writer import Writer, unwrap

from . import convert
from .auth import Authorizer
from .errors import error_message, rpc, to_status
from .metrics import Metrics

STREAM_IN_FLIGHT_MAX = 1_024  # per ConsumeStream: messages read and not yet answered
STREAM_BATCHES_IN_FLIGHT = 2  # per ConsumeStream: batches at the writer at once
USAGE_RANGE_DAYS_MAX = 366
_FULL_VIEWS = (qpb.CONSUME_BATCH_VIEW_UNSPECIFIED, qpb.CONSUME_BATCH_VIEW_FULL)
# The test clock moves at most this far per call: everything due on the way (a settlement per
# day, expiries, suspensions) runs before the call returns, so the step is bounded.
ADVANCE_SECONDS_MAX = 3 * 366 * 86_400


class Context:
    """What every servicer shares: the writer, the store and the clock."""

    def __init__(self, writer: Writer, clock: Any, catalog: dict[str, m.PlanSpec],
                 metrics: Metrics, auth: Authorizer) -> None:
        self.auth = auth
        self.writer = writer
        self.metrics = metrics
        self.store = writer.engine.store
        self.clock = clock
        self.catalog = catalog
        self.draining = False  # SIGTERM: every new call is answered UNAVAILABLE (server/app.py)
        self.notices: Any = None  # the delivery queue when webhooks are configured (issue 22)
        self.delivery_clock: Any = time.time  # wall time of webhook deliveries

    async def write(self, cmd: Any) -> Any:
        return unwrap(await self.writer.submit_async(cmd))

    def reader(self):  # noqa: ANN201
        return self.store.reader()

    def account(self, account_id: str, conn: Any = None) -> m.AccountState:
        """The account, read from ``conn`` (a snapshot) or the committed state; NOT_FOUND
        when there is none."""
        m.check_id(account_id, "account_id")
        acct = q.read_account(conn if conn is not None else self.reader(), account_id)
        if acct is None:
            raise NotFound(f"no account {account_id!r}", reason="ACCOUNT_NOT_FOUND",
                           account_id=account_id)
        return acct


def _error(msg: qpb.ConsumeResult, exc: LedgerError) -> None:
    msg.error.CopyFrom(pb.Error(**error_message(exc)))


def _count_rows(metrics: Metrics, rows: list[tuple], out: GroupResult) -> None:
    """The units a consume group recorded, per region and kind: one counter update each,
    not per request (refused, replayed and dry-run requests record nothing)."""
    plan_units = [0, 0, 0]
    payg_units = [0, 0, 0]
    for row, billable, replayed, payg in zip(rows, out.billable, out.replayed, out.payg_units,
                                             strict=True):
        if billable and not replayed and not row[8]:
            plan_units[row[2]] += row[7] - payg
            payg_units[row[2]] += payg
    for region in (1, 2):
        if plan_units[region] or payg_units[region]:
            metrics.on_consume(region, plan_units[region], payg_units[region])


def _validated(requests: Any) -> tuple[ConsumeRows, list[int], list[tuple[int, LedgerError]]]:
    """A batch's items as consume rows; one bad item fails alone. ``where``: the index in
    the batch of each row (empty when no item was refused: then row j is item j)."""
    at_once = convert.consume_rows(requests)
    if at_once is not None:  # every item valid: the common case, checked column by column
        return ConsumeRows(at_once), [], []
    rows, refused = ConsumeRows(), []
    row = convert.consume_row
    append = rows.append
    for i, req in enumerate(requests):
        try:
            append(row(req))
        except LedgerError as exc:
            refused.append((i, exc))
    bad = {i for i, _ in refused}
    where = [i for i in range(len(requests)) if i not in bad] if bad else []
    return rows, where, refused


def _compact(n: int, where: list[int], out: GroupResult,
             refused: list[tuple[int, LedgerError]], at_us: int) -> qpb.CompactResults:
    """A batch's answer in columns (CONTRACT, 2026-11-29): the group's own columns handed
    to the repeated fields at once, no message per item; an IndexedError only per failed
    item."""
    failed = list(refused)
    if where:  # some items were refused before the group: scatter the group's columns
        billable, replayed, units, micros = [False] * n, [False] * n, [0] * n, [0] * n
        for j, i in enumerate(where):
            billable[i], replayed[i] = out.billable[j], out.replayed[j]
            units[i], micros[i] = out.payg_units[j], out.payg_micros[j]
        failed += [(where[j], exc) for j, exc in out.errors.items()]
    else:
        billable, replayed, units, micros = (out.billable, out.replayed, out.payg_units,
                                             out.payg_micros)
        failed += out.errors.items()
    codes = [0] * n
    errors = []
    for i, exc in sorted(failed, key=lambda f: f[0]):
        fields = error_message(exc)
        codes[i] = fields["code"]
        errors.append(qpb.IndexedError(index=i, error=pb.Error(**fields)))
    return qpb.CompactResults(codes=codes, billable=billable, replayed=replayed,
                              payg_units=units, payg_amount_micros=micros, errors=errors,
                              billing_day=cal.billing_day(at_us), recorded_at=convert.ts(at_us))


def _full(requests: Any, where: list[int], out: GroupResult,
          refused: list[tuple[int, LedgerError]]) -> qpb.ConsumeBatchResponse:
    """A batch's answer as one ConsumeResult per item, filled in place."""
    response = qpb.ConsumeBatchResponse()
    add = response.results.add
    refused_at = dict(refused)
    group_errors = out.errors
    fill = convert.fill_group_response
    template = convert.group_template(out)
    j = 0
    for i, req in enumerate(requests):
        msg = add()
        msg.request_id = req.request_id
        exc = refused_at.get(i) if refused_at else None
        if exc is None:
            exc = group_errors.get(j) if group_errors else None
            if exc is None:
                fill(msg.response, req.request_id, out, j, template)
            j += 1
        if exc is not None:
            _error(msg, exc)
    return response


def _day_range(from_day: str, to_day: str) -> list[str]:
    days = cal.days_between(from_day, to_day)
    if not days:
        raise InvalidArgument(f"from_day {from_day} is after to_day {to_day}")
    if len(days) > USAGE_RANGE_DAYS_MAX:
        raise InvalidArgument(f"a range covers at most {USAGE_RANGE_DAYS_MAX} days")
    return days


class QuotaLedgerService(qpb_grpc.QuotaLedgerServicer):
    SERVICE = "QuotaLedger"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @rpc
    async def Consume(self, request, context):  # noqa: N802
        # The lean path (issue 18): the request as a row of plain values; the writer runs
        # every single Consume of a commit group as one consume group, and the reply is
        # filled from that group's columns (no command, outcome or result objects).
        row = convert.consume_row(request)
        writer = self.ctx.writer
        out, j = writer.consume_now(row) or await writer.submit_async(row)  # now: 1 in flight
        if out.errors:
            exc = out.errors.get(j)
            if exc is not None:
                raise exc
        if out.billable[j] and not out.replayed[j] and not row[8]:
            payg = out.payg_units[j]
            self.ctx.metrics.on_consume(row[2], row[7] - payg, payg)
        return convert.fill_group_response(qpb.ConsumeResponse(), row[1], out, j)

    @rpc
    async def ConsumeBatch(self, request, context):  # noqa: N802
        requests = request.requests
        n = len(requests)
        if n > m.BATCH_SIZE_MAX:
            raise InvalidArgument(f"a batch holds at most {m.BATCH_SIZE_MAX:,} requests; got {n:,}")
        compact = request.view == qpb.CONSUME_BATCH_VIEW_COMPACT
        if not compact and request.view not in _FULL_VIEWS:
            raise InvalidArgument(f"view must be a ConsumeBatchView; got {request.view}")
        rows, where, refused = _validated(requests)
        out = await self.ctx.writer.submit_async(rows) if rows else GroupResult(0)
        _count_rows(self.ctx.metrics, rows, out)
        if compact:
            return qpb.ConsumeBatchResponse(compact=_compact(
                n, where, out, refused, out.at_us or self.ctx.clock.now_us()))
        return _full(requests, where, out, refused)

    async def ConsumeStream(self, request_iterator, context):  # noqa: N802
        """Results in request order. Messages that arrive while earlier ones are being
        committed travel to the writer together as one batch (one future, one hop), so a
        stream costs little more per message than the transport itself."""
        auth = self.ctx.auth
        try:
            principal = auth.authenticate(context.invocation_metadata())
            auth.check_role(principal, "QuotaLedger/ConsumeStream")
        except LedgerError as exc:
            await context.abort_with_status(to_status(exc))
        ready: asyncio.Queue[tuple[list[tuple[str, Any, Any]], Any] | None] = asyncio.Queue()
        buf: list[tuple[str, Any, Any]] = []  # (request_id, consume row, error if refused)
        space = asyncio.Semaphore(STREAM_IN_FLIGHT_MAX)  # messages read, not yet answered
        in_flight = 0

        def flush() -> None:
            nonlocal in_flight
            if not buf:
                return
            items = buf[:]
            buf.clear()
            rows = ConsumeRows(row for _, row, _ in items if row is not None)
            fut: Any = None
            if rows:
                try:
                    fut = self.ctx.writer.submit_async(rows)
                    in_flight += 1
                except LedgerError as exc:  # overloaded or shutting down: these fail alone
                    items = [(rid, None, refused or exc) for rid, _, refused in items]
            ready.put_nowait((items, fut))

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await space.acquire()
                    try:
                        if auth.enabled:
                            auth.check_accounts(principal, "QuotaLedger/ConsumeStream",
                                                [req.account_id])
                        buf.append((req.request_id, convert.consume_row(req), None))
                    except LedgerError as exc:
                        buf.append((req.request_id, None, exc))
                    if in_flight < STREAM_BATCHES_IN_FLIGHT or len(buf) >= m.BATCH_SIZE_MAX:
                        flush()
            finally:
                flush()
                ready.put_nowait(None)

        reader = asyncio.create_task(read())
        metrics = self.ctx.metrics
        try:
            while (item := await ready.get()) is not None:
                items, fut = item
                out = GroupResult(0)
                if fut is not None:
                    out = await fut
                    in_flight -= 1
                    flush()  # what arrived while this batch was being committed
                    _count_rows(metrics, [row for _, row, _ in items if row is not None], out)
                j = failed = 0
                answered = 0  # counted before each yield, as a caller may stop reading
                try:
                    for request_id, _row, exc in items:
                        msg = qpb.ConsumeResult(request_id=request_id)
                        if exc is None:
                            exc = out.errors.get(j)
                            if exc is None:
                                convert.fill_group_response(msg.response, request_id, out, j)
                            j += 1
                        if exc is not None:
                            _error(msg, exc)
                            failed += 1
                        answered += 1
                        space.release()
                        yield msg
                finally:
                    metrics.count_items("ConsumeStream.item", answered - failed, failed)
            await reader
        finally:
            reader.cancel()

    @rpc
    async def GetRemaining(self, request, context):  # noqa: N802
        acct = self.ctx.account(request.account_id)
        now = self.ctx.clock.now_us()
        day = cal.billing_day(now)
        with self.ctx.store.snapshot() as conn:  # plans and usage of one moment (issue 23)
            plans = [p for p in q.read_plans(
                conn, "WHERE account_id = ? AND refunded_at_us IS NULL"
                " AND units_remaining > 0 AND expires_at_us > ?", (acct.account_id, now))
                if p.can_offset_at(now)]
            payg, _ = q.read_usage(conn, acct.account_id, day, day)
        return qpb.GetRemainingResponse(
            plans=[convert.plan(p, now) for p in plans],
            units_remaining_total=sum(p.units_remaining for p in plans),
            payg_units=sum(r[2] for r in payg), payg_amount_micros=sum(r[3] for r in payg),
            billing_day=day)

    @rpc
    async def ListPlans(self, request, context):  # noqa: N802
        acct = self.ctx.account(request.account_id)
        now = self.ctx.clock.now_us()
        plans = q.read_plans(self.ctx.reader(), "WHERE account_id = ?", (acct.account_id,))
        if not request.include_inactive:
            plans = [p for p in plans if p.status_at(now) is m.PlanStatus.ACTIVE]
        return qpb.ListPlansResponse(plans=[convert.plan(p, now) for p in plans])

    @rpc
    async def GetUsage(self, request, context):  # noqa: N802
        acct = self.ctx.account(request.account_id)
        days = _day_range(request.from_day, request.to_day)
        with self.ctx.store.snapshot() as conn:  # payg and offsets of one moment
            payg, offsets = q.read_usage(conn, acct.account_id, days[0], days[-1])
        rows = {d: qpb.UsageDay(billing_day=d) for d in days}
        for day, region, units, micros in payg:
            rows[day].payg.append(qpb.RegionUsage(region=region, units=units,
                                                  amount_micros=micros))
        for day, plan_id, units in offsets:
            rows[day].plan_units.append(pb.PlanUnits(plan_id=plan_id, units=units))
        return qpb.GetUsageResponse(days=list(rows.values()))


class SettlementService(spb_grpc.SettlementServicer):
    SERVICE = "Settlement"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @rpc
    async def SettleDay(self, request, context):  # noqa: N802
        cal.parse_day(request.billing_day)
        bills = await self.ctx.write(m.SettleDay(request.billing_day))
        return spb.SettleDayResponse(bills=[convert.bill(b) for b in bills])

    @rpc
    async def GetBill(self, request, context):  # noqa: N802
        acct = self.ctx.account(request.account_id)
        cal.parse_day(request.billing_day)
        found = q.read_bills(self.ctx.reader(), "WHERE account_id = ? AND day = ?",
                             (acct.account_id, request.billing_day))
        if not found:
            raise NotFound(f"no bill for {acct.account_id!r} on {request.billing_day} (a bill "
                           "exists only for a settled day with activity, R18)",
                           reason="BILL_NOT_FOUND", account_id=acct.account_id)
        return convert.bill(found[0])

    @rpc
    async def ListBills(self, request, context):  # noqa: N802
        acct = self.ctx.account(request.account_id)
        days = _day_range(request.from_day, request.to_day)
        found = q.read_bills(self.ctx.reader(), "WHERE account_id = ? AND day BETWEEN ? AND ?",
                             (acct.account_id, days[0], days[-1]))
        return spb.ListBillsResponse(bills=[convert.bill(b) for b in found])


class TestClockService(tpb_grpc.TestClockServicer):
    """Served only with --test-clock (CONTRACT)."""

    __test__ = False
    SERVICE = "TestClock"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @rpc
    async def GetTime(self, request, context):  # noqa: N802
        return tpb.TimeResponse(now=convert.ts(self.ctx.clock.now_us()))

    @rpc
    async def SetTime(self, request, context):  # noqa: N802
        if not request.HasField("now"):
            raise InvalidArgument("now is required")
        return await self._advance(convert.from_ts(request.now, "now"))

    @rpc
    async def AdvanceTime(self, request, context):  # noqa: N802
        if not 0 <= request.seconds <= ADVANCE_SECONDS_MAX:
            raise InvalidArgument(
                f"seconds must be between 0 and {ADVANCE_SECONDS_MAX:,} (time never goes "
                f"backwards); got {request.seconds}")
        return await self._advance(self.ctx.clock.now_us() + request.seconds * 1_000_000)

    async def _advance(self, to_us: int) -> tpb.TimeResponse:
        if to_us - self.ctx.clock.now_us() > ADVANCE_SECONDS_MAX * 1_000_000:
            raise InvalidArgument(
                f"the test clock moves at most {ADVANCE_SECONDS_MAX:,} seconds (3 years) per "
                "call, since everything due on the way runs before it returns")
        if to_us < self.ctx.clock.now_us():
            raise InvalidArgument(
                f"the ledger's time never goes backwards (R2): {convert.ts(to_us).ToJsonString()}"
                f" is before {convert.ts(self.ctx.clock.now_us()).ToJsonString()}")
        now = await self.ctx.write(m.AdvanceClock(to_us))
        return tpb.TimeResponse(now=convert.ts(now))

