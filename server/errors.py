"""The one table from domain errors to gRPC status codes, with google.rpc.ErrorInfo details."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ledger import errors as e

log = logging.getLogger("quota_ledger.server")

STATUS_BY_ERROR: dict[type[e.LedgerError], grpc.StatusCode] = {
    e.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    e.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    e.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.Unavailable: grpc.StatusCode.UNAVAILABLE,
    e.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    e.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


# Refusals worth a line at INFO; malformed input and unknown ids are DEBUG (hostile clients
# must not be able to flood the log).
_NOTABLE = frozenset({"FAILED_PRECONDITION", "PERMISSION_DENIED", "UNAUTHENTICATED",
                      "RESOURCE_EXHAUSTED", "UNAVAILABLE"})


def status_code(exc: e.LedgerError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


def to_status(exc: e.LedgerError) -> grpc.Status:
    code = status_code(exc)
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=e.ERROR_DOMAIN,
                                       metadata=exc.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(
        code=code.value[0], message=exc.message, details=[detail]))


def rpc(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a unary aio handler: domain errors become statuses; surprises become INTERNAL."""

    method = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metrics = self.ctx.metrics
        t0 = time.perf_counter()
        code = "OK"
        try:
            if self.ctx.draining:  # retry elsewhere: nothing was applied
                raise e.Unavailable("this ledger node is shutting down; nothing was applied, "
                                    "retry (on another node)", reason="SHUTTING_DOWN")
            auth = self.ctx.auth
            if auth.enabled:  # off: every caller is admin, nothing to look at (hot path)
                principal = auth.authenticate(context.invocation_metadata())
                auth.authorize(principal, f"{self.SERVICE}/{method}", account_ids(request))
            return await handler(self, request, context)
        except e.LedgerError as exc:
            code = status_code(exc).name
            log.log(logging.INFO if code in _NOTABLE else logging.DEBUG, "refused", extra={
                "event": "refusal", "method": method, "code": code, "reason": exc.reason,
                "request_id": getattr(request, "request_id", None),
                "account_id": getattr(request, "account_id", None)})
            await context.abort_with_status(to_status(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:  # the server must stay up
            code = "INTERNAL"
            log.exception("unexpected error in %s", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; nothing was applied")
        finally:
            metrics.observe_rpc(method, code, time.perf_counter() - t0)

    return wrapper


def account_ids(request: Any) -> list[str]:
    """The accounts a request names, for account-limited tokens."""
    fields = request.DESCRIPTOR.fields_by_name
    if "account_id" in fields:
        return [request.account_id]
    if "requests" in fields:
        return [r.account_id for r in request.requests]
    return []


def error_message(exc: e.LedgerError) -> dict[str, Any]:
    """Fields of the wire ``Error`` message (batch and stream results)."""
    return {"code": status_code(exc).value[0], "reason": exc.reason, "message": exc.message}
