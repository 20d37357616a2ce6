"""Money in, restated for the reference models of the property and simulation tests.

R22 (clarified 2026-11-29): any money that comes into an account, a top-up of either kind or
a refund (R21), pays what is outstanding first, vouchers then cash (R16); only the rest
reaches the balances. Only "nothing outstanding" ends the overdue period, and a suspended
account stays suspended (R24). Written apart from ``ledger/`` on purpose: the tests compare
the engine against it.
"""

from __future__ import annotations

from typing import Any

from .sim_rules import CUSTOM_FEE, PAYG_PRICE, SCENARIO_FEE, SCENARIOS_FREE, round_half_up_cent

ACTIVE, OVERDUE = 1, 2  # AccountStatus wire numbers


def money_in(a: Any, voucher: int, cash: int) -> int:
    """Apply money in to a model account (fields cash, voucher, outstanding, overdue_since,
    status); returns how much of it paid what was outstanding."""
    pv = min(voucher, a.outstanding)
    pc = min(cash, a.outstanding - pv)
    a.outstanding -= pv + pc
    a.voucher += voucher - pv
    a.cash += cash - pc
    if a.outstanding == 0:
        a.overdue_since = None
        if a.status == OVERDUE:
            a.status = ACTIVE
    return pv + pc


def day_bill(a: Any, account_id: str, day: str, bill_date: str, plans: list[Any], at: int
             ) -> tuple | None:
    """Settle one account's day on a model account (fields feature_days, scenarios, custom,
    payg, offsets and those of :func:`money_in`; plans with plan_id, expires, order): the
    bill tuple, or None when the day had nothing to bill. R13/R14 feature fees, R10 and
    R15 the amount, R16 vouchers then cash, R22 the rest outstanding from ``at``."""
    scen, custom = a.feature_days.get(day, (len(a.scenarios), a.custom))
    payg = {r: n for r, n in a.payg.get(day, {}).items() if n}
    offs = a.offsets.get(day, {})
    extra = max(0, scen - SCENARIOS_FREE)
    if not (payg or offs or extra or custom):
        return None
    lines = [("verification", r, payg[r], PAYG_PRICE[r], payg[r] * PAYG_PRICE[r])
             for r in sorted(payg)]
    if extra:
        lines.append(("scenarios", 0, extra, SCENARIO_FEE, extra * SCENARIO_FEE))
    if custom:
        lines.append(("custom_policy", 0, 1, CUSTOM_FEE, CUSTOM_FEE))
    by_id = {p.plan_id: p for p in plans}
    offsets = tuple(sorted(offs.items(),
                           key=lambda kv: (by_id[kv[0]].expires, by_id[kv[0]].order)))
    total = sum(ln[4] for ln in lines)
    due = round_half_up_cent(total)
    pv = min(due, a.voucher)
    pc = min(due - pv, a.cash)
    out = due - pv - pc
    a.voucher -= pv
    a.cash -= pc
    if out:
        a.outstanding += out
        if a.overdue_since is None:
            a.overdue_since = at
        if a.status == ACTIVE:
            a.status = OVERDUE
    return (account_id, day, bill_date, tuple(lines), offsets, total, due, pv, pc, out, at)
