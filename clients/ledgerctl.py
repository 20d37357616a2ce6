"""ledgerctl: the command-line client of quota-ledger, over gRPC.

Every verb calls the server through :class:`clients.client.LedgerClient`. Output is a table
for people, or with ``--json`` the server's protobuf reply as proto3 JSON (field names as in
the .proto, int64 as strings, timestamps in UTC, every field present even when zero).

A refused call prints ``error: <CODE> <REASON>: <message>`` on stderr and exits 1; a usage
error exits 2 (click's default).

Extending: another module can add a verb with ``main.add_command(cmd)`` (``loadtest``, from
``clients/loadgen.py``, is added so). The verb gets the global options through
``@click.pass_obj`` as a :class:`CliState`: ``state.client()`` is a connected
:class:`LedgerClient`, and ``state.call("method", ...)`` calls that client method and turns a
:class:`LedgerError` into the standard error exit.
"""

from __future__ import annotations

import csv
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn

import click
import grpc
from google.protobuf.json_format import MessageToJson
from quota_ledger.v1 import common_pb2 as pb
from rich.console import Console, Group, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from clients.client import DEFAULT_TARGET, DEFAULT_TIMEOUT_S, LedgerClient, LedgerError
from clients.loadgen import loadtest
from ledger.calendar import BILLING_TZ, days_between
from ledger.money import MICROS_PER_USD, format_usd

INT64_MAX = 2**63 - 1
EXPORT_DAYS_MAX = 366
# Modules that register extra verbs on `main` when imported (e.g. a future `loadtest`).
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DURATION_RE = re.compile(r"^(\d+)([smhdw]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# --------------------------------------------------------------------------- shared state

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


# --------------------------------------------------------------------------- formatting

def _console() -> Console:
    """A console on the current stdout; wide when it is not a terminal, so nothing is cut."""
    out = sys.stdout
    width = None if out.isatty() else 200
    return Console(file=out, width=width, highlight=False, soft_wrap=False)


def usd(micros: int) -> str:
    return format_usd(micros)


def units(n: int) -> str:
    return f"{n:,}"


def enum_name(enum: Any, number: int) -> str:
    """REGION_CHINESE_MAINLAND -> chinese_mainland; 0 -> ''; unknown numbers as digits."""
    if number == 0:
        return ""
    prefix = enum.DESCRIPTOR.values_by_number[0].name[: -len("UNSPECIFIED")]
    try:
        name = enum.Name(number)
    except ValueError:
        return str(number)
    return name.removeprefix(prefix).lower()


def when(msg: Any, field_name: str) -> str:
    """A Timestamp field in UTC+8 ISO format, or '-' when unset."""
    if not msg.HasField(field_name):
        return "-"
    return getattr(msg, field_name).ToDatetime(tzinfo=BILLING_TZ).isoformat()


def emit_json(message: Any) -> None:
    click.echo(MessageToJson(message, preserving_proto_field_name=True,
                             always_print_fields_with_no_presence=True, ensure_ascii=False))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[str]],
          numeric: Iterable[str] = ()) -> RenderableType:
    numeric = set(numeric)
    t = Table()
    for col in columns:
        if col in numeric:
            t.add_column(col, justify="right", no_wrap=True)
        else:
            t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*row)
    return titled(title, t)


def titled(title: str | None, t: Table) -> RenderableType:
    """The title on its own line above the table: never wrapped to the table's width."""
    return Group(Text(title, style="bold"), t) if title else t


