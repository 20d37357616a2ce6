"""The pages: each handler asks the ledger (``ledgerdata``) and fills one template.

Read-only by construction: only GET and HEAD routes exist, and the console calls no RPC that
changes anything.
"""

from __future__ import annotations

import csv
import io
from typing import Any
from urllib.parse import quote, unquote, urlencode

from quota_ledger.v1 import common_pb2 as pb
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ledger.money import format_usd

from . import formatting as fmt
from .charts import runway_chart, usage_chart
from .ledgerdata import (
    USAGE_DAYS_DEFAULT,
    Console,
    PageError,
    ask,
    checked_account_id,
    checked_day,
    checked_text,
    day_range,
    first_day,
    latest_notices,
    list_accounts,
    plan_specs,
    runway_series,
)

BILLS_DAYS_DEFAULT = 366
CSV_HEADER = ("billing_day_utc8", "source", "plan_id", "region", "units", "amount_micros",
              "amount_usd")


def console_of(request: Request) -> Console:
    return request.app.state.console


def render(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    return request.app.state.render(request, template, status, context)


def account_id_of(request: Request) -> str:
    """The path is routed as sent (``RawPathRouting``): the id is still percent-encoded."""
    try:
        account_id = unquote(request.path_params["account_id"], errors="strict")
    except UnicodeDecodeError:
        raise PageError(400, "Bad account id", "The account id is not valid UTF-8.") from None
    return checked_account_id(account_id)


def account_path(account_id: str, tail: str = "") -> str:
    return f"/accounts/{quote(account_id, safe='')}{tail}"


async def index(request: Request) -> Response:
    console = console_of(request)
    q = checked_text(request.query_params.get("q", ""), "search text")
    after = checked_text(request.query_params.get("after", ""), "page token")
    page = await list_accounts(console, q, after)
    next_url = ("/?" + urlencode({"q": q, "after": page.next_page_token})
                if page.next_page_token else None)
    return render(request, "index.html", q=q, after=after, accounts=list(page.accounts),
                  next_url=next_url)


async def go(request: Request) -> Response:
    """The "open an account" form: a plain GET that lands on the account's shareable path."""
    account_id = checked_account_id(request.query_params.get("account_id", "").strip())
    return RedirectResponse(account_path(account_id), status_code=303)


async def account(request: Request) -> Response:
    console = console_of(request)
    account_id = account_id_of(request)
    acct, remaining, plans, runway, notices = await ask(
        console, console.client.get_account(account_id), console.client.get_remaining(account_id),
        console.client.list_plans(account_id, include_inactive=True),
        console.client.get_runway(account_id), latest_notices(console, account_id))
    active_ids = {p.plan_id for p in remaining.plans}
    others = sorted((p for p in plans.plans if p.plan_id not in active_ids),
                    key=lambda p: fmt.plan_sort_key(p.plan_id))
    return render(request, "account.html", account=acct, remaining=remaining,
                  active_plans=list(remaining.plans), other_plans=others,
                  runway=runway, runway_svg=runway_chart(runway_series(runway)),
                  notices=notices,
                  base=account_path(account_id))


async def _ranged(request: Request, default_days: int) -> tuple[Console, str, Any, str, str]:
    """The account of a page over a range of days, and the range (checked before any call
    where it can be: the defaults need the ledger's today and the account's first day)."""
    console = console_of(request)
    account_id = account_id_of(request)
    from_day = checked_day(request.query_params.get("from"), "from")
    to_day = checked_day(request.query_params.get("to"), "to")
    acct, remaining = await ask(console, console.client.get_account(account_id),
                                console.client.get_remaining(account_id))
    start, end = day_range(from_day, to_day, remaining.billing_day,
                           first_day(acct, remaining.billing_day), default_days)
    return console, account_id, acct, start, end


async def _usage(request: Request) -> dict[str, Any]:
    """The usage of a range as rows (one per day) and columns (plans, then regions)."""
    console, account_id, acct, start, end = await _ranged(request, USAGE_DAYS_DEFAULT)
    usage, plans = await ask(console, console.client.get_usage(account_id, start, end),
                             console.client.list_plans(account_id, include_inactive=True))
    rows = []
    for day in usage.days:
        payg = {u.region: u for u in day.payg}
        rows.append({
            "day": day.billing_day,
            "plans": {p.plan_id: p.units for p in day.plan_units},
            "payg": {r: (payg[r].units if r in payg else 0,
                         payg[r].amount_micros if r in payg else 0) for r in fmt.REGIONS},
        })
    plan_ids = sorted({pid for row in rows for pid in row["plans"]}, key=fmt.plan_sort_key)
    for row in rows:
        row["total_units"] = (sum(row["plans"].values())
                              + sum(units for units, _ in row["payg"].values()))
    totals = {
        "plans": {pid: sum(r["plans"].get(pid, 0) for r in rows) for pid in plan_ids},
        "payg": {reg: (sum(r["payg"][reg][0] for r in rows), sum(r["payg"][reg][1] for r in rows))
                 for reg in fmt.REGIONS},
        "total_units": sum(r["total_units"] for r in rows),
    }
    return {"account": acct, "account_id": account_id, "from_day": start, "to_day": end,
            "rows": rows, "plan_ids": plan_ids, "specs": plan_specs(plans.plans),
            "totals": totals, "base": account_path(account_id),
            "query": urlencode({"from": start, "to": end})}


async def usage(request: Request) -> Response:
    data = await _usage(request)
    rows = data["rows"]
    plan_series = [(f"{pid} ({data['specs'].get(pid, '?')})",
                    [r["plans"].get(pid, 0) for r in rows]) for pid in data["plan_ids"]]
    payg_series = [(f"pay-as-you-go, {fmt.region(reg)}", [r["payg"][reg][0] for r in rows])
                   for reg in fmt.REGIONS]
    chart = usage_chart([r["day"] for r in rows], plan_series, payg_series)
    return render(request, "usage.html", chart_svg=chart, **data)


async def usage_csv(request: Request) -> Response:
    data = await _usage(request)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    for row in data["rows"]:
        for pid in data["plan_ids"]:
            if row["plans"].get(pid):
                writer.writerow((row["day"], "plan", pid, "", row["plans"][pid], 0, "0.00"))
        for reg in fmt.REGIONS:
            units, micros = row["payg"][reg]
            if units or micros:
                writer.writerow((row["day"], "payg", "", fmt.REGION_KEYS[reg], units, micros,
                                 format_usd(micros)))
    name = f"usage-{_safe_name(data['account_id'])}-{data['from_day']}-{data['to_day']}.csv"
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


def _safe_name(account_id: str) -> str:
    """Only letters, digits, '-' and '_' reach a file name (a header, then a file system)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in account_id)


async def bills(request: Request) -> Response:
    console, account_id, acct, start, end = await _ranged(request, BILLS_DAYS_DEFAULT)
    listed, plans = await ask(console, console.client.list_bills(account_id, start, end),
                              console.client.list_plans(account_id, include_inactive=True))
    bill_list = list(listed.bills)
    totals = {k: sum(getattr(b, k) for b in bill_list) for k in (
        "amount_due_micros", "paid_voucher_micros", "paid_cash_micros", "outstanding_micros")}
    return render(request, "bills.html", account=acct, account_id=account_id, from_day=start,
                  to_day=end, bills=bill_list, specs=plan_specs(plans.plans), totals=totals,
                  base=account_path(account_id), verification=pb.REGION_UNSPECIFIED)


async def healthz(request: Request) -> Response:
    return Response("ok\n", media_type="text/plain")


def not_found(path: str) -> PageError:
    return PageError(404, "Not found", f"No page at {path[:80]!r}.")
