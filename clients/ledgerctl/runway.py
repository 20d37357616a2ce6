"""ledgerctl verb on forecasts: runway (issue 22)."""

from __future__ import annotations

import click

from clients.ledgerctl.app import CliState, main
from clients.ledgerctl.output import fields_table, output, table, units, usd, when

WINDOW_DAYS_MAX = 90  # the server's limit (docs/runway.md); 0 asks for its default, 7


@main.command()
@click.argument("account_id")
@click.option("--window", "window_days", type=click.IntRange(0, WINDOW_DAYS_MAX), default=0,
              help="Complete billing days the daily rate is taken from (0: the default, 7).")
@click.pass_obj
def runway(state: CliState, account_id: str, window_days: int) -> None:
    """Project how long the plans last at the recent daily rate (GetRunway).

    For each plan in consumption order (R8): when the rate uses it up, or that it expires
    first and how many units it forfeits (R9); then when pay-as-you-go starts and what it
    costs over the next 30 days (R10). A projection, not a promise; the method, which any
    figure can be checked against by hand, is in docs/runway.md.

    \b
    Example:
      ledgerctl runway acme --window 14
    """
    r = state.call("get_runway", account_id, window_days)

    def view() -> list:
        if not r.estimated:
            return [fields_table(f"runway of {account_id}", [
                ("as of", when(r, "as_of")), ("estimate", "none"),
                ("why", r.no_estimate_reason)])]
        return [
            fields_table(f"runway of {account_id}", [
                ("as of", when(r, "as_of")),
                ("window", f"{r.window_from_day} to {r.window_to_day}"
                           f" ({r.window_days} complete days)"),
                ("billable units in window", units(r.window_units)),
                ("daily rate", f"{units(r.daily_rate_units)} units/day"),
            ]),
            table("plans in consumption order", (
                "plan_id", "spec", "remaining", "expires", "used up", "forfeit"),
                ([p.plan_id, p.spec_id, units(p.units_remaining), when(p, "expires_at"),
                  "expires first" if p.expires_first else when(p, "used_up_at"),
                  units(p.forfeit_units)] for p in r.plans),
                numeric=("remaining", "forfeit")),
            fields_table(f"pay-as-you-go, next {r.horizon_days} days", [
                ("starts", when(r, "payg_starts_at") if r.HasField("payg_starts_at")
                 else "never at this rate"),
                ("units", units(r.payg_units)),
                ("cost (USD)", usd(r.payg_cost_micros)),
                ("priced at", r.price_basis),
            ]),
        ]

    output(state, r, view)