def fields_table(title: str | None, pairs: Iterable[tuple[str, str]]) -> RenderableType:
    t = Table(show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in pairs:
        t.add_row(k, v)
    return titled(title, t)


def output(state: CliState, message: Any, view: Callable[[], Sequence[Any]]) -> None:
    """The reply as JSON with --json, else the tables that ``view`` builds from it."""
    if state.json:
        emit_json(message)
    else:
        show(*view())


def show(*renderables: Any) -> None:
    console = _console()
    for r in renderables:
        console.print(r)


def account_view(a: pb.Account, title: str | None = None) -> RenderableType:
    return fields_table(title or f"account {a.account_id}", [
        ("account_id", a.account_id),
        ("display_name", a.display_name or "-"),
        ("status", enum_name(pb.AccountStatus, a.status)),
        ("cash balance (USD)", usd(a.cash_balance_micros)),
        ("voucher balance (USD)", usd(a.voucher_balance_micros)),
        ("outstanding (USD)", usd(a.outstanding_micros)),
        ("overdue since", when(a, "overdue_since")),
        ("scenarios", ", ".join(a.scenario_ids) or "-"),
        ("custom policy", "enabled" if a.custom_policy_enabled else "disabled"),
        ("created at", when(a, "created_at")),
        ("suspended at", when(a, "suspended_at")),
    ])


def plan_view(p: pb.Plan, title: str | None = None) -> RenderableType:
    return fields_table(title or f"plan {p.plan_id}", [
        ("plan_id", p.plan_id),
        ("account_id", p.account_id),
        ("spec_id", p.spec_id),
        ("status", enum_name(pb.PlanStatus, p.status)),
        ("validity", enum_name(pb.PlanValidity, p.validity)),
        ("units total", units(p.units_total)),
        ("units consumed", units(p.units_consumed)),
        ("units remaining", units(p.units_remaining)),
        ("units forfeited", units(p.units_forfeited)),
        ("price (USD)", usd(p.price_micros)),
        ("paid from vouchers (USD)", usd(p.paid_voucher_micros)),
        ("paid from cash (USD)", usd(p.paid_cash_micros)),
        ("purchased at", when(p, "purchased_at")),
        ("expires at", when(p, "expires_at")),
        ("refunded at", when(p, "refunded_at")),
    ])


PLAN_COLUMNS = ("plan_id", "spec", "status", "remaining", "consumed", "total", "price (USD)",
                "purchased at", "expires at")
PLAN_NUMERIC = ("remaining", "consumed", "total", "price (USD)")


def plan_row(p: pb.Plan) -> list[str]:
    return [p.plan_id, p.spec_id, enum_name(pb.PlanStatus, p.status),
            units(p.units_remaining), units(p.units_consumed), units(p.units_total),
            usd(p.price_micros), when(p, "purchased_at"), when(p, "expires_at")]


BILL_COLUMNS = ("account", "billing day", "total (USD)", "due (USD)", "paid voucher (USD)",
                "paid cash (USD)", "outstanding (USD)")
BILL_NUMERIC = BILL_COLUMNS[2:]


def bill_row(b: pb.Bill) -> list[str]:
    return [b.account_id, b.billing_day, usd(b.total_micros), usd(b.amount_due_micros),
            usd(b.paid_voucher_micros), usd(b.paid_cash_micros), usd(b.outstanding_micros)]


def write_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    sys.stdout.flush()


# --------------------------------------------------------------------------- parameter types

class Day(click.ParamType):
    """A billing day written YYYY-MM-DD."""

    name = "YYYY-MM-DD"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        if not (isinstance(value, str) and _DAY_RE.match(value)):
            self.fail(f"{value!r} is not a billing day written YYYY-MM-DD", param, ctx)
        try:
            return date.fromisoformat(value).isoformat()
        except ValueError:
            self.fail(f"{value!r} is not a real calendar date", param, ctx)


class Instant(click.ParamType):
    """An ISO 8601 instant; without an offset it is read as UTC+8 (the billing time zone)."""

    name = "ISO8601"

    def convert(self, value: Any, param: Any, ctx: Any) -> datetime:
        if isinstance(value, datetime):
            dt = value
        else:
            try:
                dt = datetime.fromisoformat(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not an ISO 8601 time such as "
                          "2027-01-01T00:00:00+08:00", param, ctx)
        return dt if dt.tzinfo is not None else dt.replace(tzinfo=BILLING_TZ)


class Duration(click.ParamType):
    """Whole seconds, optionally with a unit: 90, 90s, 15m, 36h, 1d, 2w."""

    name = "SECONDS"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        m = _DURATION_RE.match(str(value).strip().lower())
        if not m:
            self.fail(f"{value!r} is not a duration such as 3600, 90m, 36h or 1d", param, ctx)
        seconds = int(m.group(1)) * _DURATION_UNITS[m.group(2)]
        if seconds > INT64_MAX:
            self.fail(f"{value!r} is too large", param, ctx)
        return seconds


def parse_amount(amount: str, micros: bool) -> int:
    """AMOUNT in USD (exact, at most 6 decimals) or, with --micros, in integer micro-USD."""
    text = amount.strip()
    if micros:
        if not re.fullmatch(r"\+?\d+", text):
            raise click.BadParameter(f"{amount!r} is not a whole number of micro-USD "
                                     "(--micros)", param_hint="AMOUNT")
        value = int(text)
    else:
        try:
            usd_amount = Decimal(text)
        except InvalidOperation:
            raise click.BadParameter(f"{amount!r} is not a USD amount such as 12.50",
                                     param_hint="AMOUNT") from None
        if not usd_amount.is_finite():
            raise click.BadParameter(f"{amount!r} is not a USD amount such as 12.50",
                                     param_hint="AMOUNT")
        scaled = usd_amount * MICROS_PER_USD
        if scaled != scaled.to_integral_value():
            raise click.BadParameter(
                f"{amount!r} has more than 6 decimals; the smallest amount is USD 0.000001 "
                "(one micro-USD)", param_hint="AMOUNT")
        value = int(scaled)
    if value <= 0:
        raise click.BadParameter(f"{amount!r} must be more than zero", param_hint="AMOUNT")
    if value > INT64_MAX:
        raise click.BadParameter(f"{amount!r} is too large", param_hint="AMOUNT")
    return value


request_id_option = click.option(
    "--request-id", metavar="ID", default=None,
    help="Idempotency key (1..128 printable ASCII). Repeat a call with the same key to retry "
         "it safely; default: a new random key.")


# --------------------------------------------------------------------------- the group

@click.group(context_settings=CONTEXT_SETTINGS)
@click.option("--target", metavar="HOST:PORT", envvar="LEDGER_TARGET", default=DEFAULT_TARGET,
              show_default=True, show_envvar=True, help="Address of the ledger's gRPC server.")
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


# --------------------------------------------------------------------------- plans

@main.command()
@click.pass_obj
def specs(state: CliState) -> None:
    """List the resource plans that can be bought (ListPlanSpecs).

    \b
    Example:
      ledgerctl specs
    """
    r = state.call("list_plan_specs")
    if state.json:
        emit_json(r)
        return
    show(table("plan specs", ("spec_id", "units", "validity", "price (USD)"),
               ([s.spec_id, units(s.units), enum_name(pb.PlanValidity, s.validity),
                 usd(s.price_micros)] for s in r.specs),
               numeric=("units", "price (USD)")))


@main.command()
@click.argument("account_id")
@click.argument("spec_id")
@request_id_option
@click.pass_obj
def buy(state: CliState, account_id: str, spec_id: str, request_id: str | None) -> None:
    """Buy a resource plan for an account (PurchasePlan).

    SPEC_ID is one of the specs listed by `ledgerctl specs`. The price is paid from vouchers
    first, then cash; the purchase is refused if both together cannot pay it.

    \b
    Example:
      ledgerctl buy acme month-100k --request-id buy-1
    """
    p = state.call("purchase_plan", account_id, spec_id, request_id=request_id)
    output(state, p, lambda: [plan_view(p, f"bought plan {p.plan_id}")])


@main.command()
@click.argument("plan_id")
@click.option("--reason", default="", help="Why the plan is refunded (kept in the journal).")
@request_id_option
@click.pass_obj
def refund(state: CliState, plan_id: str, reason: str, request_id: str | None) -> None:
    """Refund an unused plan bought at most 5 days ago (RefundPlan).

    Refused once a unit was consumed or 120 hours have passed. The price goes back to the
    vouchers and cash that paid it.

    \b
    Example:
      ledgerctl refund 0190f3c2-plan --reason "bought by mistake"
    """
    p = state.call("refund_plan", plan_id, reason=reason, request_id=request_id)
    output(state, p, lambda: [plan_view(p, f"refunded plan {p.plan_id}")])


@main.command()
@click.argument("account_id")
@click.pass_obj
def remaining(state: CliState, account_id: str) -> None:
    """Show an account's plan units left (GetRemaining).

    Lists the valid plans with units left, in the order they are consumed, their total, and
    today's pay-as-you-go units and cost.

    \b
    Example:
      ledgerctl remaining acme
    """
    r = state.call("get_remaining", account_id)
    if state.json:
        emit_json(r)
        return
    show(table(f"plans of {account_id} with units left", PLAN_COLUMNS,
               (plan_row(p) for p in r.plans), numeric=PLAN_NUMERIC),
         fields_table("totals", [
             ("units remaining", units(r.units_remaining_total)),
             ("billing day", r.billing_day or "-"),
             ("pay-as-you-go units today", units(r.payg_units)),
             ("pay-as-you-go today (USD)", usd(r.payg_amount_micros)),
         ]))


@main.command()
@click.argument("account_id")
@click.option("--all", "include_inactive", is_flag=True,
              help="Also list exhausted, expired and refunded plans.")
@click.pass_obj
def plans(state: CliState, account_id: str, include_inactive: bool) -> None:
    """List an account's plans (ListPlans).

    Active plans only; with --all also exhausted, expired and refunded ones.

    \b
    Example:
      ledgerctl plans acme --all
    """
    r = state.call("list_plans", account_id, include_inactive=include_inactive)
    if state.json:
        emit_json(r)
        return
    title = f"{'all' if include_inactive else 'active'} plans of {account_id}"
    show(table(title, PLAN_COLUMNS, (plan_row(p) for p in r.plans), numeric=PLAN_NUMERIC))


# --------------------------------------------------------------------------- consumption

@main.command()
@click.argument("account_id")
@click.option("--region", type=click.Choice(["mainland", "outside"]), default="mainland",
              show_default=True, help="Chinese mainland, or outside it.")
@click.option("--type", "captcha_type", type=click.Choice(
    ["slider", "puzzle", "one_click", "image_restoration", "invisible"]), default="slider",
    show_default=True, help="CAPTCHA type.")
@click.option("--arch", "architecture", type=click.Choice(["v2", "v3"]), default="v2",
              show_default=True, help="Client architecture.")
@click.option("--step", type=click.Choice(["3", "4.1"]), default="3", show_default=True,
              help="Verification step.")
@click.option("--quantity", type=click.IntRange(1, INT64_MAX), default=1, show_default=True,
              help="Number of billable requests under this one key (at most 1,000,000).")
@click.option("--scenario", "scenario_id", metavar="ID", default=None,
              help="Scenario the verification belongs to.")
@click.option("--dry-run", is_flag=True, help="Answer what would happen; change nothing.")
@request_id_option
@click.pass_obj
def consume(state: CliState, account_id: str, region: str, captcha_type: str,
            architecture: str, step: str, quantity: int, scenario_id: str | None,
            dry_run: bool, request_id: str | None) -> None:
    """Record billable verification requests (Consume).

    Units come from the account's valid plans first (earliest expiry first), then
    pay-as-you-go. Not every type/architecture/step combination is billable.

    \b
    Example:
      ledgerctl consume acme --region outside --type invisible --arch v3 --step 4.1 \\
          --quantity 100 --request-id evt-42
    """
    r = state.call("consume", account_id, region=region, captcha_type=captcha_type,
                   architecture=architecture, step=step, quantity=quantity,
                   scenario_id=scenario_id, dry_run=dry_run, request_id=request_id)
    if state.json:
        emit_json(r)
        return
    allocations = ", ".join(f"{a.plan_id}: {units(a.units)}" for a in r.allocations)
    title = "dry run (nothing recorded)" if dry_run else (
        "replayed (already recorded)" if r.replayed else "recorded")
    show(fields_table(title, [
        ("request_id", r.request_id or request_id or "-"),
        ("billable", "yes" if r.billable else "no"),
        ("billing day", r.billing_day or "-"),
        ("recorded at", when(r, "recorded_at")),
        ("plan units", allocations or "-"),
        ("pay-as-you-go units", units(r.payg_units)),
        ("pay-as-you-go (USD)", usd(r.payg_amount_micros)),
        ("plan units remaining", units(r.plan_units_remaining)),
        ("replayed", "yes" if r.replayed else "no"),
    ]))


USAGE_CSV_HEADER = ("billing_day", "kind", "plan_id", "region", "units", "amount_micros")


@main.command()
@click.argument("account_id")
@click.argument("from_day", type=Day())
@click.argument("to_day", type=Day())
@click.option("--csv", "as_csv", is_flag=True,
              help="Print CSV (billing_day,kind,plan_id,region,units,amount_micros); "
                   "takes precedence over --json.")
@click.pass_obj
def usage(state: CliState, account_id: str, from_day: str, to_day: str, as_csv: bool) -> None:
    """Show an account's usage per billing day (GetUsage).

    FROM_DAY and TO_DAY are billing days, both included. Each day lists the units each plan
    covered (kind plan) and the pay-as-you-go units and cost per region (kind payg).

    \b
    Example:
      ledgerctl usage acme 2027-03-01 2027-03-31 --csv > march.csv
    """
    r = state.call("get_usage", account_id, from_day, to_day)
    if state.json and not as_csv:
        emit_json(r)
        return
    rows: list[tuple[str, str, str, str, int, int]] = []
    for day in r.days:
        for pu in day.plan_units:
            rows.append((day.billing_day, "plan", pu.plan_id, "", pu.units, 0))
        for ru in day.payg:
            rows.append((day.billing_day, "payg", "", enum_name(pb.Region, ru.region),
                         ru.units, ru.amount_micros))
    if as_csv:
        write_csv(USAGE_CSV_HEADER, rows)
        return
    show(table(f"usage of {account_id}, {from_day} to {to_day}",
               ("billing day", "kind", "plan_id", "region", "units", "amount (USD)"),
               ([d, k, p or "-", reg or "-", units(n), usd(a)] for d, k, p, reg, n, a in rows),
               numeric=("units", "amount (USD)")),
         fields_table("totals", [
             ("plan units", units(sum(x[4] for x in rows if x[1] == "plan"))),
             ("pay-as-you-go units", units(sum(x[4] for x in rows if x[1] == "payg"))),
             ("pay-as-you-go (USD)", usd(sum(x[5] for x in rows))),
         ]))


# --------------------------------------------------------------------------- settlement

@main.command()
@click.argument("day", type=Day())
@click.pass_obj
def settle(state: CliState, day: str) -> None:
    """Settle an ended billing day for all accounts now (SettleDay).

    The ledger also settles every ended day by itself; settling again returns the same bills.

    \b
    Example:
      ledgerctl settle 2027-03-09
    """
    with Console(file=sys.stderr, highlight=False).status(f"settling {day} ..."):
        r = state.call("settle_day", day)
    if state.json:
        emit_json(r)
        return
    show(table(f"bills of {day} ({len(r.bills)})", BILL_COLUMNS,
               (bill_row(b) for b in r.bills), numeric=BILL_NUMERIC))


def bill_tables(b: pb.Bill) -> list[RenderableType]:
    lines = table(f"bill of {b.account_id} for {b.billing_day}, dated {b.bill_date}",
                  ("item", "region", "quantity", "unit price (USD)", "amount (USD)"),
                  ([ln.item, enum_name(pb.Region, ln.region) or "-", units(ln.quantity),
                    usd(ln.unit_price_micros), usd(ln.amount_micros)] for ln in b.lines),
                  numeric=("quantity", "unit price (USD)", "amount (USD)"))
    out = [lines]
    if b.plan_offsets:
        out.append(table("units offset by plans (no cost)", ("plan_id", "units"),
                         ([o.plan_id, units(o.units)] for o in b.plan_offsets),
                         numeric=("units",)))
    out.append(fields_table("totals", [
        ("total (USD)", usd(b.total_micros)),
        ("amount due (USD)", usd(b.amount_due_micros)),
        ("paid from vouchers (USD)", usd(b.paid_voucher_micros)),
        ("paid from cash (USD)", usd(b.paid_cash_micros)),
        ("outstanding (USD)", usd(b.outstanding_micros)),
        ("issued at", when(b, "issued_at")),
    ]))
    return out


@main.command()
@click.argument("account_id")
@click.argument("day", type=Day())
@click.pass_obj
def bill(state: CliState, account_id: str, day: str) -> None:
    """Show an account's bill for one billing day (GetBill).

    \b
    Example:
      ledgerctl bill acme 2027-03-09
    """
    b = state.call("get_bill", account_id, day)
    output(state, b, lambda: [*bill_tables(b)])


BILLS_CSV_HEADER = ("account_id", "billing_day", "bill_date", "item", "region", "quantity",
                    "unit_price_micros", "amount_micros")


def bill_csv_rows(b: pb.Bill) -> list[tuple[Any, ...]]:
    """One row per bill line, then a row with item=total."""
    rows: list[tuple[Any, ...]] = [
        (b.account_id, b.billing_day, b.bill_date, ln.item, enum_name(pb.Region, ln.region),
         ln.quantity, ln.unit_price_micros, ln.amount_micros) for ln in b.lines]
    rows.append((b.account_id, b.billing_day, b.bill_date, "total", "", "", "",
                 b.total_micros))
    return rows


@main.command("export-bills")
@click.argument("from_day", type=Day())
@click.argument("to_day", type=Day())
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv",
              show_default=True, help="CSV (one row per bill line, plus a total row per bill) "
                                      "or JSON lines (one Bill per line).")
