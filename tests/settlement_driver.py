"""Runs the settlement property tests' operations on the real ledger and on the reference model.

Every answer is compared as the run goes; at the end every ended day is settled on demand
(twice) and the bills, balances, journal entries and money flows are compared
(:func:`run_and_check`).
"""

from __future__ import annotations

import json

from hypothesis import event

from ledger import calendar as cal
from ledger.catalog import builtin
from ledger.model import (
    AdvanceClock,
    CreateAccount,
    FundsKind,
    PurchasePlan,
    Reactivate,
    RefundPlan,
    SettleDay,
    TopUp,
    UpdateFeatures,
)
from ledger.store import is_pg_url

from .settlement_live import Live, bill_tuple, consume_cmd, ledger_at
from .settlement_model import (
    ACCOUNT_IDS,
    REFUND_WINDOW_US,
    SUSPEND_AFTER_US,
    SUSPENDED,
    US_PER_SECOND,
    Model,
)
from .settlement_strategies import (
    Advance,
    Buy,
    Configure,
    Fund,
    PayOff,
    React,
    Refund,
    Restart,
    Settle,
    Use,
)

# ---------------------------------------------------------------------------- the driver


def advance_target(model: Model, op: Advance) -> int:
    now = model.now
    day_end = cal.day_end(model.day())
    if op.mode == "secs":
        return now + op.value * US_PER_SECOND
    if op.mode == "suspend":
        since = [a.overdue_since for a in model.accounts.values()
                 if a.overdue_since is not None and a.status != SUSPENDED]
        if since and min(since) + SUSPEND_AFTER_US + op.value >= now:
            return min(since) + SUSPEND_AFTER_US + op.value
    if op.mode == "refund_edge":
        fresh = [p.bought for p in model.plans
                 if not p.refunded and p.bought + REFUND_WINDOW_US + op.value >= now]
        if fresh:
            return min(fresh) + REFUND_WINDOW_US + op.value
    if op.mode == "expiry":
        live = [p.expires for p in model.plans
                if not p.refunded and p.left > 0 and p.expires + op.value >= now]
        if live:
            return min(live) + op.value
    return max(now, day_end + (op.value if op.mode == "day_end" else 0))


