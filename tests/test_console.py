"""The web console over plain HTTP (no browser): error pages for hostile input, the CSV,
headers, the loopback rule, and what reader tokens may see. Browser tests:
tests/test_console_browser.py."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from contextlib import ExitStack
from decimal import ROUND_HALF_UP, Decimal
from urllib.parse import quote

import pytest

from clients.client import LedgerClient
from server.auth import create_token
from server.console import formatting as fmt

from .conftest import ROOT, ServerProcess
from .console_scenario import (
    DAYS,
    HOSTILE_ID,
    ConsoleProcess,
    get,
    seed_history,
    start_ledger,
)
from .test_auth import _start_tls, tls_material  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def history(tmp_path_factory, module_db):
    """A ledger with three days of history, and a console without a token in front of it."""
    tmp = tmp_path_factory.mktemp("console")
    with ExitStack() as stack:  # whatever started is stopped, even if a later step fails
        ledger = start_ledger(tmp, db=module_db)
        stack.callback(ledger.stop)
        with ledger.client() as c:
            seed_history(c)
        console = ConsoleProcess(tmp, ledger.target).start()
        stack.callback(console.stop)
        yield ledger, console


def assert_error_page(status: int, body: str, expected: int, *needles: str) -> None:
    assert status == expected, body[:500]
    assert "<h1>" in body and f'data-k="status">{expected}<' in body
    assert "Traceback" not in body and 'File "' not in body
    for needle in needles:
        assert needle in body, (needle, body[:800])


def test_usd_is_exact_half_up_with_separators():
    """Money: 2 decimals, half up to the cent, thousands separators, from integers only."""
    cases = [0, 1, 4_999, 5_000, 7_600, 10_000, 1_234_567_894_999, 1_234_567_895_000, -5_000,
             -4_999, 10**17]
    for micros in cases:
        expected = Decimal(micros).scaleb(-6).quantize(Decimal("0.01"), ROUND_HALF_UP)
        assert fmt.usd(micros) == f"{expected:,}".replace("-0.00", "0.00"), micros
    assert fmt.usd_exact(700) == "0.0007" and fmt.count(1_234_567) == "1,234,567"


def test_every_page_is_html_with_real_tables(history):
    """Each page answers 200 with tables that have header cells."""
    _, console = history
    for path in ("/", "/accounts/acme", f"/accounts/acme/usage?from={DAYS[0]}&to={DAYS[2]}",
                 "/accounts/acme/bills", "/accounts/bolt", "/accounts/bolt/bills"):
        status, headers, body = get(console.url + path)
        assert status == 200, (path, body[:500])
        assert headers["content-type"].startswith("text/html")
        assert "<table" in body and "<th" in body and "<script" not in body, path


def test_runway_without_an_estimate_says_why(history):
    """An account created today has no complete billing day: the account page's runway
    panel says there is no estimate, and why, in the ledger's words (issue 22)."""
    ledger, console = history
    with ledger.client() as c:
        c.create_account("fresh")
        reason = c.get_runway("fresh").no_estimate_reason
    status, _, body = get(console.url + "/accounts/fresh")
    assert status == 200 and reason and f"No estimate: {reason}." in body


def test_account_page_lists_the_latest_notices(history):
    """The account page's notices (issue 22): ListNotices' latest, newest first, each with
    its delivery (this ledger has no webhook); an account without one says so."""
    ledger, console = history
    with ledger.client() as c:
        want = [n.notice_id for n in c.list_notices("acme").notices][::-1]
        c.create_account("quiet")
    assert want, "the history's settled days issued bills"
    status, _, body = get(console.url + "/accounts/acme")
    assert status == 200
    shown = [part.split('"', 1)[0] for part in body.split('data-notice="')[1:]]
    assert shown == want[:20]
    assert "not delivered by webhook" in body and "bill_issued" in body
    status, _, body = get(console.url + "/accounts/quiet")
    assert status == 200 and 'data-k="no_notices">No notice yet.' in body


def test_read_only_headers_and_methods(history):
    """No scripts, no framing, no outside resources; only GET and HEAD."""
    _, console = history
    status, headers, _ = get(console.url + "/accounts/acme")
    csp = headers["content-security-policy"]
    assert status == 200 and "default-src 'none'" in csp and "script-src" not in csp
    assert headers["x-frame-options"] == "DENY"
    status, _, body = get(console.url + "/accounts/acme", method="POST")
    assert_error_page(status, body, 405, "GET pages only")
    status, _, body = get(console.url + "/no/such/page")
    assert_error_page(status, body, 404)


def test_csv_equals_get_usage(history):
    """The CSV download holds exactly the API's usage: plan units, region units and micros."""
    ledger, console = history
    status, headers, body = get(
        f"{console.url}/accounts/acme/usage.csv?from={DAYS[0]}&to={DAYS[2]}")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert "attachment" in headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(body)))
    with ledger.client() as c:
        usage = c.get_usage("acme", DAYS[0], DAYS[2])
    expected = []
    for day in usage.days:
        for p in day.plan_units:
            expected.append((day.billing_day, "plan", p.plan_id, "", p.units, 0))
        for u in day.payg:
            expected.append((day.billing_day, "payg", "", fmt.REGION_KEYS[u.region], u.units,
                             u.amount_micros))
    got = [(r["billing_day_utc8"], r["source"], r["plan_id"], r["region"], int(r["units"]),
            int(r["amount_micros"])) for r in rows]
    assert sorted(got) == sorted(expected) and len(got) >= 8
    assert {r["region"] for r in rows if r["source"] == "payg"} == {"mainland", "outside"}


