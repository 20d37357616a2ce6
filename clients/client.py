"""Typed Python client for quota-ledger, sync (:class:`LedgerClient`) and asyncio
(:class:`AsyncLedgerClient`).

- Every call has a deadline (``timeout_s``).
- Every state-changing call carries a ``request_id``; when the caller gives none, one is made
  up once and reused on every retry, so a retry can never charge twice (R12).
- Retries only on codes that mean "not applied, or applied and replayable": UNAVAILABLE,
  RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, with exponential backoff.
- Errors come back as :class:`LedgerError` with the gRPC code, the ``ErrorInfo`` reason and
  the server's message.

Enum arguments take the wire numbers, the full wire names, or short names
(``region="mainland"``, ``captcha_type="slider"``, ``architecture="v3"``, ``step="4.1"``).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from quota_ledger.v1 import accounts_pb2 as apb
from quota_ledger.v1 import accounts_pb2_grpc as apb_grpc
from quota_ledger.v1 import common_pb2 as pb
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import quota_ledger_pb2_grpc as qpb_grpc
from quota_ledger.v1 import settlement_pb2 as spb
from quota_ledger.v1 import settlement_pb2_grpc as spb_grpc
from quota_ledger.v1 import test_clock_pb2 as tpb
from quota_ledger.v1 import test_clock_pb2_grpc as tpb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0  # per call, retries included
STREAM_TIMEOUT_S = 3_600.0  # a ConsumeStream's whole life
RETRIES_MAX = 4
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 2.0
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.DEADLINE_EXCEEDED})
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 16 * 1024 * 1024),
                   ("grpc.max_send_message_length", 16 * 1024 * 1024)]

_SHORT_NAMES: dict[Any, dict[str, int]] = {
    pb.Region: {"mainland": 1, "cn": 1, "chinese_mainland": 1,
                "outside": 2, "intl": 2, "outside_chinese_mainland": 2},
    pb.CaptchaType: {"slider": 1, "puzzle": 2, "one_click": 3, "one-click": 3,
                     "image_restoration": 4, "image-restoration": 4, "invisible": 5},
    pb.ClientArchitecture: {"v2": 1, "v3": 2},
    pb.VerificationStep: {"3": 1, "step_3": 1, "4.1": 2, "step_4_1": 2},
    pb.FundsKind: {"cash": 1, "voucher": 2},
}


def enum_value(enum: Any, value: int | str) -> int:
    """Accept 2, 'REGION_OUTSIDE_CHINESE_MAINLAND' or 'outside'; numbers pass unchecked."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    short = _SHORT_NAMES.get(enum, {}).get(value.lower())
    if short is not None:
        return short
    try:
        return enum.Value(value.upper())
    except ValueError:
        choices = ", ".join(sorted(_SHORT_NAMES.get(enum, {})))
        raise ValueError(f"unknown {enum.DESCRIPTOR.name} {value!r}; try one of: {choices}"
                         ) from None


def timestamp(value: datetime | Timestamp) -> Timestamp:
    if isinstance(value, Timestamp):
        return value
    if value.tzinfo is None:
        raise ValueError("naive datetime: give a time zone (billing days are UTC+08:00)")
    t = Timestamp()
    t.FromDatetime(value)
    return t


def new_request_id() -> str:
    return uuid.uuid4().hex


