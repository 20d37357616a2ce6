"""ledgerctl verbs on plans: specs, buy, refund, remaining, plans."""

from __future__ import annotations

import click
from quota_ledger.v1 import common_pb2 as pb

from clients.ledgerctl.app import CliState, main
from clients.ledgerctl.output import (
    PLAN_COLUMNS,
    PLAN_NUMERIC,
    emit_json,
    enum_name,
    fields_table,
    output,
    plan_row,
    plan_view,
    show,
    table,
    units,
    usd,
)
from clients.ledgerctl.params import request_id_option

# --------------------------------------------------------------------------- plans

@main.command()
@click.pass_obj
def specs(state: CliState) -> None:
    """List the resource plans that can be bought (ListPlanSpecs).

    \b
    Example:
      ledgerctl specs
    """
    r = state.call("list_plan_specs")
    if state.json:
        emit_json(r)
        return
    show(table("plan specs", ("spec_id", "units", "validity", "price (USD)"),
               ([s.spec_id, units(s.units), enum_name(pb.PlanValidity, s.validity),
                 usd(s.price_micros)] for s in r.specs),
               numeric=("units", "price (USD)")))


@main.command()
@click.argument("account_id")
@click.argument("spec_id")
@request_id_option
@click.pass_obj
def buy(state: CliState, account_id: str, spec_id: str, request_id: str | None) -> None:
    """Buy a resource plan for an account (PurchasePlan).

    SPEC_ID is one of the specs listed by `ledgerctl specs`. The price is paid from vouchers
    first, then cash; the purchase is refused if both together cannot pay it.

    \b
    Example:
      ledgerctl buy acme month-100k --request-id buy-1
    """
    p = state.call("purchase_plan", account_id, spec_id, request_id=request_id)
    output(state, p, lambda: [plan_view(p, f"bought plan {p.plan_id}")])


@main.command()
@click.argument("plan_id")
@click.option("--reason", default="", help="Why the plan is refunded (kept in the journal).")
@request_id_option
@click.pass_obj
def refund(state: CliState, plan_id: str, reason: str, request_id: str | None) -> None:
    """Refund an unused plan bought at most 5 days ago (RefundPlan).

    Refused once a unit was consumed or 120 hours have passed. The price goes back to the
    vouchers and cash that paid it.

    \b
    Example:
      ledgerctl refund 0190f3c2-plan --reason "bought by mistake"
    """
    p = state.call("refund_plan", plan_id, reason=reason, request_id=request_id)
    output(state, p, lambda: [plan_view(p, f"refunded plan {p.plan_id}")])


@main.command()
@click.argument("account_id")
@click.pass_obj
def remaining(state: CliState, account_id: str) -> None:
    """Show an account's plan units left (GetRemaining).

    Lists the valid plans with units left, in the order they are consumed, their total, and
    today's pay-as-you-go units and cost.

    \b
    Example:
      ledgerctl remaining acme
    """
    r = state.call("get_remaining", account_id)
    if state.json:
        emit_json(r)
        return
    show(table(f"plans of {account_id} with units left", PLAN_COLUMNS,
               (plan_row(p) for p in r.plans), numeric=PLAN_NUMERIC),
         fields_table("totals", [
             ("units remaining", units(r.units_remaining_total)),
             ("billing day", r.billing_day or "-"),
             ("pay-as-you-go units today", units(r.payg_units)),
             ("pay-as-you-go today (USD)", usd(r.payg_amount_micros)),
         ]))


@main.command()
@click.argument("account_id")
@click.option("--all", "include_inactive", is_flag=True,
              help="Also list exhausted, expired and refunded plans.")
@click.pass_obj
def plans(state: CliState, account_id: str, include_inactive: bool) -> None:
    """List an account's plans (ListPlans).

    Active plans only; with --all also exhausted, expired and refunded ones.

    \b
    Example:
      ledgerctl plans acme --all
    """
    r = state.call("list_plans", account_id, include_inactive=include_inactive)
    if state.json:
        emit_json(r)
        return
    title = f"{'all' if include_inactive else 'active'} plans of {account_id}"
    show(table(title, PLAN_COLUMNS, (plan_row(p) for p in r.plans), numeric=PLAN_NUMERIC))

