"""`quota-ledger console`: its flags. The web stack is imported only when it starts."""

from __future__ import annotations

import sys

import click

from ..auth import is_loopback

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_TARGET = "127.0.0.1:50051"


@click.command("console")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="Address to serve HTTP on (port 0: any free port). Loopback only unless "
                   "--insecure.")
@click.option("--target", default=DEFAULT_TARGET, show_default=True, metavar="HOST:PORT",
              envvar="LEDGER_TARGET", show_envvar=True, help="Address of the ledger's gRPC server.")
@click.option("--token", envvar="LEDGER_TOKEN", show_envvar=True, default=None,
              help="Bearer token sent to the ledger: a reader token is enough. Every visitor "
                   "sees what this token may see.")
@click.option("--tls-ca", metavar="PEM", default=None,
              help="CA that signed the ledger's TLS certificate: talk to it over TLS.")
@click.option("--tls-cert", metavar="PEM", default=None,
              help="Client certificate for a ledger that requires mutual TLS.")
@click.option("--tls-key", metavar="PEM", default=None, help="The client certificate's key.")
@click.option("--insecure", is_flag=True,
              help="Allow a non-loopback --listen and any Host header. The console has no "
                   "login of its own: anyone who reaches it sees what its token sees.")
@click.option("--timeout", "timeout_s", default=5.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=0.1, max=60), help="Deadline of each call to the ledger.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]),
              help="Least severe log level written (debug also logs each request).")
@click.option("--port-file", default=None, metavar="PATH",
              help="Write the bound port as JSON here once listening (for scripts and tests; "
                   "lets --listen use port 0).")
def console(listen: str, target: str, token: str | None, tls_ca: str | None,
            tls_cert: str | None, tls_key: str | None, insecure: bool, timeout_s: float,
            log_level: str, port_file: str | None) -> None:
    """Serve the read-only web console: accounts, plans, usage and bills in a browser.

    It is a client of the ledger over gRPC (any node, any database, under authentication
    with a reader token), and changes nothing. Pages: /, /accounts/ID, /accounts/ID/usage,
    /accounts/ID/bills. Example: quota-ledger console --target 127.0.0.1:50051
    """
    if not is_loopback(listen) and not insecure:
        click.echo(f"quota-ledger console: refusing to listen on {listen}: the console has no "
                   "login of its own, so anyone who reaches it sees what its token sees; "
                   "use a loopback address or pass --insecure", err=True)
        sys.exit(2)
    from .app import ConsoleConfig, serve, split_listen

    try:
        split_listen(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    config = ConsoleConfig(listen=listen, target=target, token=token, tls_ca=tls_ca,
                           tls_cert=tls_cert, tls_key=tls_key, timeout_s=timeout_s,
                           log_level=log_level, insecure=insecure)
    try:
        serve(config, port_file)
    except OSError as exc:
        click.echo(f"quota-ledger console: cannot listen on {listen}: {exc}", err=True)
        sys.exit(2)
