"""The ledger's calls as typed methods: request building shared by the sync and asyncio
clients; each client's ``_call`` decides how a request travels."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from quota_ledger.v1 import accounts_pb2 as apb
from quota_ledger.v1 import common_pb2 as pb
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import settlement_pb2 as spb
from quota_ledger.v1 import test_clock_pb2 as tpb

from clients.breaker import CircuitBreaker
from clients.failopen import check_budget, is_gate, unreachable
from clients.spool import Spool
from clients.wire import RETRYABLE, LedgerError, enum_value, new_request_id, timestamp

# Codes that mean "the ledger could not be reached" once retries are spent (and a CANCELLED
# the caller did not cause, see _cancelled_by_server): spooled, and failures for the breaker.
SPOOLABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


# Prebuilt ConsumeRequests holding only the four enums, by the names callers gave: a copy of
# one and three fields set is far cheaper than resolving four names and building from keyword
# arguments on every consume(). Only names are kept (valid ones), so this stays small.
_CONSUME_TEMPLATES: dict[tuple[Any, ...], qpb.ConsumeRequest] = {}
_TEMPLATES_MAX = 1_024


def _consume_template(region: int | str, captcha_type: int | str, architecture: int | str,
                      step: int | str) -> qpb.ConsumeRequest:
    key = (region, captcha_type, architecture, step)
    template = _CONSUME_TEMPLATES.get(key)  # only names are stored: a hit is all names
    if template is not None:
        return template
    template = qpb.ConsumeRequest(
        region=enum_value(pb.Region, region),
        captcha_type=enum_value(pb.CaptchaType, captcha_type),
        architecture=enum_value(pb.ClientArchitecture, architecture),
        step=enum_value(pb.VerificationStep, step))
    if all(type(v) is str for v in key) and len(_CONSUME_TEMPLATES) < _TEMPLATES_MAX:
        _CONSUME_TEMPLATES[key] = template
    return template


class LedgerApi:
    """Request building and the retry and fail-open decisions shared by both clients;
    ``_call`` decides sync or async."""

    timeout_s: float
    retries: int
    spool: Spool | None = None
    breaker: CircuitBreaker | None = None
    budget_s: float | None = None  # a consume()'s latency budget, with a spool (issue 21)
    _closing = False

    def _call(self, stub: str, method: str, request: Any, *, retry: bool = True) -> Any:
        raise NotImplementedError

    def _may_retry(self, retry: bool, attempt: int, exc: LedgerError, deadline: float,
                   pause: float) -> bool:
        """Retry only what was not applied or is replayable (R12), within one budget. A
        CANCELLED the caller did not cause (a server shutting down) counts as UNAVAILABLE."""
        code_ok = exc.code in RETRYABLE or self._cancelled_by_server(exc)
        return (retry and code_ok and attempt < self.retries
                and time.monotonic() + pause < deadline)

    def _gate(self) -> None:
        """With the breaker open, no network attempt: UNAVAILABLE (LEDGER_UNREACHABLE) at
        once; a consume() spools it (issue 21)."""
        if self.breaker is not None and not self.breaker.allow():
            raise unreachable(self.breaker)

    def _deadline(self, method: str, budget_s: float | None) -> float:
        """One deadline for every attempt: ``timeout_s``, or a consume()'s budget with a
        spool when that is sooner."""
        limit = self.timeout_s
        if method == "Consume" and self.spool is not None:
            budget = self.budget_s if budget_s is None else check_budget(budget_s)
            limit = min(limit, budget) if budget is not None else limit
        return time.monotonic() + limit

    def _noted(self, exc: LedgerError | None) -> None:
        """Tell the breaker how a call that reached the network ended: unreachable
        (UNAVAILABLE, DEADLINE_EXCEEDED, the budget spent) or answered (anything else)."""
        if self.breaker is None or (exc is not None and is_gate(exc)):
            return
        if exc is not None and (exc.code in SPOOLABLE or self._cancelled_by_server(exc)):
            self.breaker.failed(exc.code.name)
        else:
            self.breaker.succeeded()

    def _spoolable(self, request: qpb.ConsumeRequest, exc: LedgerError) -> bool:
        """Fail open (R26): the ledger could not be reached, retries are spent, a spool is
        configured, and the request would change something."""
        return (self.spool is not None and not request.dry_run and not self._closing
                and (exc.code in SPOOLABLE or self._cancelled_by_server(exc)))

    def _cancelled_by_server(self, exc: LedgerError) -> bool:
        """CANCELLED from gRPC itself (no ErrorInfo) while this client is open: a server
        shutting down, not the caller."""
        return (exc.code is grpc.StatusCode.CANCELLED and exc.reason == exc.code.name
                and not self._closing)

    def _observed(self, request: qpb.ConsumeRequest) -> qpb.ConsumeRequest:
        """With a spool, every request carries client_observed_at from its first send, so a
        replay is the same content under the same key (R12, R26)."""
        if self.spool is not None and not request.HasField("client_observed_at"):
            request.client_observed_at.GetCurrentTime()
        return request

    # --- QuotaLedger
    @staticmethod
    def consume_request(account_id: str, *, region: int | str = "mainland",
                        captcha_type: int | str = "slider", architecture: int | str = "v2",
                        step: int | str = "3", quantity: int = 1,
                        request_id: str | None = None, scenario_id: str | None = None,
                        dry_run: bool = False,
                        client_observed_at: datetime | Timestamp | None = None
                        ) -> qpb.ConsumeRequest:
        req = qpb.ConsumeRequest()
        req.CopyFrom(_consume_template(region, captcha_type, architecture, step))
        req.account_id, req.request_id = account_id, request_id or new_request_id()
        req.quantity = quantity
        if dry_run:
            req.dry_run = dry_run
        if scenario_id is not None:
            req.scenario_id = scenario_id
        if client_observed_at is not None:
            req.client_observed_at.CopyFrom(timestamp(client_observed_at))
        return req

    def consume_batch(self, requests: Iterable[qpb.ConsumeRequest]) -> Any:
        return self._call("ledger", "ConsumeBatch",
                          qpb.ConsumeBatchRequest(requests=list(requests)))

    def get_remaining(self, account_id: str) -> Any:
        return self._call("ledger", "GetRemaining", qpb.GetRemainingRequest(account_id=account_id))

    def list_plans(self, account_id: str, include_inactive: bool = False) -> Any:
        return self._call("ledger", "ListPlans", qpb.ListPlansRequest(
            account_id=account_id, include_inactive=include_inactive))

    def get_usage(self, account_id: str, from_day: str, to_day: str) -> Any:
        return self._call("ledger", "GetUsage", qpb.GetUsageRequest(
            account_id=account_id, from_day=from_day, to_day=to_day))

    # --- Accounts
    def create_account(self, account_id: str, display_name: str = "") -> Any:
        return self._call("accounts", "CreateAccount", apb.CreateAccountRequest(
            account_id=account_id, display_name=display_name), retry=False)

    def get_account(self, account_id: str) -> Any:
        return self._call("accounts", "GetAccount", apb.GetAccountRequest(account_id=account_id))

    def get_runway(self, account_id: str, window_days: int = 0) -> Any:
        """How long the plans last at the recent rate (docs/runway.md; 0: a 7-day window)."""
        return self._call("accounts", "GetRunway", apb.GetRunwayRequest(
            account_id=account_id, window_days=window_days))

    def list_notices(self, account_id: str = "", *, since: datetime | None = None,
                     undelivered_only: bool = False, page_size: int = 0,
                     page_token: str = "") -> Any:
        """One page of notices, oldest first (docs/notices.md)."""
        req = apb.ListNoticesRequest(account_id=account_id, undelivered_only=undelivered_only,
                                     page_size=page_size, page_token=page_token)
        if since is not None:
            req.since.FromDatetime(since)
        return self._call("accounts", "ListNotices", req)

    def resend_notice(self, notice_id: str) -> Any:
        return self._call("accounts", "ResendNotice",
                          apb.ResendNoticeRequest(notice_id=notice_id), retry=False)

    def list_accounts(self, prefix: str = "", page_size: int = 0, page_token: str = "") -> Any:
        """One page of accounts by id (page_size 0 means the ledger's default)."""
        return self._call("accounts", "ListAccounts", apb.ListAccountsRequest(
            prefix=prefix, page_size=page_size, page_token=page_token))

    def top_up(self, account_id: str, amount_micros: int, kind: int | str = "cash",
               request_id: str | None = None) -> Any:
        return self._call("accounts", "TopUp", apb.TopUpRequest(
            account_id=account_id, request_id=request_id or new_request_id(),
            kind=enum_value(pb.FundsKind, kind), amount_micros=amount_micros))

    def update_features(self, account_id: str, scenario_ids: Iterable[str],
                        custom_policy_enabled: bool, request_id: str | None = None) -> Any:
        return self._call("accounts", "UpdateFeatures", apb.UpdateFeaturesRequest(
            account_id=account_id, request_id=request_id or new_request_id(),
            scenario_ids=list(scenario_ids), custom_policy_enabled=custom_policy_enabled))

    def reactivate(self, account_id: str, request_id: str | None = None) -> Any:
        return self._call("accounts", "Reactivate", apb.ReactivateRequest(
            account_id=account_id, request_id=request_id or new_request_id()))

    def list_plan_specs(self) -> Any:
        return self._call("accounts", "ListPlanSpecs", apb.ListPlanSpecsRequest())

    def purchase_plan(self, account_id: str, spec_id: str, request_id: str | None = None) -> Any:
        return self._call("accounts", "PurchasePlan", apb.PurchasePlanRequest(
            account_id=account_id, request_id=request_id or new_request_id(), spec_id=spec_id))

    def refund_plan(self, plan_id: str, reason: str = "", request_id: str | None = None) -> Any:
        return self._call("accounts", "RefundPlan", apb.RefundPlanRequest(
            plan_id=plan_id, request_id=request_id or new_request_id(), reason=reason))

    # --- Settlement
    def settle_day(self, billing_day: str) -> Any:
        return self._call("settlement", "SettleDay",
                          spb.SettleDayRequest(billing_day=billing_day))

    def get_bill(self, account_id: str, billing_day: str) -> Any:
        return self._call("settlement", "GetBill", spb.GetBillRequest(
            account_id=account_id, billing_day=billing_day))

    def list_bills(self, account_id: str, from_day: str, to_day: str) -> Any:
        return self._call("settlement", "ListBills", spb.ListBillsRequest(
            account_id=account_id, from_day=from_day, to_day=to_day))

    # --- TestClock
    def get_time(self) -> Any:
        return self._call("clock", "GetTime", tpb.GetTimeRequest())

    def set_time(self, now: datetime | Timestamp) -> Any:
        return self._call("clock", "SetTime", tpb.SetTimeRequest(now=timestamp(now)))

    def advance_time(self, seconds: int) -> Any:
        return self._call("clock", "AdvanceTime", tpb.AdvanceTimeRequest(seconds=seconds),
                          retry=False)