@pytest.mark.parametrize(("path", "status", "needle"), [
    ("/accounts/nobody", 404, "nobody"),
    ("/accounts/nobody/usage", 404, "nobody"),
    ("/accounts/nobody/bills", 404, "nobody"),
    ("/accounts/acme/usage?from=2027-13-01&to=2027-03-12", 400, "YYYY-MM-DD"),
    ("/accounts/acme/usage?from=yesterday", 400, "YYYY-MM-DD"),
    ("/accounts/acme/usage?from=2027-02-30&to=2027-03-12", 400, "YYYY-MM-DD"),
    ("/accounts/acme/usage?from=2027-03-12&to=2027-03-10", 400, "after"),
    ("/accounts/acme/usage?from=2026-03-11&to=2027-03-12", 400, "367 days"),
    ("/accounts/acme/bills?from=2020-01-01&to=2027-03-12", 400, "at most 366 days"),
    ("/accounts/acme/usage.csv?from=2026-03-11&to=2027-03-12", 400, "366"),
    ("/accounts/" + "a" * 65, 400, "at most 64"),
    ("/accounts/" + quote("acme' OR '1'='1"), 400, "spaces"),
    ("/accounts/" + quote("acme;DROP TABLE accounts"), 400, "spaces"),
    ("/accounts/" + quote("é"), 400, "printable ASCII"),
    ("/accounts/%00", 400, "control"),
    ("/accounts/%FF%FE", 400, "UTF-8"),
    ("/accounts/acme%2F..%2F..%2Fetc", 404, "acme/../../etc"),
    ("/static/..%2F..%2Fapp.py", 404, "Not found"),
    ("/accounts/" + quote("<script>alert(1)</script>", safe=""), 404, "&lt;script&gt;"),
    ("/?q=" + quote("<b>bold</b>"), 200, "&lt;b&gt;bold&lt;/b&gt;"),
    ("/?q=" + "z" * 65, 400, "at most 64"),
    ("/go?account_id=" + quote("a b"), 400, "spaces"),
])
def test_hostile_input_gets_a_proper_page(history, path, status, needle):
    """Unknown accounts, bad dates, long ranges and injection attempts: a 4xx page (the
    search's own page for a harmless query), nothing from the input unescaped."""
    _, console = history
    got, headers, body = get(console.url + path)
    assert headers["content-type"].startswith("text/html")
    if status == 200:
        assert got == 200 and needle in body and "<b>bold" not in body
        return
    assert_error_page(got, body, status, needle)
    assert "<script>alert" not in body and "<b>" not in body


def test_full_366_day_range_is_accepted(history):
    """The limit is inclusive: 366 days is one page."""
    _, console = history
    status, _, body = get(f"{console.url}/accounts/acme/usage?from=2026-03-12&to={DAYS[2]}")
    assert status == 200 and body.count("<tr data-day=") == 366 + 1  # and the total row


def test_markup_in_ids_and_names_is_shown_as_text(history):
    """An account id and display name full of markup are escaped wherever they appear."""
    _, console = history
    for path in ("/", "/accounts/" + quote(HOSTILE_ID, safe="")):
        status, _, body = get(console.url + path)
        assert status == 200, body[:300]
        assert "<i>x</i>" not in body and "<script>alert" not in body
        assert "&lt;i&gt;x&lt;/i&gt;" in body
    status, _, body = get(console.url + "/go?account_id=" + quote(HOSTILE_ID, safe=""))
    assert status == 200 and "&lt;i&gt;x&lt;/i&gt;" in body  # the redirect was followed


def test_only_loopback_host_names_are_answered(history):
    """A page elsewhere cannot read the console by DNS rebinding: other Host names get 421."""
    _, console = history
    port = console.url.rpartition(":")[2]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert get(console.url + "/", headers={"Host": host})[0] == 200, host
    for host in (f"attacker.example:{port}", "attacker.example", f"[::2]:{port}"):
        assert get(console.url + "/accounts/acme", headers={"Host": host})[0] == 421, host


def test_accounts_are_listed_a_page_at_a_time(history):
    """The account list shows 50 accounts a page, with a link to the next page."""
    ledger, console = history
    with ledger.client() as c:
        for i in range(55):
            c.create_account(f"page-{i:03d}")
    status, _, body = get(console.url + "/?q=page-")
    assert status == 200 and body.count('<tr data-account="page-') == 50
    assert 'data-account="page-049"' in body and 'data-account="page-050"' not in body
    assert 'rel="next" href="/?q=page-&amp;after=page-049"' in body
    status, _, body = get(console.url + "/?q=page-&after=page-049")
    assert status == 200 and body.count('<tr data-account="page-') == 5
    assert 'rel="next"' not in body
    status, _, body = get(console.url + "/?q=nothing-like-this")
    assert status == 200 and 'data-k="no_accounts"' in body