def drive(live: Live, model: Model, accounts: list[str], funds: list[tuple[int, int]],
          ops: list[object]) -> None:
    """Run the ops on the ledger and the model; check every answer as it comes."""
    for account_id, (cash, voucher) in zip(accounts, funds, strict=True):
        live.call(CreateAccount(account_id))
        model.create(account_id)
        for kind, amount in ((FundsKind.CASH, cash), (FundsKind.VOUCHER, voucher)):
            if amount:
                live.call(TopUp(account_id, f"init-{int(kind)}", kind, amount))
                model.top_up(account_id, kind, amount)
    for i, op in enumerate(ops):
        event(f"op {type(op).__name__}")
        rid = f"r-{i}"
        acct = accounts[getattr(op, "acct", 0) % len(accounts)]
        if isinstance(op, Buy):
            price = builtin()[op.spec_id].price_micros
            expected = model.purchase(acct, op.spec_id, price)
            plan, reason = live.attempt(PurchasePlan(acct, rid, op.spec_id))
            if isinstance(expected, str):
                assert (plan, reason) == (None, expected), op
            else:
                assert reason is None, (op, reason)
                expected.plan_id = plan.plan_id
                assert (plan.purchased_at, plan.expires_at, plan.paid_voucher_micros,
                        plan.paid_cash_micros) == (expected.bought, expected.expires,
                                                   expected.paid_voucher, expected.paid_cash)
        elif isinstance(op, Use):
            expected = model.consume(acct, op.quantity, op.region)
            out, reason = live.attempt(consume_cmd(acct, rid, op.quantity, op.region))
            if isinstance(expected, str):
                assert (out, reason) == (None, expected), op
            else:
                assert reason is None, (op, reason)
                assert ([tuple(a) for a in out.allocations], out.payg_units) == expected, op
        elif isinstance(op, Configure):
            expected = model.features(acct, op.scenario_ids, op.custom)
            _, reason = live.attempt(UpdateFeatures(acct, rid, op.scenario_ids, op.custom))
            assert reason == expected, op
        elif isinstance(op, Fund):
            live.call(TopUp(acct, rid, op.kind, op.amount))
            model.top_up(acct, op.kind, op.amount)
        elif isinstance(op, PayOff):
            amount = model.accounts[acct].outstanding + op.extra
            if amount:
                live.call(TopUp(acct, rid, op.kind, amount))
                model.top_up(acct, op.kind, amount)
        elif isinstance(op, Refund):
            bought = [p for p in model.plans if p.plan_id != "?"]
            if not bought:
                continue
            plan = bought[op.pick % len(bought)]
            expected = model.refund(plan)
            _, reason = live.attempt(RefundPlan(plan.plan_id, rid))
            assert reason == expected, (op, plan)
            event(f"refund -> {reason or 'OK'}")
        elif isinstance(op, React):
            expected = model.reactivate(acct)
            _, reason = live.attempt(Reactivate(acct, rid))
            assert reason == expected, op
            event(f"reactivate -> {reason or 'OK'}")
        elif isinstance(op, Settle):
            days = model.ended_days()
            if op.pick % (len(days) + 1) == len(days):  # today: not ended yet (R17)
                _, reason = live.attempt(SettleDay(model.day()))
                assert reason == "DAY_NOT_ENDED"
            else:
                day = days[op.pick % (len(days) + 1)]
                got = [bill_tuple(b) for b in live.call(SettleDay(day))]
                assert got == model.bills.get(day, []), day
        elif isinstance(op, Restart):
            live.restart()
            assert live.clock.now_us() == model.now, "the test clock survives a restart"
        elif isinstance(op, Advance):
            to_us = advance_target(model, op)
            model.advance(to_us)
            assert live.call(AdvanceClock(to_us)) == to_us
        assert live.account_rows() == {a: m.row() for a, m in model.accounts.items()}, (i, op)
    # Past the end of the last day: every day with activity is settled (R17).
    to_us = cal.day_end(model.day())
    model.advance(to_us)
    assert live.call(AdvanceClock(to_us)) == to_us
    assert live.account_rows() == {a: m.row() for a, m in model.accounts.items()}
    bills = [b for day in model.bills.values() for b in day]
    event(f"bills: {min(len(bills), 10)}+" if len(bills) >= 10 else f"bills: {len(bills)}")
    event(f"suspensions: {model.suspensions}, reactivations: {model.reactivations}")
    event(f"bills with outstanding: {sum(1 for b in bills if b[9]) > 0}")
    event(f"outstanding paid by top-ups: {model.paid_outstanding_by_topups > 0}")
    event(f"outstanding paid by refunds: {model.paid_outstanding_by_refunds > 0}")
    event(f"plan offsets billed: {any(b[4] for b in bills)}")
    event(f"due != total (rounded): {any(b[5] != b[6] for b in bills)}")
    event(f"plan expiries: {len(model.expiry_log) > 0}")


def payloads(live: Live, kind: str) -> list[dict]:
    return [json.loads(p) for (p,) in live.query(
        "SELECT payload FROM journal WHERE kind = ?", (kind,))]


def check_money(live: Live, model: Model) -> None:
    """Every micro-dollar topped up is a balance, a plan, a bill payment (R15, R16, R22)."""
    balances = live.query("SELECT sum(cash_micros + voucher_micros) FROM accounts")[0][0]
    plans_net = live.query(
        "SELECT coalesce(sum(paid_voucher_micros + paid_cash_micros), 0) FROM plans"
        " WHERE refunded_at_us IS NULL")[0][0]
    due, paid_at_settlement, outstanding_in_bills = live.query(
        "SELECT coalesce(sum(amount_due_micros), 0),"
        " coalesce(sum(paid_voucher_micros + paid_cash_micros), 0),"
        " coalesce(sum(outstanding_micros), 0) FROM bills")[0]
    # The payloads summed here, not in SQL: json_extract is SQLite's alone (issue 11).
    top_ups = payloads(live, "top_up")
    topped_up = sum(p["amount_micros"] for p in top_ups)
    paid_later = sum(p["paid_outstanding_micros"] for p in top_ups)
    refunds_paid = sum(p["paid_outstanding_voucher_micros"] + p["paid_outstanding_cash_micros"]
                       for p in payloads(live, "refund"))
    outstanding = live.query("SELECT sum(outstanding_micros) FROM accounts")[0][0]
    assert topped_up == model.topups_total
    assert (paid_later, refunds_paid) == (model.paid_outstanding_by_topups,
                                          model.paid_outstanding_by_refunds)
    # A refund's money paid outstanding amounts (R22): it left plans_net, not a balance.
    paid_later += refunds_paid
    assert topped_up == balances + plans_net + paid_at_settlement + paid_later
    assert due == paid_at_settlement + paid_later + outstanding
    assert outstanding_in_bills == paid_later + outstanding