class LedgerError(Exception):
    """A call the server refused or that could not be made."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(f"{code.name} {reason}: {message}")
        self.code, self.reason, self.message = code, reason, message
        self.metadata = metadata or {}

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> LedgerError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = err.details() if hasattr(err, "details") else str(err)
        reason, metadata = code.name, {}
        try:
            status = rpc_status.from_call(err)  # type: ignore[arg-type]
        except (ValueError, AttributeError):
            status = None
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
        return cls(code, reason, message or "", metadata)


def _backoff(attempt: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * (0.5 + random.random() / 2)


class _Api:
    """Request building shared by both clients; ``_call`` decides sync or async."""

    def _call(self, stub: str, method: str, request: Any, *, retry: bool = True) -> Any:
        raise NotImplementedError

    # --- QuotaLedger
    @staticmethod
    def consume_request(account_id: str, *, region: int | str = "mainland",
                        captcha_type: int | str = "slider", architecture: int | str = "v2",
                        step: int | str = "3", quantity: int = 1,
                        request_id: str | None = None, scenario_id: str | None = None,
                        dry_run: bool = False) -> qpb.ConsumeRequest:
        req = qpb.ConsumeRequest(
            account_id=account_id, request_id=request_id or new_request_id(),
            region=enum_value(pb.Region, region),
            captcha_type=enum_value(pb.CaptchaType, captcha_type),
            architecture=enum_value(pb.ClientArchitecture, architecture),
            step=enum_value(pb.VerificationStep, step), quantity=quantity, dry_run=dry_run)
        if scenario_id is not None:
            req.scenario_id = scenario_id
        return req

    def consume(self, account_id: str, **kwargs: Any) -> Any:
        return self._call("ledger", "Consume", self.consume_request(account_id, **kwargs))

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


def _credentials(tls_ca: str | None, tls_cert: str | None, tls_key: str | None
                 ) -> grpc.ChannelCredentials | None:
    if not (tls_ca or tls_cert):
        return None

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def _stubs(channel: Any) -> dict[str, Any]:
    return {"ledger": qpb_grpc.QuotaLedgerStub(channel),
            "accounts": apb_grpc.AccountsStub(channel),
            "settlement": spb_grpc.SettlementStub(channel),
            "clock": tpb_grpc.TestClockStub(channel)}


class LedgerClient(_Api):
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retries: int = RETRIES_MAX, channel: grpc.Channel | None = None,
                 token: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        creds = _credentials(tls_ca, tls_cert, tls_key)
        self.channel = channel or (
            grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS) if creds
            else grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
        self.timeout_s, self.retries = timeout_s, retries
        self.metadata = _auth_metadata(token)
        self.stubs = _stubs(self.channel)

    def _call(self, stub: str, method: str, request: Any, *, retry: bool = True) -> Any:
        fn = getattr(self.stubs[stub], method)
        deadline = time.monotonic() + self.timeout_s  # one budget for all attempts
        attempt = 0
        while True:
            try:
                return fn(request, timeout=max(0.001, deadline - time.monotonic()),
                          metadata=self.metadata)
            except grpc.RpcError as err:
                pause = _backoff(attempt)
                if (retry and attempt < self.retries and err.code() in RETRYABLE
                        and time.monotonic() + pause < deadline):
                    time.sleep(pause)
                    attempt += 1
                    continue
                raise LedgerError.from_rpc_error(err) from None

    def consume_stream(self, requests: Iterable[qpb.ConsumeRequest],
                       timeout_s: float = STREAM_TIMEOUT_S) -> Iterator[Any]:
        """One result per request, in order (no retry: resend failed items with the same
        request_id yourself). The deadline covers the whole stream."""
        try:
            yield from self.stubs["ledger"].ConsumeStream(iter(requests), timeout=timeout_s,
                                                           metadata=self.metadata)
        except grpc.RpcError as err:
            raise LedgerError.from_rpc_error(err) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLedgerClient(_Api):
    """asyncio client: the same methods, each returning an awaitable."""

    def __init__(self, target: str = DEFAULT_TARGET, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retries: int = RETRIES_MAX, channel: grpc.aio.Channel | None = None,
                 token: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> None:
        creds = _credentials(tls_ca, tls_cert, tls_key)
        self.channel = channel or (
            grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS) if creds
            else grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS))
        self.timeout_s, self.retries = timeout_s, retries
        self.metadata = _auth_metadata(token)
        self.stubs = _stubs(self.channel)

    async def _call(self, stub: str, method: str, request: Any, *, retry: bool = True) -> Any:
        fn = getattr(self.stubs[stub], method)
        deadline = time.monotonic() + self.timeout_s  # one budget for all attempts
        attempt = 0
        while True:
            try:
                return await fn(request, timeout=max(0.001, deadline - time.monotonic()),
                                metadata=self.metadata)
            except grpc.RpcError as err:
                pause = _backoff(attempt)
                if (retry and attempt < self.retries and err.code() in RETRYABLE
                        and time.monotonic() + pause < deadline):
                    await asyncio.sleep(pause)
                    attempt += 1
                    continue
                raise LedgerError.from_rpc_error(err) from None

    async def consume_stream(self, requests: AsyncIterator[qpb.ConsumeRequest] | Iterable[Any],
                             timeout_s: float = STREAM_TIMEOUT_S) -> AsyncIterator[Any]:
        call = self.stubs["ledger"].ConsumeStream(requests, timeout=timeout_s,
                                                  metadata=self.metadata)
        try:
            async for result in call:
                yield result
        except grpc.RpcError as err:
            raise LedgerError.from_rpc_error(err) from None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncLedgerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