def test_ledger_unreachable_is_a_clear_page(tmp_path):
    """With no ledger at --target, a 503 page says so (no traceback)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    console = ConsoleProcess(tmp_path, dead, extra=["--timeout", "2"]).start()
    try:
        status, _, body = get(console.url + "/accounts/acme")
        assert_error_page(status, body, 503, "cannot be reached", dead)
    finally:
        console.stop()


def test_console_speaks_mutual_tls_to_the_ledger(tmp_path, tls_material):  # noqa: F811
    """With --tls-ca/--tls-cert/--tls-key the console reads a ledger that requires mutual
    TLS; without them it shows the 503 page."""
    f = tls_material
    ledger = ServerProcess(tmp_path, extra=["--tls-cert", f["server_cert"], "--tls-key",
                                            f["server_key"], "--tls-client-ca", f["ca"]])
    ledger.start = _start_tls(ledger, f)  # type: ignore[method-assign]
    ledger.start()
    tls = ["--tls-ca", f["ca"], "--tls-cert", f["client_cert"], "--tls-key", f["client_key"]]
    consoles = []
    try:
        with LedgerClient(ledger.target, tls_ca=f["ca"], tls_cert=f["client_cert"],
                          tls_key=f["client_key"]) as c:
            c.create_account("acme", "Acme Inc.")
        consoles = [ConsoleProcess(tmp_path, ledger.target, extra=tls).start(),
                    ConsoleProcess(tmp_path, ledger.target, extra=["--timeout", "2"]).start()]
        status, _, body = get(consoles[0].url + "/accounts/acme")
        assert status == 200 and "Acme Inc." in body
        status, _, body = get(consoles[1].url + "/accounts/acme")
        assert_error_page(status, body, 503, "cannot be reached")
    finally:
        for console in consoles:
            console.stop()
        ledger.stop()


def test_non_loopback_listen_is_refused_without_insecure():
    """Like the server: no non-loopback listener without --insecure (the console has no
    login of its own)."""
    result = subprocess.run([sys.executable, "-m", "server", "console", "--listen", "0.0.0.0:0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A ledger with a tokens file: admin seeds it; readers look through consoles."""
    tmp = tmp_path_factory.mktemp("console-auth")
    tokens_file = str(tmp / "tokens.toml")
    tokens = {"admin": create_token(tokens_file, "admin", "admin", []),
              "reader": create_token(tokens_file, "reader", "reader", []),
              "reader-acme": create_token(tokens_file, "reader-acme", "reader", ["acme"])}
    with ExitStack() as stack:
        ledger = start_ledger(tmp, extra=["--tokens", tokens_file])
        stack.callback(ledger.stop)
        with LedgerClient(ledger.target, token=tokens["admin"]) as c:
            seed_history(c)
        consoles: dict[str, ConsoleProcess] = {}
        for name, token in [("reader", tokens["reader"]), ("reader-acme", tokens["reader-acme"]),
                            ("none", None), ("bogus", "qlt_not-a-real-token")]:
            extra = ["--token", token] if token else []
            consoles[name] = ConsoleProcess(tmp, ledger.target, extra=extra).start()
            stack.callback(consoles[name].stop)
        yield consoles


def test_reader_token_sees_every_page(secured):
    """With a reader token the console shows every page of every account."""
    url = secured["reader"].url
    for path in ("/", "/accounts/acme", "/accounts/bolt", "/accounts/acme/usage",
                 "/accounts/acme/bills", "/accounts/acme/usage.csv"):
        status, _, body = get(url + path)
        assert status == 200, (path, body[:400])
    assert 'data-account="bolt"' in get(url + "/")[2]


@pytest.mark.parametrize("name", ["none", "bogus"])
def test_missing_or_unknown_token_is_a_clear_page(secured, name):
    """Without a (known) token: a 503 page that says what to do, not a traceback."""
    held = "started without one" if name == "none" else "its token was refused"
    for path in ("/", "/accounts/acme", "/accounts/acme/usage", "/accounts/acme/bills"):
        status, _, body = get(secured[name].url + path)
        assert_error_page(status, body, 503, "needs a bearer token", held, "--token")


def test_reader_limited_to_acme_cannot_see_bolt(secured):
    """A reader token limited to account A shows A, refuses B with 403, lists only A."""
    url = secured["reader-acme"].url
    for path in ("/accounts/acme", "/accounts/acme/usage", "/accounts/acme/bills"):
        assert get(url + path)[0] == 200, path
    for path in ("/accounts/bolt", "/accounts/bolt/usage", "/accounts/bolt/bills",
                 "/accounts/bolt/usage.csv"):
        status, _, body = get(url + path)
        assert_error_page(status, body, 403, "bolt")
        assert "Bolt Ltd." not in body
    status, _, body = get(url + "/")
    assert status == 200 and 'data-account="acme"' in body and 'data-account="bolt"' not in body
