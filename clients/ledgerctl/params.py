"""Parameter types of ledgerctl: billing days, instants, durations, USD amounts."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import click

from ledger.calendar import BILLING_TZ
from ledger.money import MICROS_PER_USD

INT64_MAX = 2**63 - 1
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DURATION_RE = re.compile(r"^(\d+)([smhdw]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}


class Day(click.ParamType):
    """A billing day written YYYY-MM-DD."""

    name = "YYYY-MM-DD"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        if not (isinstance(value, str) and _DAY_RE.match(value)):
            self.fail(f"{value!r} is not a billing day written YYYY-MM-DD", param, ctx)
        try:
            return date.fromisoformat(value).isoformat()
        except ValueError:
            self.fail(f"{value!r} is not a real calendar date", param, ctx)


class Instant(click.ParamType):
    """An ISO 8601 instant; without an offset it is read as UTC+8 (the billing time zone)."""

    name = "ISO8601"

    def convert(self, value: Any, param: Any, ctx: Any) -> datetime:
        if isinstance(value, datetime):
            dt = value
        else:
            try:
                dt = datetime.fromisoformat(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not an ISO 8601 time such as "
                          "2027-01-01T00:00:00+08:00", param, ctx)
        return dt if dt.tzinfo is not None else dt.replace(tzinfo=BILLING_TZ)


class Duration(click.ParamType):
    """Whole seconds, optionally with a unit: 90, 90s, 15m, 36h, 1d, 2w."""

    name = "SECONDS"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        m = _DURATION_RE.match(str(value).strip().lower())
        if not m:
            self.fail(f"{value!r} is not a duration such as 3600, 90m, 36h or 1d", param, ctx)
        seconds = int(m.group(1)) * _DURATION_UNITS[m.group(2)]
        if seconds > INT64_MAX:
            self.fail(f"{value!r} is too large", param, ctx)
        return seconds


def parse_amount(amount: str, micros: bool) -> int:
    """AMOUNT in USD (exact, at most 6 decimals) or, with --micros, in integer micro-USD."""
    text = amount.strip()
    if micros:
        if not re.fullmatch(r"\+?\d+", text):
            raise click.BadParameter(f"{amount!r} is not a whole number of micro-USD "
                                     "(--micros)", param_hint="AMOUNT")
        value = int(text)
    else:
        try:
            usd_amount = Decimal(text)
        except InvalidOperation:
            raise click.BadParameter(f"{amount!r} is not a USD amount such as 12.50",
                                     param_hint="AMOUNT") from None
        if not usd_amount.is_finite():
            raise click.BadParameter(f"{amount!r} is not a USD amount such as 12.50",
                                     param_hint="AMOUNT")
        scaled = usd_amount * MICROS_PER_USD
        if scaled != scaled.to_integral_value():
            raise click.BadParameter(
                f"{amount!r} has more than 6 decimals; the smallest amount is USD 0.000001 "
                "(one micro-USD)", param_hint="AMOUNT")
        value = int(scaled)
    if value <= 0:
        raise click.BadParameter(f"{amount!r} must be more than zero", param_hint="AMOUNT")
    if value > INT64_MAX:
        raise click.BadParameter(f"{amount!r} is too large", param_hint="AMOUNT")
    return value


request_id_option = click.option(
    "--request-id", metavar="ID", default=None,
    help="Idempotency key (1..128 printable ASCII). Repeat a call with the same key to retry "
         "it safely; default: a new random key.")



def day_range_csv(csv_help: str) -> Callable[[Any], Any]:
    """ACCOUNT_ID FROM_DAY TO_DAY and --csv, for the verbs that read a range of days."""
    def decorate(command: Any) -> Any:
        for param in (click.pass_obj,
                      click.option("--csv", "as_csv", is_flag=True,
                                   help=f"{csv_help}; takes precedence over --json."),
                      click.argument("to_day", type=Day()),
                      click.argument("from_day", type=Day()), click.argument("account_id")):
            command = param(command)
        return command
    return decorate
