"""ledgerctl verbs on accounts: create, show, top-up, features, reactivate."""

from __future__ import annotations

import click

from clients.ledgerctl.app import CONTEXT_SETTINGS, CliState, main
from clients.ledgerctl.output import account_view, emit_json, output, show, usd
from clients.ledgerctl.params import parse_amount, request_id_option

# --------------------------------------------------------------------------- accounts

@main.group(context_settings=CONTEXT_SETTINGS)
def account() -> None:
    """Create an account or show one (balances, status, features).

    \b
    Example:
      ledgerctl account create acme --name "Acme Inc."
    """


@account.command("create")
@click.argument("account_id")
@click.option("--name", "display_name", default="", help="Display name of the account.")
@click.pass_obj
def account_create(state: CliState, account_id: str, display_name: str) -> None:
    """Create a new, empty account (CreateAccount).

    \b
    Example:
      ledgerctl account create acme --name "Acme Inc."
    """
    a = state.call("create_account", account_id, display_name)
    output(state, a, lambda: [account_view(a, f"created account {a.account_id}")])


@account.command("show")
@click.argument("account_id")
@click.pass_obj
def account_show(state: CliState, account_id: str) -> None:
    """Show an account's status, balances and features (GetAccount).

    \b
    Example:
      ledgerctl account show acme
    """
    a = state.call("get_account", account_id)
    output(state, a, lambda: [account_view(a)])


@main.command("top-up")
@click.argument("account_id")
@click.argument("amount")
@click.option("--kind", type=click.Choice(["cash", "voucher"]), default="cash",
              show_default=True, help="Which balance receives the money.")
@click.option("--micros", is_flag=True,
              help="AMOUNT is an integer number of micro-USD instead of USD.")
@request_id_option
@click.pass_obj
def top_up(state: CliState, account_id: str, amount: str, kind: str, micros: bool,
           request_id: str | None) -> None:
    """Add cash or voucher money to an account (TopUp).

    The money pays outstanding bill amounts first.

    AMOUNT is in USD, exact to 6 decimals (12.50 is USD 12.50, i.e. 12,500,000 micro-USD);
    with --micros it is an integer number of micro-USD.

    \b
    Example:
      ledgerctl top-up acme 12.50 --kind voucher --request-id topup-2027-03-10
    """
    amount_micros = parse_amount(amount, micros)
    a = state.call("top_up", account_id, amount_micros, kind=kind, request_id=request_id)
    if state.json:
        emit_json(a)
    else:
        show(account_view(a, f"topped up USD {usd(amount_micros)} ({kind}) to {a.account_id}"))


@main.command()
@click.argument("account_id")
@click.option("--scenario", "scenarios", metavar="ID", multiple=True,
              help="A scenario to configure; repeat it. The IDs given become the whole set.")
@click.option("--no-scenarios", is_flag=True, help="Remove every scenario.")
@click.option("--custom-policy/--no-custom-policy", default=None,
              help="Enable or disable custom policy configuration (omitted: left as it is).")
@request_id_option
@click.pass_obj
def features(state: CliState, account_id: str, scenarios: tuple[str, ...], no_scenarios: bool,
             custom_policy: bool | None, request_id: str | None) -> None:
    """Set an account's scenarios and custom policy (UpdateFeatures).

    The scenario set becomes exactly the --scenario IDs given; what is not given is left as
    it is (--no-scenarios clears the set). Beyond 3 scenarios each costs USD 1 a day; custom
    policy costs USD 5 a day.

    \b
    Example:
      ledgerctl features acme --scenario login --scenario signup --custom-policy
    """
    if scenarios and no_scenarios:
        raise click.UsageError("give either --scenario or --no-scenarios, not both")
    if not scenarios and not no_scenarios and custom_policy is None:
        raise click.UsageError(
            "nothing to change: give --scenario, --no-scenarios or --[no-]custom-policy")
    new_scenarios: list[str] = list(scenarios)
    if (not scenarios and not no_scenarios) or custom_policy is None:
        current = state.call("get_account", account_id)
        if not scenarios and not no_scenarios:
            new_scenarios = list(current.scenario_ids)
        if custom_policy is None:
            custom_policy = current.custom_policy_enabled
    a = state.call("update_features", account_id, new_scenarios, bool(custom_policy),
                   request_id=request_id)
    output(state, a, lambda: [account_view(a, f"features of {a.account_id}")])


@main.command()
@click.argument("account_id")
@request_id_option
@click.pass_obj
def reactivate(state: CliState, account_id: str, request_id: str | None) -> None:
    """Return a suspended account to service (Reactivate).

    Refused while any amount is outstanding. Its scenarios and custom policy must be set
    again afterwards (see `features`).

    \b
    Example:
      ledgerctl reactivate acme
    """
    a = state.call("reactivate", account_id, request_id=request_id)
    output(state, a, lambda: [account_view(a, f"reactivated {a.account_id}")])

