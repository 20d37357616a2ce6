"""`quota-ledger`: the server's command line."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

import click

from ledger.store import DatabaseLocked, backup_to
from ledger.verify import verify as check_db

from .app import DEFAULT_DB, DEFAULT_LISTEN, LedgerServer, ServerConfig, StartupError
from .auth import ROLES, create_token


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
@click.option("--metrics-listen", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics over HTTP here (off when not given).")
@click.option("--port-file", default=None, metavar="PATH",
              help="Write the bound ports as JSON here once serving (for scripts and tests; "
                   "lets --listen use port 0).")
@click.option("--tokens", default=None, metavar="PATH",
              help="TOML file of bearer-token hashes and roles; turns authentication on.")
@click.option("--tls-cert", default=None, metavar="PEM", help="Serve TLS with this certificate.")
@click.option("--tls-key", default=None, metavar="PEM", help="The certificate's private key.")
@click.option("--tls-client-ca", default=None, metavar="PEM",
              help="Require client certificates signed by this CA (mutual TLS).")
@click.option("--insecure", is_flag=True,
              help="Allow a non-loopback --listen without authentication.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(listen: str, db: str, catalog: str | None, test_clock: bool,
          metrics_listen: str | None, port_file: str | None, tokens: str | None,
          tls_cert: str | None, tls_key: str | None, tls_client_ca: str | None, insecure: bool,
          log_level: str) -> None:
    """Run the gRPC server (SIGTERM or Ctrl-C drains in-flight calls and exits 0)."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(listen=listen, db=db, catalog=catalog, test_clock=test_clock,
                          metrics_listen=metrics_listen, tokens=tokens, tls_cert=tls_cert,
                          tls_key=tls_key, tls_client_ca=tls_client_ca, insecure=insecure)
    try:
        asyncio.run(_run(config, port_file))
    except (DatabaseLocked, StartupError) as exc:
        click.echo(f"quota-ledger: {exc}", err=True)
        sys.exit(2)


async def _run(config: ServerConfig, port_file: str | None) -> None:
    srv = LedgerServer(config)
    await srv.start()
    if port_file:
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"grpc": srv.port, "metrics": srv.metrics_port, "pid": os.getpid()}, f)
        os.replace(tmp, port_file)
    click.echo(f"quota-ledger serving on {config.listen} (db {config.db}"
               f"{', test clock' if config.test_clock else ''})", err=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await srv.stop()


@main.command()
@click.option("--db", default=DEFAULT_DB, show_default=True, metavar="PATH",
              help="The journal database to check (opened read-only).")
def verify(db: str) -> None:
    """Check SQLite integrity, the journal's hash chain, and that every derived figure
    (balances, plans, usage, bills) equals a rebuild from the journal alone (R25).

    Exits 0 when clean, 1 with the first divergence otherwise."""
    if not os.path.exists(db):
        click.echo(f"quota-ledger: no database at {db}", err=True)
        sys.exit(2)
    report = check_db(db)
    if report.ok:
        click.echo(f"ok: {report.entries:,} journal entries; chain and derived figures agree")
        return
    for problem in report.problems:
        click.echo(f"FAILED: {problem}", err=True)
    sys.exit(1)


@main.command()
@click.option("--db", default=DEFAULT_DB, show_default=True, metavar="PATH",
              help="The live journal database.")
@click.option("--to", "to", required=True, metavar="FILE", help="Where to write the copy.")
def backup(db: str, to: str) -> None:
    """Take an online backup (SQLite backup API) while the server keeps writing."""
    if os.path.exists(to):
        click.echo(f"quota-ledger: {to} exists; refusing to overwrite it", err=True)
        sys.exit(2)
    backup_to(db, to)
    click.echo(f"backed up {db} to {to}")


@main.group()
def token() -> None:
    """Manage bearer tokens (only their SHA-256 hashes are stored)."""


@token.command("create")
@click.option("--tokens", "path", required=True, metavar="PATH", help="The tokens file.")
@click.option("--name", required=True, help="Who holds the token (shown in errors, logs).")
@click.option("--role", required=True, type=click.Choice(list(ROLES)),
              help="consumer: Consume RPCs; reader: queries; admin: everything.")
@click.option("--account", "accounts", multiple=True, metavar="ID",
              help="Limit the token to this account (repeatable).")
def token_create(path: str, name: str, role: str, accounts: tuple[str, ...]) -> None:
    """Make a token, append its hash to the tokens file, print the token once."""
    click.echo(create_token(path, name, role, list(accounts)))
