"""The Accounts servicer: accounts, funds, features, plans, and the runway (issue 22)."""

from __future__ import annotations

from typing import Any

from quota_ledger.v1 import accounts_pb2 as apb
from quota_ledger.v1 import accounts_pb2_grpc as apb_grpc
from quota_ledger.v1 import common_pb2 as pb

from ledger import model as m
from ledger import runway as rw
from ledger import store as q
from ledger.engine import Replayed
from ledger.errors import FailedPrecondition, InvalidArgument, NotFound

from . import convert
from .errors import rpc
from .services import Context

LIST_ACCOUNTS_PAGE_DEFAULT = 100
LIST_ACCOUNTS_PAGE_MAX = 1_000
NOTICE_ID_LEN_MAX = 400  # kind/account/fact


def _account_reply(result: Any) -> pb.Account:
    return convert.account(result.value if isinstance(result, Replayed) else result)


class AccountsService(apb_grpc.AccountsServicer):
    SERVICE = "Accounts"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @rpc
    async def CreateAccount(self, request, context):  # noqa: N802
        cmd = m.CreateAccount(
            m.check_id(request.account_id, "account_id"),
            m.check_text(request.display_name, "display_name", m.DISPLAY_NAME_LEN_MAX,
                         allow_empty=True))
        return _account_reply(await self.ctx.write(cmd))

    @rpc
    async def GetAccount(self, request, context):  # noqa: N802
        return convert.account(self.ctx.account(request.account_id))

    @rpc
    async def TopUp(self, request, context):  # noqa: N802
        cmd = m.TopUp(m.check_id(request.account_id, "account_id"),
                      m.check_request_id(request.request_id),
                      m.parse_enum(m.FundsKind, request.kind, "kind"),
                      m.check_amount(request.amount_micros))
        return _account_reply(await self.ctx.write(cmd))

    @rpc
    async def UpdateFeatures(self, request, context):  # noqa: N802
        if len(request.scenario_ids) > m.SCENARIOS_PER_ACCOUNT_MAX:
            raise InvalidArgument(
                f"at most {m.SCENARIOS_PER_ACCOUNT_MAX} scenarios; got {len(request.scenario_ids)}")
        ids = tuple(m.check_id(s, "scenario_ids[]", m.SCENARIO_ID_LEN_MAX)
                    for s in request.scenario_ids)
        if len(set(ids)) != len(ids):
            raise InvalidArgument("scenario_ids lists the same scenario twice")
        cmd = m.UpdateFeatures(m.check_id(request.account_id, "account_id"),
                               m.check_request_id(request.request_id), ids,
                               request.custom_policy_enabled)
        return _account_reply(await self.ctx.write(cmd))

    @rpc
    async def ListPlanSpecs(self, request, context):  # noqa: N802
        return apb.ListPlanSpecsResponse(
            specs=[convert.plan_spec(s) for s in self.ctx.catalog.values()])

    @rpc
    async def PurchasePlan(self, request, context):  # noqa: N802
        cmd = m.PurchasePlan(m.check_id(request.account_id, "account_id"),
                             m.check_request_id(request.request_id),
                             m.check_id(request.spec_id, "spec_id"))
        return self._plan_reply(await self.ctx.write(cmd))

    @rpc
    async def RefundPlan(self, request, context):  # noqa: N802
        cmd = m.RefundPlan(m.check_id(request.plan_id, "plan_id"),
                           m.check_request_id(request.request_id),
                           m.check_text(request.reason, "reason", m.REASON_LEN_MAX,
                                        allow_empty=True))
        return self._plan_reply(await self.ctx.write(cmd))

    @rpc
    async def Reactivate(self, request, context):  # noqa: N802
        cmd = m.Reactivate(m.check_id(request.account_id, "account_id"),
                           m.check_request_id(request.request_id))
        return _account_reply(await self.ctx.write(cmd))

    @rpc
    async def ListAccounts(self, request, context):  # noqa: N802
        prefix = m.check_text(request.prefix, "prefix", m.ACCOUNT_ID_LEN_MAX, allow_empty=True)
        after = m.check_text(request.page_token, "page_token", m.ACCOUNT_ID_LEN_MAX,
                             allow_empty=True)
        size = _page_size(request.page_size)
        allowed = None
        if self.ctx.auth.enabled:  # a token limited to accounts lists only those
            allowed = self.ctx.auth.authenticate(context.invocation_metadata()).accounts
        conn = self.ctx.reader()
        if allowed is None:
            found = q.read_accounts(conn, prefix, after, size + 1)
        else:
            ids = sorted(a for a in allowed if a.startswith(prefix) and a > after)
            found = [a for i in ids[:size + 1] if (a := q.read_account(conn, i)) is not None]
        more = len(found) > size
        page = found[:size]
        return apb.ListAccountsResponse(
            accounts=[convert.account(a) for a in page],
            next_page_token=page[-1].account_id if more else "")

    @rpc
    async def GetRunway(self, request, context):  # noqa: N802
        """docs/runway.md: the account, its plans and its window's usage read in one
        snapshot, projected by ``ledger.runway``."""
        wanted = request.window_days or rw.RUNWAY_WINDOW_DAYS_DEFAULT
        if not 1 <= wanted <= rw.RUNWAY_WINDOW_DAYS_MAX:
            raise InvalidArgument(
                f"window_days must be 1..{rw.RUNWAY_WINDOW_DAYS_MAX} (0 means "
                f"{rw.RUNWAY_WINDOW_DAYS_DEFAULT}); got {request.window_days}")
        now = self.ctx.clock.now_us()
        with self.ctx.store.snapshot() as conn:  # status, plans and usage of one moment
            acct = self.ctx.account(request.account_id, conn)
            account_id = acct.account_id
            plans = q.read_plans(conn, "WHERE account_id = ? AND refunded_at_us IS NULL"
                                 " AND units_remaining > 0 AND expires_at_us > ?",
                                 (account_id, now))
            window = q.read_runway_window(conn, account_id, acct.created_at, now, wanted)
        return convert.runway(account_id, rw.project(now, acct.status, window, plans))

    @rpc
    async def ListNotices(self, request, context):  # noqa: N802
        """docs/notices.md: the outbox in (instant, id) order, a page at a time, with each
        webhook delivery's state when this node delivers."""
        account_id = (self.ctx.account(request.account_id).account_id
                      if request.account_id else None)
        since = convert.from_ts(request.since, "since") if request.HasField("since") else 0
        size = _page_size(request.page_size)
        after = _notice_cursor(request.page_token)
        queue = self.ctx.notices
        conn = self.ctx.reader()
        if request.undelivered_only:
            ids = [] if queue is None else queue.undelivered(account_id, since, after, size + 1)
            rows = q.read_notices_by_id(conn, ids)
        else:
            rows = q.read_notices(conn, account_id, since, after, size + 1)
        page = rows[:size]
        states = {} if queue is None else queue.of_notices([r[0] for r in page])
        return apb.ListNoticesResponse(
            notices=[convert.notice(r, states.get(r[0], [])) for r in page],
            next_page_token=f"{page[-1][3]}/{page[-1][0]}" if len(rows) > size else "")

    @rpc
    async def ResendNotice(self, request, context):  # noqa: N802
        notice_id = m.check_text(request.notice_id, "notice_id", NOTICE_ID_LEN_MAX)
        rows = q.read_notices_by_id(self.ctx.reader(), [notice_id])
        if not rows:
            raise NotFound(f"no notice {notice_id!r}", reason="NOTICE_NOT_FOUND")
        queue = self.ctx.notices
        if queue is None:
            raise FailedPrecondition("no webhook is configured on this node (--notices)",
                                     reason="NO_WEBHOOK")
        queue.resend(notice_id, self.ctx.delivery_clock())
        return convert.notice(rows[0], queue.of_notices([notice_id]).get(notice_id, []))

    def _plan_reply(self, result: Any) -> pb.Plan:
        plan = result.value if isinstance(result, Replayed) else result
        return convert.plan(plan, self.ctx.clock.now_us())


def _page_size(asked: int) -> int:
    """A page size of ListAccounts or ListNotices: 0 means the default."""
    size = asked or LIST_ACCOUNTS_PAGE_DEFAULT
    if not 1 <= size <= LIST_ACCOUNTS_PAGE_MAX:
        raise InvalidArgument(f"page_size must be 1..{LIST_ACCOUNTS_PAGE_MAX} (0 means "
                              f"{LIST_ACCOUNTS_PAGE_DEFAULT}); got {asked}")
    return size


def _notice_cursor(token: str) -> tuple[int, str] | None:
    """A ListNotices page token: "<at_us>/<notice_id>" of the previous page's last notice."""
    if not token:
        return None
    at, _, notice_id = token.partition("/")
    if not at.isdigit() or not notice_id or len(token) > NOTICE_ID_LEN_MAX + 20:
        raise InvalidArgument("page_token is not one that ListNotices gave")
    return int(at), notice_id
