"""`quota-ledger`: the server's command line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

import click

from ledger.errors import InvalidArgument, LedgerError
from ledger.store import DatabaseLocked, backup_to
from ledger.store.urls import is_pg_url
from ledger.verify import verify as check_db

from . import config as config_mod
from . import logs
from .app import DEFAULT_DB, LedgerServer, ServerConfig, StartupError
from .auth import ROLES, create_token
from .config import check_db_path, shown_db
from .console.command import console


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """quota-ledger: the durable quota ledger for CAPTCHA verification billing."""


class _ServeCommand(click.Command):
    """`serve --help` ends with the effective configuration (file and environment)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        try:
            effective = config_mod.to_toml(config_mod.load(ctx.params.get("config")))
        except (OSError, ValueError, LedgerError) as exc:
            effective = f"(cannot read the configuration: {exc})"
        with formatter.section("Effective configuration (defaults < file < environment)"):
            for line in effective.splitlines():
                formatter.write(f"  {line}\n")


def _setting_options(fn: Any) -> Any:
    for s in reversed(config_mod.SETTINGS):
        flag = "--" + s.name.replace("_", "-")
        env = f"{config_mod.ENV_PREFIX}{s.name.upper()}"
        text = f"{s.help} [{s.unit}; default: {config_mod.default(s.name)!r}; env: {env}]"
        if s.unit == "flag":
            fn = click.option(flag, s.name, is_flag=True, default=None, help=text)(fn)
        else:
            fn = click.option(flag, s.name, default=None, help=text, metavar=s.unit.upper(),
                              type=click.Choice(s.choices) if s.choices else None)(fn)
    return fn


@main.command(cls=_ServeCommand)
@click.option("--config", "config", default=None, metavar="PATH", is_eager=True,
              help=f"TOML file with a [server] table (env: {config_mod.CONFIG_ENV}).")
@_setting_options
@click.option("--port-file", default=None, metavar="PATH",
              help="Write the bound ports as JSON here once serving (for scripts and tests; "
                   "lets --listen use port 0).")
def serve(config: str | None, port_file: str | None, **flags: Any) -> None:
    """Run the gRPC server (SIGTERM or Ctrl-C drains in-flight calls and exits 0)."""
    try:
        cfg = config_mod.load(config, flags=flags)
    except (OSError, LedgerError) as exc:
        click.echo(f"quota-ledger: {getattr(exc, 'message', exc)}", err=True)
        sys.exit(2)
    logs.setup(cfg.log_level, cfg.log_format)
    try:
        asyncio.run(_run(cfg, port_file))
    except (DatabaseLocked, StartupError) as exc:
        click.echo(f"quota-ledger: {exc}", err=True)
        sys.exit(2)


main.add_command(console)


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@click.option("--config", "config", default=None, metavar="PATH",
              help=f"TOML file with a [server] table (env: {config_mod.CONFIG_ENV}).")
def config_show(config: str | None) -> None:
    """Print the effective configuration (defaults < file < environment) as TOML."""
    try:
        click.echo(config_mod.to_toml(config_mod.load(config)), nl=False)
    except (OSError, LedgerError) as exc:
        click.echo(f"quota-ledger: {getattr(exc, 'message', exc)}", err=True)
        sys.exit(2)


async def _run(config: ServerConfig, port_file: str | None) -> None:
    srv = LedgerServer(config)
    await srv.start()
    if port_file:
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"grpc": srv.port, "metrics": srv.metrics_port, "pid": os.getpid()}, f)
        os.replace(tmp, port_file)
    click.echo(f"quota-ledger serving on {config.listen} (db {shown_db(config.db)}"
               f"{', test clock' if config.test_clock else ''})", err=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await srv.stop()


def _db_path_or_exit(db: str) -> None:
    try:
        check_db_path(db)
    except InvalidArgument as exc:
        click.echo(f"quota-ledger: {exc.message}", err=True)
        sys.exit(2)


@main.command()
@click.option("--db", default=DEFAULT_DB, show_default=True, metavar="PATH|URL",
              help="The journal database to check (opened read-only): an SQLite file or a "
                   "postgresql:// URL.")
def verify(db: str) -> None:
    """Check SQLite integrity, the journal's hash chain, and that every derived figure
    (balances, plans, usage, bills) equals a rebuild from the journal alone (R25).

    Exits 0 when clean, 1 with the first divergence otherwise."""
    _db_path_or_exit(db)
    if not is_pg_url(db) and not os.path.exists(db):
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
    _db_path_or_exit(db)
    if is_pg_url(db):
        click.echo("quota-ledger: a PostgreSQL ledger is backed up with PostgreSQL's own tools "
                   "(pg_dump, pg_basebackup, a standby); see docs/scaling.md", err=True)
        sys.exit(2)
    if os.path.exists(to):
        click.echo(f"quota-ledger: {to} exists; refusing to overwrite it", err=True)
        sys.exit(2)
    backup_to(db, to)
    click.echo(f"backed up {db} to {to}")


@main.command()
@click.option("--from", "src", required=True, metavar="PATH.db",
              help="The SQLite ledger to copy (no server may be running on it).")
@click.option("--to", "dst", required=True, metavar="URL",
              help="An empty PostgreSQL database: postgresql://USER@HOST:PORT/DBNAME.")
def migrate(src: str, dst: str) -> None:
    """Copy a whole SQLite ledger into an empty PostgreSQL database, then verify both sides
    (chains and derived figures, R25). Refuses a target that already holds a ledger.

    Every old request_id still replays its original result on PostgreSQL (R12)."""
    from rich.progress import Progress

    from ledger.store.moving import TargetNotEmpty, copy_ledger
    _db_path_or_exit(src)
    if is_pg_url(src) or not os.path.exists(src):
        click.echo(f"quota-ledger: --from must be an existing SQLite file; got {src}", err=True)
        sys.exit(2)
    if not is_pg_url(dst):
        click.echo("quota-ledger: --to must be a postgresql:// URL", err=True)
        sys.exit(2)
    try:
        with Progress(transient=True) as bar:
            task = bar.add_task("copying the journal", total=None)
            rows = copy_ledger(src, dst, lambda done, total: bar.update(
                task, completed=done, total=total))
    except (TargetNotEmpty, DatabaseLocked, LedgerError) as exc:
        click.echo(f"quota-ledger: {getattr(exc, 'message', exc)}", err=True)
        sys.exit(2)
    for side in (src, dst):
        report = check_db(side)
        if not report.ok:
            for problem in report.problems:
                click.echo(f"FAILED ({shown_db(side)}): {problem}", err=True)
            sys.exit(1)
    click.echo(f"copied {rows:,} journal rows from {src} to {shown_db(dst)}; "
               f"both verify: chains and derived figures agree")


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
