"""ledgerctl's command group, its global options and the one client a command uses.

Every verb calls the server through :class:`clients.client.LedgerClient`. Output is a table
for people, or with ``--json`` the server's protobuf reply as proto3 JSON (field names as in
the .proto, int64 as strings, timestamps in UTC, every field present even when zero).

A refused call prints ``error: <CODE> <REASON>: <message>`` on stderr and exits 1; a usage
error exits 2 (click's default).

Extending: another module can add a verb with ``main.add_command(cmd)`` (``loadtest``, from
``clients/loadgen/``, is added so; this package's verb modules register themselves). The
verb gets the global options through ``@click.pass_obj`` as a :class:`CliState`:
``state.client()`` is a connected :class:`LedgerClient`, and ``state.call("method", ...)``
calls that client method and turns a :class:`LedgerError` into the standard error exit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import click
import grpc

from clients.client import LedgerClient
from clients.wire import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, LedgerError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@dataclass
class CliState:
    """The global options, and the one client a command uses."""

    target: str = DEFAULT_TARGET
    timeout_s: float = DEFAULT_TIMEOUT_S
    json: bool = False
    token: str | None = field(default=None, repr=False)  # never printed
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    _client: LedgerClient | None = field(default=None, repr=False)

    def client(self) -> LedgerClient:
        if self._client is None:
            self._client = LedgerClient(self.target, timeout_s=self.timeout_s, token=self.token,
                                        tls_ca=self.tls_ca, tls_cert=self.tls_cert,
                                        tls_key=self.tls_key)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``LedgerClient.<method>``; a refusal becomes the standard error and exit 1."""
        try:
            return getattr(self.client(), method)(*args, **kwargs)
        except LedgerError as exc:
            fail(exc, self)
        except ValueError as exc:  # the client library refused to build the request
            raise click.UsageError(str(exc)) from None


def fail(exc: LedgerError, state: CliState) -> NoReturn:
    """Print ``error: CODE REASON: message`` on stderr and exit 1."""
    code = exc.code.name
    message = exc.message
    no_detail = exc.reason == code  # no ErrorInfo: the refusal came from gRPC, not the ledger
    if exc.code is grpc.StatusCode.UNAVAILABLE and no_detail:
        message = (f"cannot reach the ledger at {state.target} "
                   f"(is `quota-ledger serve` running there?)")
    elif exc.code is grpc.StatusCode.DEADLINE_EXCEEDED and no_detail:
        message = (f"no answer from the ledger at {state.target} within "
                   f"{state.timeout_s:g}s (--timeout)")
    elif exc.code is grpc.StatusCode.UNIMPLEMENTED and no_detail:
        message = f"{message} (the server at {state.target} does not serve this call"
        message += "; TestClock is served only with --test-clock)" if _in_time_group() else ")"
    click.echo(f"error: {code} {exc.reason}: {message}", err=True)
    raise click.exceptions.Exit(1)


def _in_time_group() -> bool:
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.parent is not None and ctx.parent.info_name == "time"


# --------------------------------------------------------------------------- the group

@click.group(context_settings=CONTEXT_SETTINGS)
@click.option("--target", metavar="HOST:PORT", envvar="LEDGER_TARGET", default=DEFAULT_TARGET,
              show_default=True, show_envvar=True,
              help="Address of the ledger's gRPC server; several nodes as a comma-separated "
                   "list of IPv4 HOST:PORTs (each account to its home node, with failover), "
                   "or dns:///NAME:PORT (round robin).")
@click.option("--timeout", "timeout_s", metavar="SECONDS", type=click.FloatRange(min=0,
              min_open=True), default=DEFAULT_TIMEOUT_S, show_default=True,
              help="Deadline of each call (a call that may be retried gets it on each try).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the server's reply as JSON (proto field names) instead of tables.")
@click.option("--token", envvar="LEDGER_TOKEN", show_envvar=True, default=None,
              help="Bearer token, for a server started with --tokens (prefer the variable).")
@click.option("--tls-ca", metavar="PEM", default=None,
              help="Connect with TLS, trusting this CA for the server's certificate.")
@click.option("--tls-cert", metavar="PEM", default=None,
              help="Client certificate, for a server that requires mutual TLS.")
@click.option("--tls-key", metavar="PEM", default=None, help="The client certificate's key.")
@click.version_option(package_name="quota-ledger", prog_name="ledgerctl")
@click.pass_context
def main(ctx: click.Context, target: str, timeout_s: float, as_json: bool, token: str | None,
         tls_ca: str | None, tls_cert: str | None, tls_key: str | None) -> None:
    """Operate a quota-ledger server: accounts, funds, plans, consumption, usage, bills.

    Money is given and shown in USD (exact, to the micro-USD); days and times are in the
    billing time zone, UTC+8.

    \b
    Example:
      ledgerctl --target 127.0.0.1:50051 account show acme
    """
    state = CliState(target=target, timeout_s=timeout_s, json=as_json, token=token,
                     tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
    ctx.obj = state
    ctx.call_on_close(state.close)

