"""What the typed client shares with every other client of the ledger: the limits and
defaults of a call, enum names, timestamps, :class:`LedgerError` (the one error a caller
sees), channel credentials and stubs, and the retry backoff."""

from __future__ import annotations

import os
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from quota_ledger.v1 import accounts_pb2_grpc as apb_grpc
from quota_ledger.v1 import common_pb2 as pb
from quota_ledger.v1 import quota_ledger_pb2_grpc as qpb_grpc
from quota_ledger.v1 import settlement_pb2_grpc as spb_grpc
from quota_ledger.v1 import test_clock_pb2_grpc as tpb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0  # per call, retries included
STREAM_TIMEOUT_S = 3_600.0  # a ConsumeStream's whole life
RETRIES_MAX = 4
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 2.0
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.DEADLINE_EXCEEDED})
RECONNECT_BACKOFF_MIN_MS = 100
RECONNECT_BACKOFF_MAX_MS = 1_000  # gRPC's default is 120 s: a restarted ledger would wait
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 16 * 1024 * 1024),
                   ("grpc.max_send_message_length", 16 * 1024 * 1024),
                   ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MIN_MS),
                   ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MIN_MS),
                   ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
                   # Several ledger nodes (docs/scaling.md): spread calls over every address a
                   # target resolves to (dns:///name:port, or a list: see channel_target).
                   ("grpc.service_config",
                    '{"loadBalancingConfig": [{"round_robin": {}}]}')]


def channel_target(target: str) -> str:
    """A gRPC target for one node or several: ``host:port``, any gRPC URI
    (``dns:///ledger.internal:50051``), or a comma-separated list of IPv4 ``host:port``s,
    which becomes gRPC's ``ipv4:`` list (one channel, round robin over the nodes)."""
    if "," not in target:
        return target
    parts = [p.strip() for p in target.split(",") if p.strip()]
    for p in parts:
        host, _, port = p.rpartition(":")
        if not (port.isdigit() and host.count(".") == 3
                and all(x.isdigit() for x in host.split("."))):
            raise ValueError(f"several targets must be IPv4 host:port each (got {p!r}); for "
                             "names, use one dns:///NAME:PORT target that resolves to every node")
    return "ipv4:" + ",".join(parts)

_SHORT_NAMES: dict[Any, dict[str, int]] = {
    pb.Region: {"mainland": 1, "cn": 1, "chinese_mainland": 1,
                "outside": 2, "intl": 2, "outside_chinese_mainland": 2},
    pb.CaptchaType: {"slider": 1, "puzzle": 2, "one_click": 3, "one-click": 3,
                     "image_restoration": 4, "image-restoration": 4, "invisible": 5},
    pb.ClientArchitecture: {"v2": 1, "v3": 2},
    pb.VerificationStep: {"3": 1, "step_3": 1, "4.1": 2, "step_4_1": 2},
    pb.FundsKind: {"cash": 1, "voucher": 2},
}


# Names already resolved: only valid ones are kept, so this stays as small as the enums.
_RESOLVED: dict[tuple[Any, str], int] = {}


def enum_value(enum: Any, value: int | str) -> int:
    """Accept 2, 'REGION_OUTSIDE_CHINESE_MAINLAND' or 'outside'; numbers pass unchecked."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    known = _RESOLVED.get((enum, value))
    if known is not None:
        return known
    short = _SHORT_NAMES.get(enum, {}).get(value.lower())
    if short is not None:
        _RESOLVED[(enum, value)] = short
        return short
    try:
        _RESOLVED[(enum, value)] = number = enum.Value(value.upper())
        return number
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


_IDS_PER_DRAW = 256
_ids: list[str] = []  # random ids drawn ahead; a forked child must not reuse its parent's
os.register_at_fork(after_in_child=_ids.clear)


def new_request_id() -> str:
    """128 random bits as 32 hex digits (the shape of a uuid4's hex). One is made per
    consume() on the hot path, so they are drawn from the OS 256 at a time (list.pop is
    atomic: threads never share one; a forked child draws its own)."""
    try:
        return _ids.pop()
    except IndexError:
        digits = os.urandom(16 * _IDS_PER_DRAW).hex()
        _ids.extend([digits[i:i + 32] for i in range(0, len(digits), 32)])
        return _ids.pop()


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


def backoff_s(attempt: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt) * (0.5 + random.random() / 2)




def credentials(tls_ca: str | None, tls_cert: str | None, tls_key: str | None
                 ) -> grpc.ChannelCredentials | None:
    if not (tls_ca or tls_cert):
        return None

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def stubs(channel: Any) -> dict[str, Any]:
    return {"ledger": qpb_grpc.QuotaLedgerStub(channel),
            "accounts": apb_grpc.AccountsStub(channel),
            "settlement": spb_grpc.SettlementStub(channel),
            "clock": tpb_grpc.TestClockStub(channel)}
