"""ledgerctl verbs on a client's local spool (R26): spool status, spool replay."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from clients.ledgerctl.app import CONTEXT_SETTINGS, CliState, fail, main
from clients.ledgerctl.output import fields_table, show, table, units
from clients.replay import ReplayState
from clients.spool import Spool
from clients.wire import LedgerError

REPLAY_GIVE_UP_S = 300.0  # spool replay stops (exit 1) when the spool is not empty by then

spool_option = click.option("--spool", "spool_path", required=True, metavar="PATH",
                            type=click.Path(dir_okay=False, exists=True),
                            help="The spool file a client was given as spool_path.")


@main.group(context_settings=CONTEXT_SETTINGS)
def spool() -> None:
    """Inspect or send a client's local spool of requests kept during an outage (R26).

    \b
    Example:
      ledgerctl spool status --spool /var/lib/captcha/ledger-spool.db
    """


@spool.command("status")
@spool_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@click.pass_obj
def spool_status(state: CliState, spool_path: str, as_json: bool) -> None:
    """Show what a spool holds: pending and refused requests, the oldest one's age, bytes,
    and the circuit breaker state of each client process that uses it.

    Refused requests are those the ledger refused at replay (suspended or unknown account,
    key reused); they are never retried.

    \b
    Example:
      ledgerctl spool status --spool spool.db --json
    """
    s = Spool(spool_path)
    try:
        status, refused = s.status(), s.refused_examples()
    finally:
        s.close()
    if as_json or state.json:
        click.echo(json.dumps({**asdict(status), "path": str(Path(spool_path)),
                               "refused_examples": refused}))
        return
    age = "-" if status.oldest_age_s is None else f"{status.oldest_age_s:,.1f} s"
    out = [fields_table(f"spool {spool_path}", [
        ("pending", units(status.pending)), ("refused", units(status.refused)),
        ("oldest pending", age), ("bytes pending", units(status.bytes))])]
    if refused:
        out.append(table("refused (first ones)", ("account", "request_id", "reason"),
                         ([r["account_id"], r["request_id"], r["reason"]] for r in refused)))
    if status.breakers:
        out.append(table("circuit breakers of the clients using it (issue 21)",
                         ("host", "pid", "state", "for", "process"),
                         ([b["host"], str(b["pid"]), b["state"], f"{b['for_s']:,.1f} s",
                           "alive" if b["alive"] else "gone"] for b in status.breakers)))
    show(*out)


@spool.command("replay")
@spool_option
@click.option("--target", metavar="HOST:PORT", default=None,
              help="The ledger to send to (default: ledgerctl's --target).")
@click.option("--give-up-after", "give_up_s", type=click.FloatRange(min=0, min_open=True),
              default=REPLAY_GIVE_UP_S, show_default=True, metavar="SECONDS",
              help="Exit 1 if the spool is still not empty after this long.")
@click.pass_obj
def spool_replay(state: CliState, spool_path: str, target: str | None,
                 give_up_s: float) -> None:
    """Send a spool to the ledger (--target) until it is empty; exit 0 then.

    Each request goes under its original request_id, so one that had reached the ledger is
    only replayed, never charged twice (R12). A refused request leaves the pending rows and
    is reported (see `spool status`). While a client process holding the spool replays it,
    this waits for that one.

    \b
    Example:
      ledgerctl spool replay --spool spool.db --target 127.0.0.1:50051
    """
    if target is not None:
        state.target = target
    s = Spool(spool_path)
    try:
        replay = ReplayState(s)
        total = s.status().pending
        client = state.client()
        send = lambda request: client._call("ledger", "ConsumeBatch", request)  # noqa: E731
        give_up_at = time.monotonic() + give_up_s
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=Console(file=sys.stderr), transient=True) as progress:
            task = progress.add_task("replaying", total=total)
            while (pending := s.status().pending) and time.monotonic() < give_up_at:
                progress.update(task, completed=max(0, total - pending))
                pause = replay.step(send)
                if pause:
                    time.sleep(min(pause, max(0.0, give_up_at - time.monotonic())))
        s.release()
        t = replay.totals
        click.echo(f"recorded {t.recorded:,} (of which {t.replayed:,} already recorded), "
                   f"refused {t.refused:,}; pending {pending:,}", err=True)
        if pending:
            if isinstance(replay.last_error, LedgerError):
                fail(replay.last_error, state)
            raise click.ClickException(f"{pending:,} requests still pending after "
                                       f"{give_up_s:g} s")
    finally:
        s.close()
