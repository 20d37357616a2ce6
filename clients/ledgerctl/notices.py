"""ledgerctl verbs on notices (issue 22): list them with their deliveries, resend one."""

from __future__ import annotations

import click

from clients.ledgerctl.app import CliState, main
from clients.ledgerctl.output import output, table, when

PAGE_SIZE = 200  # notices per ListNotices call
LIMIT_MAX = 100_000


@main.group(invoke_without_command=True)
@click.option("--account", "account_id", default="", metavar="ID",
              help="Only this account's notices.")
@click.option("--undelivered", is_flag=True,
              help="Only notices a webhook has not acknowledged (pending or failed).")
@click.option("--limit", type=click.IntRange(1, LIMIT_MAX), default=100, show_default=True,
              help="Show at most this many, oldest first.")
@click.pass_context
def notices(ctx: click.Context, account_id: str, undelivered: bool, limit: int) -> None:
    """List notices, oldest first, with each webhook delivery's state (ListNotices).

    A notice is a fact the ledger tells a customer about ahead of time or as it happens:
    plan_low, forfeit_ahead, bill_issued, overdue, suspension_ahead, suspended,
    reactivated. docs/notices.md describes each, its id and its payload.

    \b
    Example:
      ledgerctl notices --account acme
      ledgerctl notices --undelivered
      ledgerctl notices resend plan_low/acme/plan-7
    """
    if ctx.invoked_subcommand is not None:
        return
    state: CliState = ctx.obj
    found, token = [], ""
    while len(found) < limit:
        page = state.call("list_notices", account_id, undelivered_only=undelivered,
                          page_size=min(PAGE_SIZE, limit - len(found)), page_token=token)
        found += page.notices
        token = page.next_page_token
        if not token:
            break
    reply = page.__class__(notices=found, next_page_token=token)

    def view() -> list:
        return [table("notices", ("at (UTC+8)", "kind", "account", "notice_id", "delivery"), (
            [when(n, "at"), n.kind, n.account_id, n.notice_id,
             ", ".join(f"{d.endpoint}: {d.state} ({d.attempts} tries"
                       f"{'; ' + d.last_error if d.last_error and d.state != 'delivered' else ''})"
                       for d in n.deliveries) or "-"]
            for n in found))]

    output(state, reply, view)


@notices.command()
@click.argument("notice_id")
@click.pass_obj
def resend(state: CliState, notice_id: str) -> None:
    """Deliver a notice again to every endpoint that wants it, delivered or failed alike,
    with a fresh 24 h of retries (ResendNotice; admin).

    \b
    Example:
      ledgerctl notices resend overdue/acme/1804780800000000
    """
    n = state.call("resend_notice", notice_id)

    def view() -> list:
        return [table(f"queued again: {n.notice_id}", ("endpoint", "state", "attempts"),
                      ([d.endpoint, d.state, str(d.attempts)] for d in n.deliveries))]

    output(state, n, view)
