"""Every error the ledger raises on purpose, in one tree.

    LedgerError                      (reason, message; never raised itself)
    ├── InvalidArgument              malformed or out-of-range input
    ├── NotFound                     unknown account, plan, spec or bill
    ├── AlreadyExists                account exists / request_id reused with other content (R12)
    ├── FailedPrecondition           a billing rule refuses the request
    │   (ACCOUNT_SUSPENDED R23, REFUND_WINDOW_PASSED / PLAN_USED / PLAN_REFUNDED R21,
    │    DAY_NOT_ENDED R17, INSUFFICIENT_FUNDS R16, OUTSTANDING_BALANCE R24, ...)
    ├── Overloaded                   the writer's queue is full: retry later
    ├── Unavailable                  the journal cannot be written now (disk full, I/O error)
    ├── Unauthenticated              no bearer token, or an unknown one
    └── PermissionDenied             the token's role or accounts do not cover the call

    Stale                            (not a LedgerError: never reaches a caller) a shared
                                     store's optimistic group lost to another node

The domain never imports grpc: ``server/errors.py`` maps each class to a gRPC status code in
one table and sends ``reason`` as a ``google.rpc.ErrorInfo``. Anything else that escapes is a
programmer error and surfaces as INTERNAL.
"""

from __future__ import annotations

ERROR_DOMAIN = "quota-ledger"


class LedgerError(Exception):
    """Base: an UPPER_SNAKE ``reason`` for machines and a sentence for people."""

    default_reason = "LEDGER_ERROR"

    def __init__(self, message: str, reason: str | None = None, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {k: str(v) for k, v in metadata.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason}: {self.message})"


class InvalidArgument(LedgerError):
    default_reason = "INVALID_ARGUMENT"


class NotFound(LedgerError):
    default_reason = "NOT_FOUND"


class AlreadyExists(LedgerError):
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(LedgerError):
    default_reason = "FAILED_PRECONDITION"


class Overloaded(LedgerError):
    default_reason = "OVERLOADED"


class Unavailable(LedgerError):
    default_reason = "JOURNAL_UNAVAILABLE"


def key_reused(kind: str, request_id: str) -> AlreadyExists:
    """R12: the same key with different content is refused, never silently accepted."""
    return AlreadyExists(
        f"request_id {request_id!r} was already used for a different {kind} request; "
        "a retry must repeat the original request exactly, or use a new request_id",
        reason="IDEMPOTENCY_KEY_REUSED",
        request_id=request_id,
    )


class Unauthenticated(LedgerError):
    """No credentials, or credentials the server does not know."""

    default_reason = "UNAUTHENTICATED"


class PermissionDenied(LedgerError):
    """Known credentials whose role or accounts do not cover the call."""

    default_reason = "PERMISSION_DENIED"


class Stale(Exception):
    """A shared store's optimistic group (issue 20, :func:`ledger.shared.open_optimistic`)
    found at its commit that another node had moved one of its accounts, the settled day or
    the shared clock, or had claimed one of its keys. Nothing was written and nothing was
    answered: the writer runs the group again on the locked path. ``accounts``: those whose
    version had moved; ``key_claimed``: what was found was a key claimed before (a retry's,
    most often), not another node's work."""

    def __init__(self, why: str, accounts: list[str], *, key_claimed: bool = False) -> None:
        super().__init__(why)
        self.accounts, self.key_claimed = accounts, key_claimed
