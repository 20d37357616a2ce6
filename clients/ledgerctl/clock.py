"""ledgerctl verbs on the test clock: time show, time set, time advance."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from clients.ledgerctl.app import CONTEXT_SETTINGS, CliState, main
from clients.ledgerctl.output import emit_json, when
from clients.ledgerctl.params import Duration, Instant

# --------------------------------------------------------------------------- test clock

@main.group(context_settings=CONTEXT_SETTINGS)
def time() -> None:
    """Read or move the ledger's test clock (TestClock).

    Only a server started with --test-clock serves it. Moving the clock runs everything
    that falls due: plan expiries, settlements, suspensions.

    \b
    Example:
      ledgerctl time advance 1d
    """


def _show_time(state: CliState, r: Any) -> None:
    if state.json:
        emit_json(r)
    else:
        click.echo(when(r, "now"))


@time.command("show")
@click.pass_obj
def time_show(state: CliState) -> None:
    """Print the ledger's current time in UTC+8 (GetTime).

    \b
    Example:
      ledgerctl time show
    """
    _show_time(state, state.call("get_time"))


@time.command("set")
@click.argument("now", metavar="ISO8601", type=Instant())
@click.pass_obj
def time_set(state: CliState, now: datetime) -> None:
    """Move the ledger's clock forward to an instant (SetTime).

    Time never goes backwards. Without an offset the time is read in UTC+8.

    \b
    Example:
      ledgerctl time set 2027-01-01T00:00:00+08:00
    """
    _show_time(state, state.call("set_time", now))


@time.command("advance")
@click.argument("seconds", type=Duration())
@click.pass_obj
def time_advance(state: CliState, seconds: int) -> None:
    """Move the ledger's clock forward by SECONDS (AdvanceTime).

    SECONDS is a whole number, optionally with a unit: s, m, h, d or w (90m, 36h, 1d).

    \b
    Example:
      ledgerctl time advance 86400      # or: ledgerctl time advance 1d
    """
    _show_time(state, state.call("advance_time", seconds))