@click.option("--out", "out", type=click.File("w"), default="-", show_default=True,
              help="Where to write; - is standard output.")
@click.pass_obj
def export_bills(state: CliState, from_day: str, to_day: str, fmt: str, out: Any) -> None:
    """Export every account's bills for a range of ended days (SettleDay, day by day).

    Settling a settled day returns its bills again and charges nothing (R19), so this is
    safe to run any time; a day that has not ended stops the export with DAY_NOT_ENDED.
    A progress bar on stderr counts days and bills.

    \b
    Example:
      ledgerctl export-bills 2027-03-01 2027-03-31 --out march.csv
    """
    days = days_between(from_day, to_day)
    if not days or len(days) > EXPORT_DAYS_MAX:
        raise click.UsageError(f"give 1 to {EXPORT_DAYS_MAX} days, FROM_DAY first")
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(BILLS_CSV_HEADER)
    exported = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=Console(file=sys.stderr),
                  transient=True) as progress:
        task = progress.add_task("days", total=len(days))
        for day in days:
            for b in state.call("settle_day", day).bills:
                if writer is not None:
                    writer.writerows(bill_csv_rows(b))
                else:
                    out.write(MessageToJson(b, preserving_proto_field_name=True,
                                            indent=None) + "\n")
                exported += 1
            progress.update(task, advance=1, description=f"{day}: {exported:,} bills")
    click.echo(f"exported {exported:,} bills over {len(days)} days", err=True)


@main.command()
@click.argument("account_id")
@click.argument("from_day", type=Day())
@click.argument("to_day", type=Day())
@click.option("--csv", "as_csv", is_flag=True,
              help="Print CSV, one row per bill line plus a row with item=total per bill; "
                   "takes precedence over --json.")
@click.pass_obj
def bills(state: CliState, account_id: str, from_day: str, to_day: str, as_csv: bool) -> None:
    """List an account's bills for a range of days (ListBills).

    FROM_DAY and TO_DAY are billing days, both included.

    \b
    Example:
      ledgerctl bills acme 2027-03-01 2027-03-31 --csv > bills.csv
    """
    r = state.call("list_bills", account_id, from_day, to_day)
    if as_csv:
        write_csv(BILLS_CSV_HEADER, [row for b in r.bills for row in bill_csv_rows(b)])
    elif state.json:
        emit_json(r)
    else:
        show(table(f"bills of {account_id}, {from_day} to {to_day}", BILL_COLUMNS,
                   (bill_row(b) for b in r.bills), numeric=BILL_NUMERIC))


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


# --------------------------------------------------------------------------- load tests

main.add_command(loadtest)
