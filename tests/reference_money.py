"""Money in, restated for the reference models of the property and simulation tests.

R22 (clarified 2026-11-29): any money that comes into an account, a top-up of either kind or
a refund (R21), pays what is outstanding first, vouchers then cash (R16); only the rest
reaches the balances. Only "nothing outstanding" ends the overdue period, and a suspended
account stays suspended (R24). Written apart from ``ledger/`` on purpose: the tests compare
the engine against it.
"""

from __future__ import annotations

from typing import Any

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
