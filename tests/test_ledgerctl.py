"""ledgerctl, the command-line client, driven through click's CliRunner against a real server."""

from __future__ import annotations

import csv
import io
import json
import socket

import click
import pytest
from click.testing import CliRunner, Result

from clients.ledgerctl import CliState, main

from .conftest import ServerProcess

DAY = "2027-03-10"  # the billing day of T0 (conftest): 2027-03-10 18:00 UTC+8
T0_LOCAL = "2027-03-10T18:00:00"  # naive: read as UTC+8


def run(target: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--target", target, *args])


def ok(target: str, *args: str) -> Result:
    result = run(target, *args)
    assert result.exit_code == 0, (args, result.output, result.exception)
    assert "Traceback" not in result.output
    return result


def refused(result: Result, code: str) -> None:
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stderr.startswith(f"error: {code} "), result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def setup_account(target: str, account_id: str = "acme", usd: str = "100") -> None:
    ok(target, "time", "set", T0_LOCAL)
    ok(target, "account", "create", account_id, "--name", f"{account_id} Inc.")
    ok(target, "top-up", account_id, usd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, cmd in sorted(group.commands.items()):
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, (*path, name))


def test_help_for_every_command():
    """`--help` works for the group and every (sub)command, each with a summary and example."""
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "Commands:" in result.output
    names = set()
    for path, cmd in all_commands(main):
        names.add(" ".join(path))
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Example:" in result.output, path
        assert cmd.get_short_help_str(), path
    assert {"account create", "account show", "top-up", "features", "reactivate", "specs",
            "buy", "refund", "consume", "remaining", "plans", "usage", "settle", "bill",
            "bills", "time show", "time set", "time advance"} <= names


def test_account_create_and_show(server):
    """`account create` then `account show` print the account in a table, status active."""
    ok(server.target, "time", "set", T0_LOCAL)
    out = ok(server.target, "account", "create", "acme", "--name", "Acme Inc.").stdout
    assert "acme" in out and "Acme Inc." in out
    out = ok(server.target, "account", "show", "acme").stdout
    assert "Acme Inc." in out and "active" in out and "0.00" in out
    assert "2027-03-10T18:00:00+08:00" in out  # created_at shown in UTC+8


def test_top_up_usd_is_converted_exactly_to_micros(server):
    """`top-up acme 12.5` credits exactly 12,500,000 micro-USD; `--micros 1` adds one more."""
    ok(server.target, "account", "create", "acme")
    data = json.loads(ok(server.target, "--json", "top-up", "acme", "12.5").stdout)
    assert int(data["cash_balance_micros"]) == 12_500_000
    data = json.loads(ok(server.target, "--json", "top-up", "acme", "1", "--micros").stdout)
    assert int(data["cash_balance_micros"]) == 12_500_001
    data = json.loads(ok(server.target, "--json", "top-up", "acme", "0.000001",
                         "--kind", "voucher").stdout)
    assert int(data["voucher_balance_micros"]) == 1
    assert "12.500001" in ok(server.target, "account", "show", "acme").stdout


@pytest.mark.parametrize("args", [["12.1234567"], ["0"], ["0.0000000"], ["abc"], ["nan"],
                                  ["1.5", "--micros"], ["1e400"]])
def test_top_up_refuses_inexact_or_non_positive_amounts(args):
    """An amount finer than a micro-USD, not positive or not a number is a usage error (2)."""
    result = run(f"127.0.0.1:{free_port()}", "top-up", "acme", *args)
    assert result.exit_code == 2, result.output
    assert "Invalid value for AMOUNT" in result.stderr


def test_refused_call_exits_1_with_code_and_reason(server):
    """A server-side refusal prints `error: NOT_FOUND <REASON>: ...` on stderr and exits 1."""
    result = run(server.target, "consume", "nobody")
    refused(result, "NOT_FOUND")
    assert "ACCOUNT_NOT_FOUND" in result.stderr and result.stdout == ""


def test_unreachable_server_is_reported_without_traceback():
    """With no server at the target, the CLI says it cannot reach it and exits 1."""
    target = f"127.0.0.1:{free_port()}"
    result = run(target, "--timeout", "2", "account", "show", "acme")
    refused(result, "UNAVAILABLE")
    assert f"cannot reach the ledger at {target}" in result.stderr


def test_time_without_test_clock_is_unimplemented_and_says_why(tmp_path, db):
    """Against a server run without --test-clock, `time show` exits 1 with UNIMPLEMENTED."""
    srv = ServerProcess(tmp_path, test_clock=False, db=db).start()
    try:
        result = run(srv.target, "time", "show")
    finally:
        srv.stop()
    refused(result, "UNIMPLEMENTED")
    assert "--test-clock" in result.stderr


def test_buy_consume_then_remaining_table_shows_the_plan(server):
    """After `buy` and `consume --quantity 5`, `remaining` lists the plan with 99,995 left."""
    setup_account(server.target)
    plan = json.loads(ok(server.target, "--json", "buy", "acme", "month-100k").stdout)
    assert plan["spec_id"] == "month-100k" and plan["status"] == "PLAN_STATUS_ACTIVE"
    out = ok(server.target, "consume", "acme", "--quantity", "5").stdout
    assert plan["plan_id"] in out and "99,995" in out
    out = ok(server.target, "remaining", "acme").stdout
    assert plan["plan_id"] in out and "month-100k" in out and "99,995" in out
    assert "active" in out and "60.00" in out and "2027-04-10T18:00:00+08:00" in out
    out = ok(server.target, "plans", "acme", "--all").stdout
    assert plan["plan_id"] in out


def test_usage_csv_has_header_and_a_row_per_plan_and_region(server):
    """`usage --csv` prints the fixed header, a payg row per region and a plan row per plan."""
    setup_account(server.target)
    ok(server.target, "consume", "acme", "--region", "outside", "--quantity", "3")
    plan = json.loads(ok(server.target, "--json", "buy", "acme", "month-100k").stdout)
    ok(server.target, "consume", "acme", "--quantity", "5")
    out = ok(server.target, "usage", "acme", DAY, DAY, "--csv").stdout
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["billing_day", "kind", "plan_id", "region", "units", "amount_micros"]
    assert sorted(rows[1:]) == sorted([
        [DAY, "payg", "", "outside_chinese_mainland", "3", "3000"],
        [DAY, "plan", plan["plan_id"], "", "5", "0"],
    ])
    # --csv wins over --json
    assert ok(server.target, "--json", "usage", "acme", DAY, DAY, "--csv").stdout == out


def test_runway_table_json_and_no_estimate(server):
    """`runway`: with no complete day it says there is no estimate and why; a day later the
    table shows the plan used up at the rate, and --json carries the same figures."""
    setup_account(server.target)
    plan = json.loads(ok(server.target, "--json", "buy", "acme", "month-100k").stdout)
    out = ok(server.target, "runway", "acme").stdout
    assert "none" in out and "no complete billing day" in out
    ok(server.target, "time", "set", "2027-03-11T00:00:00")
    ok(server.target, "consume", "acme", "--quantity", "50000")  # all on 03-11
    ok(server.target, "time", "set", "2027-03-12T00:00:00")
    out = ok(server.target, "runway", "acme", "--window", "1").stdout
    # 50,000 a day from 03-12 00:00: the other 50,000 last exactly one more day
    assert plan["plan_id"] in out and "50,000 units/day" in out
    assert "2027-03-13T00:00:00+08:00" in out and "2027-03-11 to 2027-03-11" in out
    data = json.loads(ok(server.target, "--json", "runway", "acme", "--window", "1").stdout)
    assert data["estimated"] is True and data["plans"][0]["used_up_at"] == "2027-03-12T16:00:00Z"
    assert data["payg_starts_day"] == "2027-03-13" and data["price_basis"]
    refused(run(server.target, "runway", "nobody"), "NOT_FOUND")


def test_json_output_parses_for_every_read_command(server):
    """With --json, each read verb prints one JSON document with the .proto field names."""
    setup_account(server.target)
    ok(server.target, "buy", "acme", "month-100k")
    for args in (["specs"], ["account", "show", "acme"], ["remaining", "acme"],
                 ["plans", "acme", "--all"], ["usage", "acme", DAY, DAY], ["time", "show"],
                 ["consume", "acme", "--dry-run", "--type", "invisible", "--arch", "v3",
                  "--step", "4.1"]):
        data = json.loads(ok(server.target, "--json", *args).stdout)
        assert isinstance(data, dict) and data, args
    specs = json.loads(ok(server.target, "--json", "specs").stdout)["specs"]
    assert {"spec_id", "units", "validity", "price_micros"} <= set(specs[0])
    dry = json.loads(ok(server.target, "--json", "consume", "acme", "--dry-run").stdout)
    assert dry["billable"] is True and dry["payg_units"] == "0"


def test_time_set_reads_naive_times_as_utc8_and_advance_takes_units(server):
    """`time set` without an offset means UTC+8; `time advance 1d` moves one day forward."""
    assert ok(server.target, "time", "set", T0_LOCAL).stdout.strip() == (
        "2027-03-10T18:00:00+08:00")
    assert ok(server.target, "time", "advance", "1d").stdout.strip() == (
        "2027-03-11T18:00:00+08:00")
    data = json.loads(ok(server.target, "--json", "time", "show").stdout)
    assert data["now"] == "2027-03-11T10:00:00Z"
    refused(run(server.target, "time", "set", "2027-01-01T00:00:00+08:00"), "INVALID_ARGUMENT")


def test_features_leaves_what_is_not_given_as_it_is(server):
    """`features` replaces the scenario set but keeps custom policy when no flag is given."""
    setup_account(server.target)
    data = json.loads(ok(server.target, "--json", "features", "acme", "--scenario", "a",
                         "--scenario", "b", "--custom-policy").stdout)
    assert data["scenario_ids"] == ["a", "b"] and data["custom_policy_enabled"] is True
    data = json.loads(ok(server.target, "--json", "features", "acme", "--scenario", "c").stdout)
    assert data["scenario_ids"] == ["c"] and data["custom_policy_enabled"] is True
    data = json.loads(ok(server.target, "--json", "features", "acme",
                         "--no-custom-policy").stdout)
    assert data["scenario_ids"] == ["c"] and data["custom_policy_enabled"] is False
    data = json.loads(ok(server.target, "--json", "features", "acme", "--no-scenarios").stdout)
    assert data["scenario_ids"] == []
    assert run(server.target, "features", "acme").exit_code == 2


def test_settlement_verbs_answer_or_report_cleanly(server):
    """settle, bill and bills either succeed or print `error: UNIMPLEMENTED ...`, exit 1."""
    setup_account(server.target)
    ok(server.target, "consume", "acme", "--region", "outside", "--quantity", "3")
    ok(server.target, "time", "advance", "1d")  # DAY has ended

    def check(*args: str) -> Result | None:
        result = run(server.target, *args)
        assert "Traceback" not in result.output
        if result.exit_code == 1 and result.stderr.startswith("error: UNIMPLEMENTED "):
            return None
        assert result.exit_code == 0, (args, result.output)
        return result

    if settled := check("settle", DAY):
        assert "acme" in settled.stdout
    if shown := check("bill", "acme", DAY):
        assert "verification" in shown.stdout and DAY in shown.stdout
    if listed := check("bills", "acme", DAY, DAY, "--csv"):
        rows = list(csv.DictReader(io.StringIO(listed.stdout)))
        assert listed.stdout.splitlines()[0] == ("account_id,billing_day,bill_date,item,region,"
                                                 "quantity,unit_price_micros,amount_micros")
        totals = [r for r in rows if r["item"] == "total"]
        assert len(totals) == 1 and totals[0]["billing_day"] == DAY
        assert int(totals[0]["amount_micros"]) == sum(
            int(r["amount_micros"]) for r in rows if r["item"] != "total")
    if listed := check("--json", "bills", "acme", DAY, DAY):
        assert isinstance(json.loads(listed.stdout)["bills"], list)


def test_other_modules_can_add_commands():
    """A command added with main.add_command runs with the global options as a CliState."""
    seen: list[CliState] = []

    @click.command("probe")
    @click.pass_obj
    def probe(state: CliState) -> None:
        seen.append(state)

    main.add_command(probe)
    try:
        result = CliRunner().invoke(main, ["--target", "h:1", "--timeout", "3", "--json",
                                           "probe"])
    finally:
        main.commands.pop("probe")
    assert result.exit_code == 0, result.output
    assert (seen[0].target, seen[0].timeout_s, seen[0].json) == ("h:1", 3.0, True)


def test_export_bills_every_account_csv_and_json(server, tmp_path):
    """export-bills writes every account's bills over a range, CSV rows or JSON lines."""
    from clients.client import LedgerClient
    from clients.ledgerctl import main as ctl

    from .conftest import T0

    with LedgerClient(server.target) as c:
        c.set_time(T0)
        for acct in ("ea", "eb"):
            c.create_account(acct)
            c.consume(acct, quantity=10)
        c.advance_time(2 * 86_400)
    runner = CliRunner()
    out_csv = tmp_path / "bills.csv"
    done = runner.invoke(ctl, ["--target", server.target, "export-bills", "2027-03-10",
                               "2027-03-11", "--out", str(out_csv)])
    assert done.exit_code == 0, done.output
    rows = list(csv.reader(out_csv.open()))
    assert rows[0][0] == "account_id"
    totals = [(r[0], r[1], r[7]) for r in rows[1:] if r[3] == "total"]
    assert totals == [("ea", "2027-03-10", "7000"), ("eb", "2027-03-10", "7000")]
    out_json = tmp_path / "bills.jsonl"
    done = runner.invoke(ctl, ["--target", server.target, "export-bills", "2027-03-10",
                               "2027-03-10", "--format", "json", "--out", str(out_json)])
    assert done.exit_code == 0, done.output
    lines = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [b["account_id"] for b in lines] == ["ea", "eb"]
    done = runner.invoke(ctl, ["--target", server.target, "export-bills", "2027-03-12",
                               "2027-03-12"])
    assert done.exit_code == 1  # the day has not ended: DAY_NOT_ENDED, no traceback
