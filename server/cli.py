"""`quota-ledger`: the server's command line."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import click

from ledger.store import DatabaseLocked

from .app import DEFAULT_DB, DEFAULT_LISTEN, LedgerServer, ServerConfig, StartupError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """quota-ledger: the durable quota ledger for CAPTCHA verification billing."""


@main.command()
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="Address to serve gRPC on.")
@click.option("--db", default=DEFAULT_DB, show_default=True, metavar="PATH",
              help="SQLite journal file; created with its folder if missing.")
@click.option("--catalog", default=None, metavar="PATH",
              help="TOML plan catalog replacing the built-in one (see docs).")
@click.option("--test-clock", is_flag=True,
              help="Serve the TestClock service; time moves only when told to.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(listen: str, db: str, catalog: str | None, test_clock: bool, log_level: str) -> None:
    """Run the gRPC server (SIGTERM or Ctrl-C drains in-flight calls and exits 0)."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(listen=listen, db=db, catalog=catalog, test_clock=test_clock)
    try:
        asyncio.run(_run(config))
    except (DatabaseLocked, StartupError) as exc:
        click.echo(f"quota-ledger: {exc}", err=True)
        sys.exit(2)


async def _run(config: ServerConfig) -> None:
    srv = LedgerServer(config)
    await srv.start()
    click.echo(f"quota-ledger serving on {config.listen} (db {config.db}"
               f"{', test clock' if config.test_clock else ''})", err=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await srv.stop()
