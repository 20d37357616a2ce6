"""How the console writes figures for people: exact integers in, text out, never a float.

Money arrives as integer micro-USD (R15) and is shown in USD with 2 decimals, rounded half up
to the cent like a bill's amount due; the exact value travels in ``data-micros`` and the
cell's title. Instants are shown in the billing time zone, UTC+8 (R1), and say so.
"""

from __future__ import annotations

from datetime import date

from google.protobuf.timestamp_pb2 import Timestamp
from quota_ledger.v1 import common_pb2 as pb

from ledger.calendar import BILLING_TZ
from ledger.money import MICROS_PER_CENT, format_usd, round_half_up_to_cent

CENTS_PER_USD = 100
NONE_SHOWN = "—"

REGION_LABELS = {pb.REGION_CHINESE_MAINLAND: "Chinese mainland",
                 pb.REGION_OUTSIDE_CHINESE_MAINLAND: "Outside Chinese mainland"}
REGION_KEYS = {pb.REGION_CHINESE_MAINLAND: "mainland",
               pb.REGION_OUTSIDE_CHINESE_MAINLAND: "outside"}
REGIONS = (pb.REGION_CHINESE_MAINLAND, pb.REGION_OUTSIDE_CHINESE_MAINLAND)
BILL_ITEM_LABELS = {"verification": "Verification, pay-as-you-go",
                    "scenarios": "Scenarios beyond the first 3",
                    "custom_policy": "Custom policy configuration"}


def usd(micros: int) -> str:
    """USD with thousands separators and 2 decimals, rounded half up to the cent."""
    cents = round_half_up_to_cent(int(micros)) // MICROS_PER_CENT
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(cents), CENTS_PER_USD)
    return f"{sign}{whole:,}.{frac:02d}"


def usd_exact(micros: int) -> str:
    """Every significant decimal (unit prices are fractions of a cent)."""
    return format_usd(int(micros))


def count(n: int) -> str:
    return f"{int(n):,}"


def instant(ts: Timestamp | None) -> str:
    """``YYYY-MM-DD HH:MM:SS UTC+8``; a dash for an unset timestamp."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return NONE_SHOWN
    local = ts.ToDatetime(tzinfo=BILLING_TZ)
    return local.strftime("%Y-%m-%d %H:%M:%S") + " UTC+8"


def field_instant(message: object, name: str) -> str:
    """An optional Timestamp field of a message: shown only when it is set."""
    return instant(getattr(message, name)) if message.HasField(name) else NONE_SHOWN  # type: ignore[attr-defined]


def day_label(day: str) -> str:
    """A billing day with its weekday, e.g. ``2027-03-10 Wed``."""
    return f"{day} {date.fromisoformat(day).strftime('%a')}"


def enum_label(enum: object, value: int, prefix: str) -> str:
    """``ACCOUNT_STATUS_OVERDUE`` -> ``overdue``."""
    try:
        name = enum.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return f"unknown ({value})"
    return name.removeprefix(prefix).lower().replace("_", " ")


def account_status(value: int) -> str:
    return enum_label(pb.AccountStatus, value, "ACCOUNT_STATUS_")


def plan_status(value: int) -> str:
    return enum_label(pb.PlanStatus, value, "PLAN_STATUS_")


def validity(value: int) -> str:
    return enum_label(pb.PlanValidity, value, "PLAN_VALIDITY_")


def region(value: int) -> str:
    return REGION_LABELS.get(value, NONE_SHOWN)


def plan_sort_key(plan_id: str) -> tuple[int, str]:
    """Plan ids are ``plan-<journal seq>``: purchase order is the number's order."""
    _, _, tail = plan_id.rpartition("-")
    return (int(tail), plan_id) if tail.isdigit() and len(tail) < 20 else (1 << 62, plan_id)
