"""The web console in a real headless Chromium (Debian's, driven by Playwright, scripts off):
every figure on every page equals what the ledger's API returns; screenshots are saved
(under the test's tmp dir, or CONSOLE_SCREENSHOTS=DIR to keep them)."""

from __future__ import annotations

import os
from contextlib import ExitStack
from datetime import timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from urllib.parse import quote

import pytest
from quota_ledger.v1 import common_pb2 as pb

from .console_scenario import (
    BROWSER,
    DAYS,
    HOSTILE_ID,
    ConsoleProcess,
    launch_browser,
    seed_history,
    start_ledger,
)

SKIP_REASON = (f"BROWSER TESTS SKIPPED: no Chromium at {BROWSER} "
               "(apt-get install chromium; .ci/run does)")
if not BROWSER.exists():  # one skip for the whole module: one line in the summary
    pytest.skip(SKIP_REASON, allow_module_level=True)
UTC8 = timezone(timedelta(hours=8))
REGION_KEYS = {pb.REGION_CHINESE_MAINLAND: "mainland",
               pb.REGION_OUTSIDE_CHINESE_MAINLAND: "outside"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def usd(micros: int) -> str:
    """Written independently of the console: Decimal, half up to the cent, separators."""
    value = Decimal(micros).scaleb(-6).quantize(Decimal("0.01"), ROUND_HALF_UP)
    return f"{value:,}".replace("-0.00", "0.00")


def when(message, name: str) -> str:  # noqa: ANN001
    if not message.HasField(name):
        return "—"
    return getattr(message, name).ToDatetime(tzinfo=UTC8).strftime("%Y-%m-%d %H:%M:%S UTC+8")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Ledger with history, console, one browser (JavaScript disabled), an API client."""
    from playwright.sync_api import sync_playwright

    tmp = tmp_path_factory.mktemp("console-browser")
    shots = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp / "screenshots")  # artifacts
    shots.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:  # whatever started is stopped, even if a later step fails
        ledger = start_ledger(tmp)
        stack.callback(ledger.stop)
        api = stack.enter_context(ledger.client())
        seed_history(api)
        console = ConsoleProcess(tmp, ledger.target).start()
        stack.callback(console.stop)
        p = stack.enter_context(sync_playwright())
        browser = launch_browser(p)
        stack.callback(browser.close)
        context = browser.new_context(java_script_enabled=False,
                                      viewport={"width": 1280, "height": 900})
        page = context.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        yield {"page": page, "api": api, "url": console.url, "shots": shots,
               "dialogs": dialogs}


def open_page(site, path: str, shot: str):  # noqa: ANN001, ANN201
    page = site["page"]
    response = page.goto(site["url"] + path)
    assert response is not None and response.status == 200, path
    out = site["shots"] / f"{shot}.png"
    page.screenshot(path=str(out), full_page=True)
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, out
    return page


def text(scope, selector: str) -> str:  # noqa: ANN001
    loc = scope.locator(selector)
    assert loc.count() == 1, selector
    return loc.inner_text().strip()


def test_account_page_equals_the_api(site):
    """Status, balances, outstanding, features, plans in consumption order, total remaining
    and today's pay-as-you-go: each as GetAccount / GetRemaining / ListPlans say."""
    page = open_page(site, "/accounts/acme", "account-acme")
    api = site["api"]
    acct, rem = api.get_account("acme"), api.get_remaining("acme")
    plans = api.list_plans("acme", include_inactive=True).plans
    summary = page.locator("#summary")
    assert text(summary, "[data-k=status]") == "active"
    assert text(summary, "[data-k=cash]") == usd(acct.cash_balance_micros)
    assert text(summary, "[data-k=voucher]") == usd(acct.voucher_balance_micros)
    assert text(summary, "[data-k=outstanding]") == usd(acct.outstanding_micros)
    assert text(summary, "[data-k=overdue_since]") == "—"
    assert text(summary, "[data-k=custom_policy]") == "disabled"
    assert text(summary, "[data-k=scenario_count]") == f"{len(acct.scenario_ids):,}"
    assert text(summary, "[data-k=created]") == when(acct, "created_at")
    assert page.locator("#summary [data-k=scenarios] .tag").all_inner_texts() == list(
        acct.scenario_ids)
    assert text(page, ".headline [data-k=remaining_total]") == f"{rem.units_remaining_total:,}"
    assert rem.units_remaining_total == 5_000 - 40
    assert text(page, ".headline [data-k=today]") == DAYS[2] == rem.billing_day
    assert text(page, ".headline [data-k=payg_units]") == f"{rem.payg_units:,}"
    assert text(page, ".headline [data-k=payg_amount]") == usd(rem.payg_amount_micros)
    assert rem.payg_units == 10 and rem.payg_amount_micros == 8 * 700 + 2 * 1_000  # 0.0076
    rows = page.locator("#plans tbody tr")
    assert [r.get_attribute("data-plan") for r in rows.all()] == [p.plan_id for p in rem.plans]
    by_id = {p.plan_id: p for p in plans}
    other_rows = page.locator("#other-plans tbody tr").all()
    assert len(other_rows) + rows.count() == len(plans) == 4
    for row in rows.all() + other_rows:
        p = by_id[row.get_attribute("data-plan")]
        assert text(row, "[data-k=spec]").startswith(p.spec_id)
        assert text(row, "[data-k=units_total]") == f"{p.units_total:,}"
        assert text(row, "[data-k=units_consumed]") == f"{p.units_consumed:,}"
        assert text(row, "[data-k=units_remaining]") == f"{p.units_remaining:,}"
        assert text(row, "[data-k=price]") == usd(p.price_micros)
        assert text(row, "[data-k=purchased]") == when(p, "purchased_at")
        assert text(row, "[data-k=expires]") == when(p, "expires_at")
        assert text(row, "[data-k=status]") == pb.PlanStatus.Name(p.status)[12:].lower()


def test_overdue_account_shows_what_is_owed(site):
    """The overdue account: status, outstanding amount and the instant it became overdue."""
    page = open_page(site, "/accounts/bolt", "account-bolt")
    acct = site["api"].get_account("bolt")
    assert acct.status == pb.ACCOUNT_STATUS_OVERDUE and acct.outstanding_micros > 0
    assert text(page, "#summary [data-k=status]") == "overdue"
    assert text(page, "#summary [data-k=outstanding]") == usd(acct.outstanding_micros)
    assert text(page, "#summary [data-k=overdue_since]") == when(acct, "overdue_since")
    assert text(page, "#summary [data-k=custom_policy]") == "enabled"
    assert text(page, "[data-k=no_plans]").startswith("No active plan")


def test_usage_page_equals_the_api(site):
    """Each billing day's plan-covered units per plan, pay-as-you-go units and cost per
    region, and the totals: as GetUsage says; the chart has a series for each."""
    page = open_page(site, f"/accounts/acme/usage?from={DAYS[0]}&to={DAYS[2]}", "usage-acme")
    usage = site["api"].get_usage("acme", DAYS[0], DAYS[2])
    assert [r.get_attribute("data-day") for r in page.locator("#usage tbody tr").all()] == [
        d.billing_day for d in usage.days] == list(DAYS)
    totals: dict[str, int] = {}
    for day in usage.days:
        row = page.locator(f'#usage tbody tr[data-day="{day.billing_day}"]')
        cells = {c.get_attribute("data-k"): c.inner_text().strip()
                 for c in row.locator("td[data-k]").all()}
        expected = {f"plan:{p.plan_id}": p.units for p in day.plan_units}
        for u in day.payg:
            expected[f"payg_units:{REGION_KEYS[u.region]}"] = u.units
            expected[f"payg_amount:{REGION_KEYS[u.region]}"] = u.amount_micros
        for key, value in expected.items():
            shown = usd(value) if key.startswith("payg_amount") else f"{value:,}"
            assert cells[key] == shown, (day.billing_day, key)
            totals[key] = totals.get(key, 0) + value
        others = set(cells) - set(expected) - {"total_units"}
        assert all(cells[k] in ("0", "0.00") for k in others), cells
        units = sum(p.units for p in day.plan_units) + sum(u.units for u in day.payg)
        assert cells["total_units"] == f"{units:,}"
        totals["total_units"] = totals.get("total_units", 0) + units
    foot = page.locator('#usage tfoot tr[data-day="total"]')
    for key, value in totals.items():
        shown = usd(value) if key.startswith("payg_amount") else f"{value:,}"
        assert text(foot, f'[data-k="{key}"]') == shown, key
    assert {u.region for d in usage.days for u in d.payg} == set(REGION_KEYS)
    legend = page.locator("#chart svg .legends").text_content() or ""
    plan_ids = {p.plan_id for d in usage.days for p in d.plan_units}
    assert all(pid in legend for pid in plan_ids) and "pay-as-you-go" in legend
    assert page.locator("#chart svg rect.rect").count() >= len(DAYS)
    assert page.locator("script").count() == 0


def test_runway_panel_equals_the_api(site):
    """The account page's runway (issue 22): window, rate, each plan's use-up or forfeit,
    pay-as-you-go start, units and cost, as GetRunway says; the chart draws a line per
    plan and marks the expiries."""
    page = open_page(site, "/accounts/acme", "runway-acme")
    r = site["api"].get_runway("acme")
    assert r.estimated and r.plans and r.window_to_day == DAYS[1]
    panel = page.locator("#runway")
    assert text(panel, "[data-k=window]") == f"{r.window_from_day} to {r.window_to_day}"
    assert text(panel, "[data-k=window_units]") == f"{r.window_units:,}"
    assert text(panel, "[data-k=daily_rate]") == f"{r.daily_rate_units:,}"
    rows = panel.locator("#runway-plans tbody tr")
    assert [row.get_attribute("data-plan") for row in rows.all()] == [
        p.plan_id for p in r.plans]
    for row, p in zip(rows.all(), r.plans, strict=True):
        assert text(row, "[data-k=units_remaining]") == f"{p.units_remaining:,}"
        assert text(row, "[data-k=expires]") == when(p, "expires_at")
        assert text(row, "[data-k=used_up]") == (
            "expires first" if p.expires_first else when(p, "used_up_at"))
        assert text(row, "[data-k=forfeit]") == f"{p.forfeit_units:,}"
    assert text(panel, "[data-k=payg_starts]") == when(r, "payg_starts_at")
    assert text(panel, "[data-k=payg_units]") == f"{r.payg_units:,}"
    assert text(panel, "[data-k=payg_cost]") == usd(r.payg_cost_micros)
    assert text(panel, "[data-k=price_basis]") == r.price_basis
    legend = page.locator("#runway-chart svg .legends").text_content() or ""
    assert all(p.plan_id in legend for p in r.plans) and "expiry" in legend
    assert page.locator("script").count() == 0


def test_runway_panel_of_an_account_that_used_nothing(site):
    """"other" existed through its window and used nothing: a rate of 0, no plan, and
    pay-as-you-go that never starts, said in words."""
    page = open_page(site, "/accounts/other", "runway-other")
    r = site["api"].get_runway("other")
    assert r.estimated and r.window_units == 0 and not r.plans
    assert page.locator("#runway-plans tbody tr").count() == 0
    assert text(page, "#runway [data-k=payg_starts]") == "never at this rate"
    assert text(page, "#runway [data-k=payg_units]") == "0"


def test_range_form_works_without_javascript(site):
    """The date form is a plain GET: submitting it shows the chosen range (one day)."""
    page = open_page(site, "/accounts/acme/usage", "usage-default")
    assert [r.get_attribute("data-day") for r in page.locator("#usage tbody tr").all()] == list(
        DAYS)  # default: from the account's first day to today
    page.fill("input[name=from]", DAYS[1])
    page.fill("input[name=to]", DAYS[1])
    page.click("form.range button")
    page.wait_for_load_state()
    assert page.url.endswith(f"/accounts/acme/usage?from={DAYS[1]}&to={DAYS[1]}")
    assert [r.get_attribute("data-day") for r in page.locator("#usage tbody tr").all()] == [
        DAYS[1]]
    csv_href = page.locator("[data-k=csv]").get_attribute("href")
    assert csv_href == f"/accounts/acme/usage.csv?from={DAYS[1]}&to={DAYS[1]}"


@pytest.mark.parametrize("account_id", ["acme", "bolt"])
def test_bills_page_equals_the_api(site, account_id):
    """Each bill's lines, plan offsets, vouchers and cash paid, and outstanding amounts
    (marked): as ListBills says."""
    page = open_page(site, f"/accounts/{account_id}/bills", f"bills-{account_id}")
    bills = site["api"].list_bills(account_id, DAYS[0], DAYS[2]).bills
    assert len(bills) == 2  # two settled days; today is not billed yet
    summary_rows = page.locator("#bills tbody tr")
    assert [r.get_attribute("data-bill") for r in summary_rows.all()] == [
        b.billing_day for b in bills]
    for b in bills:
        row = page.locator(f'#bills tbody tr[data-bill="{b.billing_day}"]')
        section = page.locator(f'section[data-bill-day="{b.billing_day}"]')
        for scope in (row, section.locator("table.totals")):
            assert text(scope, "[data-k=amount_due]") == usd(b.amount_due_micros)
            assert text(scope, "[data-k=paid_voucher]") == usd(b.paid_voucher_micros)
            assert text(scope, "[data-k=paid_cash]") == usd(b.paid_cash_micros)
            assert text(scope, "[data-k=outstanding]") == usd(b.outstanding_micros)
        assert text(row, "[data-k=bill_date]") == b.bill_date
        marked = "OUTSTANDING" in text(row, "[data-k=state]")
        assert marked == (b.outstanding_micros > 0)
        assert ("outstanding" in (row.get_attribute("class") or "")) == marked
        assert section.locator("[data-k=total]").get_attribute("data-micros") == str(
            b.total_micros)
        lines = section.locator("table.lines tbody tr[data-line]").all()
        assert len(lines) == len(b.lines) > 0
        for line_row, line in zip(lines, b.lines, strict=True):
            assert text(line_row, "[data-k=quantity]") == f"{line.quantity:,}"
            assert text(line_row, "[data-k=amount]") == usd(line.amount_micros)
            assert line_row.locator("[data-k=unit_price]").get_attribute("data-micros") == str(
                line.unit_price_micros)
        offsets = section.locator("table.offsets tbody tr").all()
        assert [(o.get_attribute("data-offset"), text(o, "[data-k=units]")) for o in offsets] == [
            (o.plan_id, f"{o.units:,}") for o in b.plan_offsets]
    if account_id == "bolt":
        assert all(b.outstanding_micros > 0 for b in bills)
    else:
        assert any(b.plan_offsets for b in bills) and not any(b.outstanding_micros for b in bills)


def test_accounts_page_equals_the_api_and_escapes(site):
    """The account list equals ListAccounts; an id full of markup is shown as text."""
    page = open_page(site, "/", "accounts")
    listed = site["api"].list_accounts().accounts
    rows = page.locator("#accounts tbody tr").all()
    assert [r.get_attribute("data-account") for r in rows] == [a.account_id for a in listed]
    for row, a in zip(rows, listed, strict=True):
        assert text(row, "th a") == a.account_id
        assert text(row, "[data-k=cash]") == usd(a.cash_balance_micros)
        assert text(row, "[data-k=voucher]") == usd(a.voucher_balance_micros)
        assert text(row, "[data-k=outstanding]") == usd(a.outstanding_micros)
        assert text(row, "[data-k=overdue_since]") == when(a, "overdue_since")
        assert text(row, "[data-k=status]") == pb.AccountStatus.Name(a.status)[15:].lower()
        assert text(row, "td >> nth=0") == a.display_name
    assert page.locator("#accounts i, #accounts script").count() == 0
    page.fill("input[name=q]", "bo")
    page.click("form.search button >> nth=0")
    page.wait_for_load_state()
    assert [r.get_attribute("data-account") for r in page.locator("#accounts tbody tr").all()] \
        == ["bolt"]
    page.locator("#accounts a").click()
    page.wait_for_load_state()
    assert page.url == site["url"] + "/accounts/bolt"
    page = open_page(site, "/accounts/" + quote(HOSTILE_ID, safe=""), "account-hostile")
    assert text(page, "h1 [data-k=account_id]") == HOSTILE_ID
    assert page.locator("main i, main script").count() == 0 and not site["dialogs"]


def test_error_page_in_the_browser(site):
    """An unknown account in the browser: a 404 page with the message, not a traceback."""
    response = site["page"].goto(site["url"] + "/accounts/nobody/usage?from=2027-03-10")
    assert response is not None and response.status == 404
    assert text(site["page"], "h1").endswith("Not found")
    assert "nobody" in text(site["page"], "[data-k=detail]")
    site["page"].screenshot(path=str(site["shots"] / "error.png"))
    assert (site["shots"] / "error.png").read_bytes().startswith(PNG_MAGIC)
