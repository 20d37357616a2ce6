"""Docs stay true: the API reference, the Datasette canned queries, the CLI help."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from server import apidoc
from server.cli import main as server_main

from .conftest import make_account

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_matches_proto_comments():
    """docs/api.md is exactly what the .proto comments generate (run `make docs` if not)."""
    assert (ROOT / "docs" / "api.md").read_text() == apidoc.render(), "run `make docs`"


def test_api_reference_covers_every_rpc_and_field():
    """Every RPC and every field has a description in the generated reference."""
    text = apidoc.render()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows), [
        line for line in rows if line.rstrip().endswith("|  |")]
    for rpc in ("Consume", "ConsumeBatch", "ConsumeStream", "SettleDay", "AdvanceTime"):
        assert f"| `{rpc}` |" in text


def _canned(name: str) -> str:
    meta = json.loads((ROOT / "docs" / "datasette.json").read_text())
    return meta["databases"]["ledger"]["queries"][name]["sql"]


@pytest.mark.sqlite_only  # Datasette reads the SQLite file
def test_canned_queries_agree_with_the_api(server, client):
    """The Datasette canned queries give the figures GetRemaining, GetUsage and GetBill give."""
    make_account(client, cash_micros=100_000_000)
    make_account(client, "beta", cash_micros=10_000_000)
    client.purchase_plan("acme", "month-100k")
    client.consume("acme", quantity=1_234)
    client.consume("beta", quantity=50, region="outside")
    client.advance_time(86_400)  # settle the first day; a new day begins
    client.consume("acme", quantity=10)
    client.consume("beta", quantity=7)
    conn = sqlite3.connect(f"file:{server.db}?mode=ro", uri=True)
    remaining = dict((a, u) for a, u, _ in conn.execute(_canned("remaining_units")))
    assert remaining == {"acme": client.get_remaining("acme").units_remaining_total}
    usage = conn.execute(_canned("usage_today")).fetchall()
    payg = {(r[0], r[3]): r[5] for r in usage if r[2] == "payg"}
    beta = client.get_remaining("beta")
    assert payg == {("beta", 1): beta.payg_units} and beta.payg_amount_micros == 7 * 700
    offsets = {r[0]: r[5] for r in usage if r[2] == "plan"}
    assert offsets == {"acme": 10}
    day = "2027-03-10"  # T0 is 18:00 UTC+8 on that day
    bills = conn.execute(_canned("bills_for_day"), {"day": day}).fetchall()
    assert [(b[0], b[3], b[7]) for b in bills] == [
        (b.account_id, b.total_micros, b.outstanding_micros)
        for b in (client.get_bill("acme", day), client.get_bill("beta", day))]


def test_every_server_command_has_help():
    """Each `quota-ledger` command answers --help."""
    runner = CliRunner()

    def walk(cmd, path):
        result = runner.invoke(server_main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(server_main, [])
