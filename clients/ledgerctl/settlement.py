"""ledgerctl verbs on settlement: settle, bill, bills, export-bills."""

from __future__ import annotations

import csv
import sys
from typing import Any

import click
from google.protobuf.json_format import MessageToJson
from quota_ledger.v1 import common_pb2 as pb
from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from clients.ledgerctl.app import CliState, main
from clients.ledgerctl.output import (
    BILL_COLUMNS,
    BILL_NUMERIC,
    bill_row,
    emit_json,
    enum_name,
    fields_table,
    output,
    show,
    table,
    units,
    usd,
    when,
    write_csv,
)
from clients.ledgerctl.params import Day, day_range_csv
from ledger.calendar import days_between

EXPORT_DAYS_MAX = 366


@main.command()
@click.argument("day", type=Day())
@click.pass_obj
def settle(state: CliState, day: str) -> None:
    """Settle an ended billing day for all accounts now (SettleDay).

    The ledger also settles every ended day by itself; settling again returns the same bills.

    \b
    Example:
      ledgerctl settle 2027-03-09
    """
    with Console(file=sys.stderr, highlight=False).status(f"settling {day} ..."):
        r = state.call("settle_day", day)
    if state.json:
        emit_json(r)
        return
    show(table(f"bills of {day} ({len(r.bills)})", BILL_COLUMNS,
               (bill_row(b) for b in r.bills), numeric=BILL_NUMERIC))


def bill_tables(b: pb.Bill) -> list[RenderableType]:
    lines = table(f"bill of {b.account_id} for {b.billing_day}, dated {b.bill_date}",
                  ("item", "region", "quantity", "unit price (USD)", "amount (USD)"),
                  ([ln.item, enum_name(pb.Region, ln.region) or "-", units(ln.quantity),
                    usd(ln.unit_price_micros), usd(ln.amount_micros)] for ln in b.lines),
                  numeric=("quantity", "unit price (USD)", "amount (USD)"))
    out = [lines]
    if b.plan_offsets:
        out.append(table("units offset by plans (no cost)", ("plan_id", "units"),
                         ([o.plan_id, units(o.units)] for o in b.plan_offsets),
                         numeric=("units",)))
    out.append(fields_table("totals", [
        ("total (USD)", usd(b.total_micros)),
        ("amount due (USD)", usd(b.amount_due_micros)),
        ("paid from vouchers (USD)", usd(b.paid_voucher_micros)),
        ("paid from cash (USD)", usd(b.paid_cash_micros)),
        ("outstanding (USD)", usd(b.outstanding_micros)),
        ("issued at", when(b, "issued_at")),
    ]))
    return out


@main.command()
@click.argument("account_id")
@click.argument("day", type=Day())
@click.pass_obj
def bill(state: CliState, account_id: str, day: str) -> None:
    """Show an account's bill for one billing day (GetBill).

    \b
    Example:
      ledgerctl bill acme 2027-03-09
    """
    b = state.call("get_bill", account_id, day)
    output(state, b, lambda: [*bill_tables(b)])


BILLS_CSV_HEADER = ("account_id", "billing_day", "bill_date", "item", "region", "quantity",
                    "unit_price_micros", "amount_micros")


def bill_csv_rows(b: pb.Bill) -> list[tuple[Any, ...]]:
    """One row per bill line, then a row with item=total."""
    rows: list[tuple[Any, ...]] = [
        (b.account_id, b.billing_day, b.bill_date, ln.item, enum_name(pb.Region, ln.region),
         ln.quantity, ln.unit_price_micros, ln.amount_micros) for ln in b.lines]
    rows.append((b.account_id, b.billing_day, b.bill_date, "total", "", "", "",
                 b.total_micros))
    return rows


@main.command("export-bills")
@click.argument("from_day", type=Day())
@click.argument("to_day", type=Day())
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv",
              show_default=True, help="CSV (one row per bill line, plus a total row per bill) "
                                      "or JSON lines (one Bill per line).")
@click.option("--out", "out", type=click.File("w"), default="-", show_default=True,
              help="Where to write; - is standard output.")
@click.pass_obj
def export_bills(state: CliState, from_day: str, to_day: str, fmt: str, out: Any) -> None:
    """Export every account's bills for a range of ended days (SettleDay, day by day).

    Settling a settled day returns its bills again and charges nothing (R19), so this is
    safe to run any time; a day that has not ended stops the export with DAY_NOT_ENDED.
    A progress bar on stderr counts days and bills.

    \b
    Example:
      ledgerctl export-bills 2027-03-01 2027-03-31 --out march.csv
    """
    days = days_between(from_day, to_day)
    if not days or len(days) > EXPORT_DAYS_MAX:
        raise click.UsageError(f"give 1 to {EXPORT_DAYS_MAX} days, FROM_DAY first")
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(BILLS_CSV_HEADER)
    exported = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=Console(file=sys.stderr),
                  transient=True) as progress:
        task = progress.add_task("days", total=len(days))
        for day in days:
            for b in state.call("settle_day", day).bills:
                if writer is not None:
                    writer.writerows(bill_csv_rows(b))
                else:
                    out.write(MessageToJson(b, preserving_proto_field_name=True,
                                            indent=None) + "\n")
                exported += 1
            progress.update(task, advance=1, description=f"{day}: {exported:,} bills")
    click.echo(f"exported {exported:,} bills over {len(days)} days", err=True)


@main.command()
@day_range_csv("Print CSV, one row per bill line plus a row with item=total per bill")
def bills(state: CliState, account_id: str, from_day: str, to_day: str, as_csv: bool) -> None:
    """List an account's bills for a range of days (ListBills).

    FROM_DAY and TO_DAY are billing days, both included.

    \b
    Example:
      ledgerctl bills acme 2027-03-01 2027-03-31 --csv > bills.csv
    """
    r = state.call("list_bills", account_id, from_day, to_day)
    if as_csv:
        write_csv(BILLS_CSV_HEADER, [row for b in r.bills for row in bill_csv_rows(b)])
    elif state.json:
        emit_json(r)
    else:
        show(table(f"bills of {account_id}, {from_day} to {to_day}", BILL_COLUMNS,
                   (bill_row(b) for b in r.bills), numeric=BILL_NUMERIC))

