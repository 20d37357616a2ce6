"""What each page asks the ledger, and the checks on what a visitor typed before asking.

Every call goes through the typed asyncio client; a refusal becomes a :class:`PageError` with
an HTTP status in one table (:func:`from_ledger_error`), so no handler shows a traceback.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import grpc

from clients.client import AsyncLedgerClient, LedgerError
from ledger.calendar import US_PER_DAY, billing_day, clip, parse_day
from ledger.errors import LedgerError as DomainError
from ledger.model import ACCOUNT_ID_LEN_MAX, check_id, check_text

RANGE_DAYS_MAX = 366  # longest usage or bills range one page shows
USAGE_DAYS_DEFAULT = 30
ACCOUNTS_PAGE_SIZE = 50
US_PER_SECOND = 1_000_000


class PageError(Exception):
    """A page that cannot be shown: its HTTP status, a title and a sentence for people."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail = status, title, detail


@dataclass(frozen=True)
class Console:
    """The console's one client and what its error pages may say about it."""

    client: AsyncLedgerClient
    target: str
    has_token: bool


_BY_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.NOT_FOUND: (404, "Not found"),
    grpc.StatusCode.INVALID_ARGUMENT: (400, "Bad request"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "Bad request"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "Not allowed"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "Refused by the ledger"),
}


def from_ledger_error(exc: LedgerError, console: Console) -> PageError:
    """One table from the ledger's gRPC codes to pages; the server's message is kept."""
    if exc.code in _BY_CODE:
        status, title = _BY_CODE[exc.code]
        return PageError(status, title, exc.message)
    if exc.code == grpc.StatusCode.UNAUTHENTICATED:
        held = ("its token was refused" if console.has_token else "it was started without one")
        return PageError(503, "The ledger refused the console's credentials",
                         f"The ledger at {console.target} needs a bearer token and {held}. "
                         "Start the console with --token (or LEDGER_TOKEN) set to a reader "
                         "token: quota-ledger token create --role reader.")
    if exc.code == grpc.StatusCode.UNAVAILABLE:
        return PageError(503, "The ledger cannot be reached",
                         f"No answer from the ledger at {console.target} (is `quota-ledger "
                         "serve` running there?). Try again in a moment.")
    if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return PageError(504, "The ledger did not answer in time", exc.message)
    return PageError(502, "The ledger could not answer", f"{exc.code.name}: {exc.message}")


def checked_account_id(account_id: str) -> str:
    """The ledger's own rule for ids (R-independent input hygiene), checked before a call."""
    try:
        return check_id(account_id, "account id", ACCOUNT_ID_LEN_MAX)
    except DomainError as exc:
        raise PageError(400, "Bad account id", exc.message) from None


def checked_text(value: str, name: str) -> str:
    try:
        return check_text(value, name, ACCOUNT_ID_LEN_MAX, allow_empty=True)
    except DomainError as exc:
        raise PageError(400, f"Bad {name}", exc.message) from None


def checked_day(value: str | None, name: str) -> date | None:
    if value is None or value == "":
        return None
    try:
        return parse_day(value)
    except DomainError:
        raise PageError(400, "Bad date", f"{name} {clip(value)} is not a date written "
                        "YYYY-MM-DD (a billing day, UTC+8)") from None


def day_range(from_day: date | None, to_day: date | None, today: str, first_day: str,
              default_days: int) -> tuple[str, str]:
    """The range a page shows: as given, else ending today and starting at most
    ``default_days`` back, never before the account's first day. Over 366 days: refused."""
    end = to_day or date.fromisoformat(today)
    start = from_day or max(date.fromisoformat(first_day), end - timedelta(days=default_days - 1))
    if start > end:
        raise PageError(400, "Bad date range",
                        f"from {start.isoformat()} is after to {end.isoformat()}")
    if (end - start).days + 1 > RANGE_DAYS_MAX:
        raise PageError(400, "Date range too long",
                        f"{(end - start).days + 1:,} days asked; one page shows at most "
                        f"{RANGE_DAYS_MAX} days")
    return start.isoformat(), end.isoformat()


async def ask(console: Console, *calls: Any) -> list[Any]:
    """Await the client calls together; a refusal becomes a PageError."""
    try:
        return list(await asyncio.gather(*calls))
    except LedgerError as exc:
        raise from_ledger_error(exc, console) from None


async def list_accounts(console: Console, prefix: str, after: str) -> Any:
    call = console.client.list_accounts(prefix=prefix, page_size=ACCOUNTS_PAGE_SIZE,
                                        page_token=after)
    return (await ask(console, call))[0]


def first_day(account: Any, today: str) -> str:
    """The billing day the account was created (today if the ledger did not say)."""
    if not account.HasField("created_at"):
        return today
    ts = account.created_at
    return billing_day(ts.seconds * US_PER_SECOND + ts.nanos // 1_000)


def plan_specs(plans: Any) -> dict[str, str]:
    return {p.plan_id: p.spec_id for p in plans}


def runway_series(runway: Any) -> list[tuple[str, list[tuple[float, int]], float]]:
    """The runway chart's lines (docs/runway.md, step 3): a plan keeps its units until the
    one before it is used up or expires, then falls at the rate until it is used up, or
    until its expiry, where what is left is forfeited (R9)."""
    if not runway.estimated:
        return []
    now = runway.as_of.ToMicroseconds()

    def days(t_us: int) -> float:
        return (t_us - now) / US_PER_DAY  # a drawing coordinate, never a figure

    out, start = [], now
    for p in runway.plans:
        expires = p.expires_at.ToMicroseconds()
        end = p.used_up_at.ToMicroseconds() if p.HasField("used_up_at") else expires
        points = [(0.0, p.units_remaining), (days(start), p.units_remaining),
                  (days(end), 0 if p.HasField("used_up_at") else p.forfeit_units)]
        if not p.HasField("used_up_at"):
            points.append((days(expires), 0))
        out.append((p.plan_id, points, days(expires)))
        start = end
    return out


NOTICES_SHOWN = 20  # the latest notices an account page lists (docs/notices.md)
NOTICES_PAGE = 1_000  # the server's page limit


async def latest_notices(console: Console, account_id: str) -> list[Any]:
    """The account's latest notices, newest first: ListNotices pages oldest first, so the
    pages are walked to the end (an account has a few notices a day at most)."""
    found, token = [], ""
    while True:
        page = await console.client.list_notices(account_id, page_size=NOTICES_PAGE,
                                                 page_token=token)
        found = (found + list(page.notices))[-NOTICES_SHOWN:]
        token = page.next_page_token
        if not token:
            return found[::-1]
