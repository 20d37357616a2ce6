"""Output helpers of ledgerctl: tables for people, proto3 JSON, CSV."""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click
from google.protobuf.json_format import MessageToJson
from quota_ledger.v1 import common_pb2 as pb
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from clients.ledgerctl.app import CliState
from ledger.calendar import BILLING_TZ
from ledger.money import format_usd

# --------------------------------------------------------------------------- formatting

def _console() -> Console:
    """A console on the current stdout; wide when it is not a terminal, so nothing is cut."""
    out = sys.stdout
    width = None if out.isatty() else 200
    return Console(file=out, width=width, highlight=False, soft_wrap=False)


def usd(micros: int) -> str:
    return format_usd(micros)


def units(n: int) -> str:
    return f"{n:,}"


def enum_name(enum: Any, number: int) -> str:
    """REGION_CHINESE_MAINLAND -> chinese_mainland; 0 -> ''; unknown numbers as digits."""
    if number == 0:
        return ""
    prefix = enum.DESCRIPTOR.values_by_number[0].name[: -len("UNSPECIFIED")]
    try:
        name = enum.Name(number)
    except ValueError:
        return str(number)
    return name.removeprefix(prefix).lower()


def when(msg: Any, field_name: str) -> str:
    """A Timestamp field in UTC+8 ISO format, or '-' when unset."""
    if not msg.HasField(field_name):
        return "-"
    return getattr(msg, field_name).ToDatetime(tzinfo=BILLING_TZ).isoformat()


def emit_json(message: Any) -> None:
    click.echo(MessageToJson(message, preserving_proto_field_name=True,
                             always_print_fields_with_no_presence=True, ensure_ascii=False))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[str]],
          numeric: Iterable[str] = ()) -> RenderableType:
    numeric = set(numeric)
    t = Table()
    for col in columns:
        if col in numeric:
            t.add_column(col, justify="right", no_wrap=True)
        else:
            t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*row)
    return titled(title, t)


def titled(title: str | None, t: Table) -> RenderableType:
    """The title on its own line above the table: never wrapped to the table's width."""
    return Group(Text(title, style="bold"), t) if title else t


def fields_table(title: str | None, pairs: Iterable[tuple[str, str]]) -> RenderableType:
    t = Table(show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in pairs:
        t.add_row(k, v)
    return titled(title, t)


def output(state: CliState, message: Any, view: Callable[[], Sequence[Any]]) -> None:
    """The reply as JSON with --json, else the tables that ``view`` builds from it."""
    if state.json:
        emit_json(message)
    else:
        show(*view())


def show(*renderables: Any) -> None:
    console = _console()
    for r in renderables:
        console.print(r)


def account_view(a: pb.Account, title: str | None = None) -> RenderableType:
    return fields_table(title or f"account {a.account_id}", [
        ("account_id", a.account_id),
        ("display_name", a.display_name or "-"),
        ("status", enum_name(pb.AccountStatus, a.status)),
        ("cash balance (USD)", usd(a.cash_balance_micros)),
        ("voucher balance (USD)", usd(a.voucher_balance_micros)),
        ("outstanding (USD)", usd(a.outstanding_micros)),
        ("overdue since", when(a, "overdue_since")),
        ("scenarios", ", ".join(a.scenario_ids) or "-"),
        ("custom policy", "enabled" if a.custom_policy_enabled else "disabled"),
        ("created at", when(a, "created_at")),
        ("suspended at", when(a, "suspended_at")),
    ])


def plan_view(p: pb.Plan, title: str | None = None) -> RenderableType:
    return fields_table(title or f"plan {p.plan_id}", [
        ("plan_id", p.plan_id),
        ("account_id", p.account_id),
        ("spec_id", p.spec_id),
        ("status", enum_name(pb.PlanStatus, p.status)),
        ("validity", enum_name(pb.PlanValidity, p.validity)),
        ("units total", units(p.units_total)),
        ("units consumed", units(p.units_consumed)),
        ("units remaining", units(p.units_remaining)),
        ("units forfeited", units(p.units_forfeited)),
        ("price (USD)", usd(p.price_micros)),
        ("paid from vouchers (USD)", usd(p.paid_voucher_micros)),
        ("paid from cash (USD)", usd(p.paid_cash_micros)),
        ("purchased at", when(p, "purchased_at")),
        ("expires at", when(p, "expires_at")),
        ("refunded at", when(p, "refunded_at")),
    ])


PLAN_COLUMNS = ("plan_id", "spec", "status", "remaining", "consumed", "total", "price (USD)",
                "purchased at", "expires at")
PLAN_NUMERIC = ("remaining", "consumed", "total", "price (USD)")


def plan_row(p: pb.Plan) -> list[str]:
    return [p.plan_id, p.spec_id, enum_name(pb.PlanStatus, p.status),
            units(p.units_remaining), units(p.units_consumed), units(p.units_total),
            usd(p.price_micros), when(p, "purchased_at"), when(p, "expires_at")]


BILL_COLUMNS = ("account", "billing day", "total (USD)", "due (USD)", "paid voucher (USD)",
                "paid cash (USD)", "outstanding (USD)")
BILL_NUMERIC = BILL_COLUMNS[2:]


def bill_row(b: pb.Bill) -> list[str]:
    return [b.account_id, b.billing_day, usd(b.total_micros), usd(b.amount_due_micros),
            usd(b.paid_voucher_micros), usd(b.paid_cash_micros), usd(b.outstanding_micros)]


def write_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    sys.stdout.flush()

