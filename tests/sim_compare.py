"""Server replies and model results side by side, for the simulation's driver.

The views turn each gRPC reply into the plain dicts and tuples the reference model
(tests/sim_model.py) answers with; :func:`expect` and :func:`expect_outcome` raise
:class:`Mismatch` with what differs, field by field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clients.client import LedgerError

from .sim_model import BillTuple, Refused
from .sim_rules import opt_us

# ---------------------------------------------------------------------------- views of replies


def account_view(a: Any) -> dict[str, Any]:
    return {"status": a.status, "cash": a.cash_balance_micros,
            "voucher": a.voucher_balance_micros, "outstanding": a.outstanding_micros,
            "overdue_since": opt_us(a, "overdue_since"),
            "suspended_at": opt_us(a, "suspended_at"),
            "scenario_ids": tuple(sorted(a.scenario_ids)),
            "custom_policy": a.custom_policy_enabled, "display_name": a.display_name,
            "created_at": opt_us(a, "created_at")}


def plan_view(p: Any) -> dict[str, Any]:
    return {"plan_id": p.plan_id, "account_id": p.account_id, "spec_id": p.spec_id,
            "units_total": p.units_total, "units_remaining": p.units_remaining,
            "units_consumed": p.units_consumed, "price": p.price_micros,
            "validity": p.validity, "purchased_at": opt_us(p, "purchased_at"),
            "expires_at": opt_us(p, "expires_at"), "status": p.status,
            "paid_voucher": p.paid_voucher_micros, "paid_cash": p.paid_cash_micros,
            "refunded_at": opt_us(p, "refunded_at"), "units_forfeited": p.units_forfeited}


def consume_view(r: Any) -> dict[str, Any]:
    return {"billable": r.billable,
            "allocations": tuple((a.plan_id, a.units) for a in r.allocations),
            "payg_units": r.payg_units, "payg_amount": r.payg_amount_micros,
            "replayed": r.replayed, "billing_day": r.billing_day,
            "recorded_at": opt_us(r, "recorded_at"),
            "plan_units_remaining": r.plan_units_remaining, "request_id": r.request_id,
            "journal_seq": r.journal_seq}


def bill_view(b: Any) -> BillTuple:
    return (b.account_id, b.billing_day, b.bill_date,
            tuple((ln.item, ln.region, ln.quantity, ln.unit_price_micros, ln.amount_micros)
                  for ln in b.lines),
            tuple((p.plan_id, p.units) for p in b.plan_offsets), b.total_micros,
            b.amount_due_micros, b.paid_voucher_micros, b.paid_cash_micros,
            b.outstanding_micros, opt_us(b, "issued_at"))


def remaining_view(r: Any) -> dict[str, Any]:
    return {"total": r.units_remaining_total, "plans": [plan_view(p) for p in r.plans],
            "payg_units": r.payg_units, "payg_amount": r.payg_amount_micros,
            "billing_day": r.billing_day}


# ---------------------------------------------------------------------------- comparing


class Mismatch(Exception):
    """The server and the model disagree."""


Outcome = tuple[Any, ...]  # ("ok", value) | ("err", code name, reason)


def on_server(fn: Callable[[], Any]) -> Outcome:
    try:
        return ("ok", fn())
    except LedgerError as exc:
        return ("err", exc.code.name, exc.reason)


def on_model(fn: Callable[[], Any]) -> Outcome:
    try:
        return ("ok", fn())
    except Refused as exc:
        return ("err", exc.code, exc.reason)


def diff(got: Any, want: Any) -> str:
    if isinstance(got, dict) and isinstance(want, dict):
        return "; ".join(f"{k}: server {got.get(k)!r} != model {want.get(k)!r}"
                         for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k))
    if isinstance(got, list | tuple) and isinstance(want, list | tuple):
        if len(got) != len(want):
            return f"{len(got)} items on the server, {len(want)} in the model:\n" \
                   f"    server {got!r}\n    model  {want!r}"
        return "; ".join(f"[{i}] {diff(g, w)}" for i, (g, w) in enumerate(zip(got, want,
                                                                              strict=True))
                         if g != w)
    return f"server {got!r} != model {want!r}"


def expect(what: str, got: Any, want: Any) -> None:
    if got != want:
        raise Mismatch(f"{what}: {diff(got, want)}")


def expect_outcome(what: str, got: Outcome, want: Outcome) -> bool:
    """Same success or same refusal (code and reason); True when both succeeded."""
    if got[0] != want[0] or (got[0] == "err" and got[1:] != want[1:]):
        show = [o[1:] if o[0] == "err" else "OK" for o in (got, want)]
        raise Mismatch(f"{what}: server {show[0]} != model {show[1]}")
    return got[0] == "ok"


def summary(o: Outcome) -> str:
    return "OK" if o[0] == "ok" else f"{o[1]}/{o[2]}"
