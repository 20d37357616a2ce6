"""The billing calendar: UTC+08:00 days (R1) and calendar-month plan validity (R6).

Instants are integer microseconds since the Unix epoch (UTC), the ledger's one time unit.
"""

from __future__ import annotations

import calendar as _cal
import functools
import re
from datetime import UTC, date, datetime, timedelta, timezone

from .errors import InvalidArgument

BILLING_TZ = timezone(timedelta(hours=8), "UTC+08:00")
US_PER_SECOND = 1_000_000
US_PER_HOUR = 3_600 * US_PER_SECOND
US_PER_DAY = 24 * US_PER_HOUR
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
DAY_CACHE_MAX = 4_096  # days whose start instant is remembered (the due check asks per group)


def to_datetime(t_us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=t_us)


def from_datetime(dt: datetime) -> int:
    if dt.tzinfo is None:
        raise ValueError("naive datetime: the ledger only takes aware instants")
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * US_PER_SECOND + delta.microseconds


def billing_day(t_us: int) -> str:
    """R1: the UTC+8 calendar day that contains the instant, as YYYY-MM-DD."""
    return to_datetime(t_us).astimezone(BILLING_TZ).date().isoformat()


ECHO_CHARS_MAX = 40  # how much of a malformed value an error message repeats


def clip(value: str) -> str:
    """Caller text quoted in an error message, cut short (a reply's metadata is bounded)."""
    return repr(value) if len(value) <= ECHO_CHARS_MAX else repr(value[:ECHO_CHARS_MAX]) + "..."


def parse_day(day: str) -> date:
    if not isinstance(day, str) or not _DAY_RE.match(day):
        raise InvalidArgument(f"billing day {clip(str(day))} is not a date written YYYY-MM-DD")
    try:
        return date.fromisoformat(day)
    except ValueError as exc:
        raise InvalidArgument(f"billing day {clip(day)} is not a real calendar date") from exc


@functools.lru_cache(maxsize=DAY_CACHE_MAX)
def day_start(day: str) -> int:
    """R1: day D begins at D 00:00+08:00 (remembered: the writer asks once per group for
    the day it settles next, issue 18)."""
    d = parse_day(day)
    return from_datetime(datetime(d.year, d.month, d.day, tzinfo=BILLING_TZ))


def day_end(day: str) -> int:
    """R1: day D ends (exclusive) at D+1 00:00+08:00."""
    return day_start(day) + US_PER_DAY


def next_day(day: str) -> str:
    return (parse_day(day) + timedelta(days=1)).isoformat()


def days_between(from_day: str, to_day: str) -> list[str]:
    """Inclusive list of days; empty when from_day is after to_day."""
    start, end = parse_day(from_day), parse_day(to_day)
    return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def add_months(t_us: int, months: int) -> int:
    """R6: the same UTC+8 wall-clock time `months` later, clamped to the month's last day."""
    local = to_datetime(t_us).astimezone(BILLING_TZ)
    total = local.month - 1 + months
    year, month = local.year + total // 12, total % 12 + 1
    day = min(local.day, _cal.monthrange(year, month)[1])
    return from_datetime(local.replace(year=year, month=month, day=day))
