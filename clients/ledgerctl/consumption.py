"""ledgerctl verbs on consumption: consume, usage."""

from __future__ import annotations

import click
from quota_ledger.v1 import common_pb2 as pb

from clients.ledgerctl.app import CliState, main
from clients.ledgerctl.output import (
    emit_json,
    enum_name,
    fields_table,
    show,
    table,
    units,
    usd,
    when,
    write_csv,
)
from clients.ledgerctl.params import INT64_MAX, day_range_csv, request_id_option

# --------------------------------------------------------------------------- consumption

@main.command()
@click.argument("account_id")
@click.option("--region", type=click.Choice(["mainland", "outside"]), default="mainland",
              show_default=True, help="Chinese mainland, or outside it.")
@click.option("--type", "captcha_type", type=click.Choice(
    ["slider", "puzzle", "one_click", "image_restoration", "invisible"]), default="slider",
    show_default=True, help="CAPTCHA type.")
@click.option("--arch", "architecture", type=click.Choice(["v2", "v3"]), default="v2",
              show_default=True, help="Client architecture.")
@click.option("--step", type=click.Choice(["3", "4.1"]), default="3", show_default=True,
              help="Verification step.")
@click.option("--quantity", type=click.IntRange(1, INT64_MAX), default=1, show_default=True,
              help="Number of billable requests under this one key (at most 1,000,000).")
@click.option("--scenario", "scenario_id", metavar="ID", default=None,
              help="Scenario the verification belongs to.")
@click.option("--dry-run", is_flag=True, help="Answer what would happen; change nothing.")
@request_id_option
@click.pass_obj
def consume(state: CliState, account_id: str, region: str, captcha_type: str,
            architecture: str, step: str, quantity: int, scenario_id: str | None,
            dry_run: bool, request_id: str | None) -> None:
    """Record billable verification requests (Consume).

    Units come from the account's valid plans first (earliest expiry first), then
    pay-as-you-go. Not every type/architecture/step combination is billable.

    \b
    Example:
      ledgerctl consume acme --region outside --type invisible --arch v3 --step 4.1 \\
          --quantity 100 --request-id evt-42
    """
    r = state.call("consume", account_id, region=region, captcha_type=captcha_type,
                   architecture=architecture, step=step, quantity=quantity,
                   scenario_id=scenario_id, dry_run=dry_run, request_id=request_id)
    if state.json:
        emit_json(r)
        return
    allocations = ", ".join(f"{a.plan_id}: {units(a.units)}" for a in r.allocations)
    title = "dry run (nothing recorded)" if dry_run else (
        "replayed (already recorded)" if r.replayed else "recorded")
    show(fields_table(title, [
        ("request_id", r.request_id or request_id or "-"),
        ("billable", "yes" if r.billable else "no"),
        ("billing day", r.billing_day or "-"),
        ("recorded at", when(r, "recorded_at")),
        ("plan units", allocations or "-"),
        ("pay-as-you-go units", units(r.payg_units)),
        ("pay-as-you-go (USD)", usd(r.payg_amount_micros)),
        ("plan units remaining", units(r.plan_units_remaining)),
        ("replayed", "yes" if r.replayed else "no"),
    ]))


USAGE_CSV_HEADER = ("billing_day", "kind", "plan_id", "region", "units", "amount_micros")


@main.command()
@day_range_csv("Print CSV (billing_day,kind,plan_id,region,units,amount_micros)")
def usage(state: CliState, account_id: str, from_day: str, to_day: str, as_csv: bool) -> None:
    """Show an account's usage per billing day (GetUsage).

    FROM_DAY and TO_DAY are billing days, both included. Each day lists the units each plan
    covered (kind plan) and the pay-as-you-go units and cost per region (kind payg).

    \b
    Example:
      ledgerctl usage acme 2027-03-01 2027-03-31 --csv > march.csv
    """
    r = state.call("get_usage", account_id, from_day, to_day)
    if state.json and not as_csv:
        emit_json(r)
        return
    rows: list[tuple[str, str, str, str, int, int]] = []
    for day in r.days:
        for pu in day.plan_units:
            rows.append((day.billing_day, "plan", pu.plan_id, "", pu.units, 0))
        for ru in day.payg:
            rows.append((day.billing_day, "payg", "", enum_name(pb.Region, ru.region),
                         ru.units, ru.amount_micros))
    if as_csv:
        write_csv(USAGE_CSV_HEADER, rows)
        return
    show(table(f"usage of {account_id}, {from_day} to {to_day}",
               ("billing day", "kind", "plan_id", "region", "units", "amount (USD)"),
               ([d, k, p or "-", reg or "-", units(n), usd(a)] for d, k, p, reg, n, a in rows),
               numeric=("units", "amount (USD)")),
         fields_table("totals", [
             ("plan units", units(sum(x[4] for x in rows if x[1] == "plan"))),
             ("pay-as-you-go units", units(sum(x[4] for x in rows if x[1] == "payg"))),
             ("pay-as-you-go (USD)", usd(sum(x[5] for x in rows))),
         ]))