def check_journal(live: Live, model: Model, days: list[str]) -> None:
    """The journal says the same (R25): each day settled once, in order, at its end (R17);
    one entry per bill with the bill's figures; suspensions (R23) and forfeits (R9)."""
    # The journal's order: seq on SQLite; gseq on PostgreSQL, where a reopened ledger may
    # append to a second node's chain (its first node number is held until the closed
    # connection's backend has exited), whose seq starts again at 1.
    order = "gseq" if is_pg_url(live.db) else "seq"
    settled = [(json.loads(p)["day"], at) for at, p in live.query(
        f"SELECT at_us, payload FROM journal WHERE kind = 'day_settled' ORDER BY {order}")]
    assert settled == [(d, cal.day_end(d)) for d in days]
    bills = []
    for account_id, at, payload in live.query(
            f"SELECT account_id, at_us, payload FROM journal WHERE kind = 'bill' ORDER BY {order}"):
        p = json.loads(payload)
        bills.append((account_id, p["day"], p["bill_date"], tuple(map(tuple, p["lines"])),
                      tuple(map(tuple, p["plan_offsets"])), p["total_micros"],
                      p["amount_due_micros"], p["paid_voucher_micros"], p["paid_cash_micros"],
                      p["outstanding_micros"], at))
    assert bills == [b for d in days for b in model.bills.get(d, [])]
    suspended = []
    for account_id, at, payload in live.query(
            "SELECT account_id, at_us, payload FROM journal WHERE kind = 'account_suspended'"
            f" ORDER BY {order}"):
        p = json.loads(payload)
        suspended.append((account_id, at, p["overdue_since_us"], p["outstanding_micros"],
                          sorted(p["deleted"]["scenario_ids"]), p["deleted"]["custom_policy"]))
    assert suspended == model.suspension_log
    expired = [(a, json.loads(p)["plan_id"], at, json.loads(p)["units_forfeited"])
               for a, at, p in live.query("SELECT account_id, at_us, payload FROM journal"
                                          f" WHERE kind = 'plan_expired' ORDER BY {order}")]
    assert expired == model.expiry_log


def run_and_check(db: str, start_us: int, n_accounts: int, funds: list[tuple[int, int]],
                  ops: list[object]) -> None:
    """One example on a fresh ledger of ``db``'s backend (an SQLite path or a PostgreSQL URL)."""
    accounts = list(ACCOUNT_IDS[:n_accounts])
    with ledger_at(db, start_us) as live:
        model = Model(now=start_us)
        drive(live, model, accounts, funds[:n_accounts], ops)
        days = model.ended_days()
        assert days and days[-1] == cal.billing_day(model.now - 1)
        assert days[0] == cal.billing_day(start_us)
        before = live.snapshot()
        first = {d: [bill_tuple(b) for b in live.call(SettleDay(d))] for d in days}
        middle = live.snapshot()
        again = {d: [bill_tuple(b) for b in live.call(SettleDay(d))] for d in days}
        after = live.snapshot()
        check_money(live, model)
        check_journal(live, model, days)
    assert first == {d: model.bills.get(d, []) for d in days}
    assert set(model.bills) <= set(days)
    assert again == first  # R19: the same bills again
    assert before == middle == after  # ... and nothing charged or written again
