"""``ledgerctl loadtest``: the click command and its live progress bar."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import asdict
from decimal import Decimal, InvalidOperation
from typing import Any

import click

from clients.coalescer import DEFAULT_LINGER_MS
from clients.extras import require
from clients.loadgen.accounts import prepare_accounts
from clients.loadgen.answers import VIEWS
from clients.loadgen.config import (
    BATCH_SIZE_MAX,
    DEFAULT_ACCOUNTS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    DEFAULT_DURATION_S,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_REQUESTS,
    DEFAULT_TIMEOUT_S,
    MICROS_PER_USD,
    SHAPES,
    STREAMS_AUTO_MAX,
    WORKERS_PER_CHANNEL,
    LoadConfig,
    LoadgenError,
)
from clients.loadgen.plot import PLOT_EXTRA_HINT, matplotlib_available, write_plot
from clients.loadgen.recorder import LoadResult
from clients.loadgen.report import summary_table
from clients.loadgen.shapes import run_load
from clients.wire import DEFAULT_TARGET


def _usd_to_micros(text: str) -> int:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise click.BadParameter(f"not an amount in USD: {text!r}") from None
    micros = value * MICROS_PER_USD
    if value < 0 or micros != micros.to_integral_value():
        raise click.BadParameter("a non-negative USD amount with at most 6 decimals")
    return int(micros)


@click.command("loadtest", context_settings={"help_option_names": ["-h", "--help"],
                                             "max_content_width": 100})
@click.option("--target", default=None, metavar="HOST:PORT",
              help=f"Server address (default: ledgerctl's --target, $LEDGER_TARGET, "
                   f"{DEFAULT_TARGET}).")
@click.option("--accounts", default=DEFAULT_ACCOUNTS, show_default=True, type=click.IntRange(1),
              help="Number of accounts the traffic goes to.")
@click.option("--account-prefix", default="load-", show_default=True,
              help="Account ids are PREFIX0000, PREFIX0001, ...")
@click.option("--create-accounts", is_flag=True,
              help="Before the run: create the accounts (existing ones are kept), top them up "
                   "and, with --plan, buy that plan for each (re-running is a replay).")
@click.option("--plan", default=None, metavar="SPEC",
              help="With --create-accounts: the plan spec each account buys (ledgerctl specs).")
@click.option("--top-up", "top_up", default="10", show_default=True, metavar="USD",
              help="With --create-accounts: cash each account gets beyond the plan's price.")
@click.option("--skew", default="uniform", show_default=True,
              help="Traffic over accounts: uniform, zipf[:S], a fraction F of traffic to the "
                   "hot accounts (--hot-fraction of them), or P/H (90/10: 90%% to 10%%).")
@click.option("--hot-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="The share of accounts that are hot when --skew is a fraction.")
@click.option("--shape", type=click.Choice(SHAPES), default="unary", show_default=True,
              help="Consume calls, ConsumeStream messages or ConsumeBatch calls.")
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True,
              type=click.IntRange(1, BATCH_SIZE_MAX),
              help="Requests per ConsumeBatch call (with --client-batching: the most the "
                   "client puts in one).")
@click.option("--view", type=click.Choice(sorted(VIEWS)), default="full", show_default=True,
              help="--shape batch (or --client-batching): the batch answer's view, FULL "
                   "results or COMPACT columns.")
@click.option("--client-batching", is_flag=True,
              help="--shape unary through one AsyncLedgerClient(batching=True): concurrent "
                   "consume() calls share ConsumeBatch calls (calls/s counts those).")
@click.option("--linger-ms", default=DEFAULT_LINGER_MS, show_default=True,
              type=click.FloatRange(0, 1_000),
              help="With --client-batching: how long a call may wait for others while "
                   "batches are in flight.")
@click.option("--concurrency", type=click.IntRange(1), default=None,
              help=f"Closed loop: requests in flight (default {DEFAULT_CONCURRENCY}). "
                   "Not with --rate.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Open loop: requests per second, sent on schedule whatever the answers; "
                   "latency counts from the scheduled time. Not with --concurrency.")
@click.option("--requests", default=DEFAULT_REQUESTS, show_default=True, type=click.IntRange(1),
              help="Stop after this many requests...")
@click.option("--duration", default=DEFAULT_DURATION_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="...or after this many seconds, whichever comes first.")
@click.option("--timeout", default=DEFAULT_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Deadline of each call (a stream: --duration plus this).")
@click.option("--max-in-flight", default=DEFAULT_MAX_IN_FLIGHT, show_default=True,
              type=click.IntRange(1),
              help="Open loop: most calls (stream: messages) outstanding at once.")
@click.option("--streams", type=click.IntRange(1), default=None,
              help=f"--shape stream: streams to spread the load over (default up to "
                   f"{STREAMS_AUTO_MAX}).")
@click.option("--channels", type=click.IntRange(1), default=None,
              help=f"gRPC channels (connections); default one per {WORKERS_PER_CHANNEL} "
                   "workers.")
@click.option("--region", default="mainland", show_default=True, help="mainland or outside.")
@click.option("--type", "captcha_type", default="slider", show_default=True,
              help="CAPTCHA type: slider, puzzle, one-click, image-restoration, invisible.")
@click.option("--arch", "architecture", default="v2", show_default=True, help="v2 or v3.")
@click.option("--step", default="3", show_default=True, help="3 or 4.1.")
@click.option("--quantity", default=1, show_default=True, type=click.IntRange(1, 1_000_000),
              help="Billable requests each ConsumeRequest stands for.")
@click.option("--dry-run", is_flag=True,
              help="Send dry runs: the ledger answers what would happen and records nothing.")
@click.option("--seed", type=int, default=None, help="Seed for the account choice.")
@click.option("--json-out", default=None, metavar="FILE",
              help="Write the result as JSON here ('-' for stdout; the table goes to stderr).")
@click.option("--plot", default=None, metavar="FILE.png",
              help="Plot throughput and p99 per full second (needs the plot extra: "
                   f"{PLOT_EXTRA_HINT}).")
@click.option("--quiet", "-q", is_flag=True, help="No live progress bar.")
@click.pass_context
def loadtest(ctx: click.Context, target: str | None, accounts: int, account_prefix: str,
             create_accounts: bool, plan: str | None, top_up: str, skew: str,
             hot_fraction: float, shape: str, batch_size: int, view: str,
             client_batching: bool, linger_ms: float, concurrency: int | None,
             rate: float | None, requests: int, duration: float, timeout: float,
             max_in_flight: int, streams: int | None, channels: int | None, region: str,
             captcha_type: str, architecture: str, step: str, quantity: int, dry_run: bool,
             seed: int | None, json_out: str | None, plot: str | None, quiet: bool) -> None:
    """Drive Consume traffic at a ledger and report throughput and latency.

    Every acknowledged request is billed on its account unless --dry-run. The run is always
    bounded: it stops at --requests or --duration, whichever comes first. It prints sent,
    acknowledged and errors by gRPC code (sent = acknowledged + errors), throughput and
    latency percentiles from an HdrHistogram.

    \b
    Example:
      ledgerctl loadtest --target 127.0.0.1:50051 --accounts 1000 --create-accounts \\
          --plan year-100m --shape batch --batch-size 1000 --concurrency 4 --duration 20
      ledgerctl loadtest --rate 2000 --skew 90/10 --duration 60 --json-out run.json
      ledgerctl loadtest --client-batching --concurrency 256 --duration 10
      ledgerctl loadtest --shape batch --view compact --batch-size 1000 --concurrency 4
    """
    if target is None:
        target = (getattr(ctx.obj, "target", None) or os.environ.get("LEDGER_TARGET")
                  or DEFAULT_TARGET)
    if concurrency is not None and rate is not None:
        raise click.UsageError("--concurrency (closed loop) and --rate (open loop) are "
                               "mutually exclusive; give one")
    if plan and not create_accounts:
        raise click.UsageError("--plan is bought during account setup: add --create-accounts")
    config = LoadConfig(
        target=target, accounts=accounts, account_prefix=account_prefix,
        create_accounts=create_accounts, plan=plan, top_up_micros=_usd_to_micros(top_up),
        skew=skew, hot_fraction=hot_fraction, shape=shape, batch_size=batch_size, view=view,
        client_batching=client_batching, linger_ms=linger_ms,
        concurrency=concurrency, rate=rate, requests=requests, duration_s=duration,
        timeout_s=timeout, max_in_flight=max_in_flight, streams=streams, channels=channels,
        region=region, captcha_type=captcha_type, architecture=architecture, step=step,
        quantity=quantity, dry_run=dry_run, seed=seed)
    try:
        config.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if (hint := require("loadgen", "hdrh")) is not None:
        raise click.ClickException(f"loadtest needs the loadgen extra: {hint}")
    from rich.console import Console

    err = Console(stderr=True)
    out = err if json_out == "-" else Console()
    if plot and not matplotlib_available():
        err.print(f"[yellow]--plot {plot}: matplotlib is not installed, so no plot will be "
                  f"written ({PLOT_EXTRA_HINT}); the run goes on.[/]")
        plot = None
    try:
        result = asyncio.run(_run_with_progress(config, quiet, err))
    except LoadgenError as exc:
        err.print(f"[red]error:[/] {exc}")
        sys.exit(1)
    out.print(summary_table(result))
    if json_out == "-":
        click.echo(result.to_json())
    elif json_out:
        with open(json_out, "w") as f:
            f.write(result.to_json() + "\n")
        err.print(f"result written to {json_out}")
    if plot:
        write_plot(result, plot)
        err.print(f"plot written to {plot}")
    if not result.consistent:
        err.print("[red]sent != acknowledged + errors: the load generator lost count[/]")
        sys.exit(3)


async def _run_with_progress(config: LoadConfig, quiet: bool, console: Any) -> LoadResult:
    """run_load with a rich progress bar. The first Ctrl-C stops sending and waits for what
    is in flight (each call at most --timeout); a second one interrupts."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first_interrupt() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)
        console.print("stopping: waiting for the requests in flight (Ctrl-C again to abort)")

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, first_interrupt)
    try:
        if config.create_accounts:
            if not quiet:
                console.print(f"setting up {len(config.ids()):,} accounts on {config.target}...")
            done = await prepare_accounts(config)
            if not quiet:
                console.print("accounts: " + ", ".join(f"{k} {v:,}" for k, v in done.items()))
            config = LoadConfig(**{**asdict(config), "create_accounts": False})
        if quiet:
            return await run_load(config, stop=stop)
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("[bold]{task.description}"), BarColumn(),
                   TextColumn("{task.fields[stats]}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(f"{config.shape}", total=1000, stats="connecting")

            def tick(snap: dict[str, Any]) -> None:
                p99 = snap["last_second_p99_ms"]
                stats = (f"sent {snap['sent']:,}  acked {snap['acknowledged']:,}  "
                         f"errors {snap['errors']:,}  {snap['last_second_acks']:,}/s  "
                         f"p99 {'-' if p99 is None else f'{p99:.2f} ms'}")
                progress.update(task, completed=int(snap["fraction"] * 1000), stats=stats)

            result = await run_load(config, on_tick=tick, stop=stop)
            tick({"sent": result.sent, "acknowledged": result.acknowledged,
                  "errors": result.error_total, "fraction": 1.0,
                  "last_second_acks": round(result.rate_per_s), "last_second_p99_ms":
                  result.p99_ms})
            return result
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)

