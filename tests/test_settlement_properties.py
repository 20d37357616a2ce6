"""Property tests of daily settlement (R13-R24): the real engine against a reference model.

Each hypothesis example opens a fresh ledger and drives the engine in process through the single
writer, exactly as the server does (tests/settlement_live.py), over a random run of
purchases, consumes, feature changes, top-ups, refunds, reactivations, on-demand settlements and
clock moves for one or two accounts (tests/settlement_strategies.py). :class:`Model`
(tests/settlement_model.py) restates the rules directly. Every answer is compared as the run
goes; at the end every ended day is settled on demand (twice) and the bills, balances, journal
entries and money flows are compared (tests/settlement_driver.py).

Every test runs on both backends (issue 11) through the module-scoped ``module_db`` fixture
(hypothesis refuses function-scoped ones): each example gets a new SQLite file, or the module's
PostgreSQL database emptied.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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

from .settlement_driver import run_and_check
from .settlement_live import Live, consume_cmd, ledger_at
from .settlement_model import (
    ACTIVE,
    OVERDUE,
    PAYG_PRICE,
    REFUND_WINDOW_US,
    SCENARIO_POOL,
    SUSPEND_AFTER_US,
    SUSPENDED,
    US_PER_DAY,
    US_PER_HOUR,
    USD,
    _us,
)
from .settlement_strategies import (
    Advance,
    Buy,
    Configure,
    initial_cash,
    initial_vouchers,
    lifecycle_operation,
    operation,
    refund_lifecycle_operation,
    start_instants,
)

RUN = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------- R13-R24


@RUN
@given(start_us=start_instants, n_accounts=st.integers(1, 2),
       funds=st.lists(st.tuples(initial_cash, initial_vouchers), min_size=2, max_size=2),
       ops=st.lists(operation, min_size=10, max_size=25))
def test_r13_r24_settlement_matches_reference_model(module_db, start_us, n_accounts, funds, ops):
    """Bills, payments, overdue and suspension equal the model's; money is conserved; R19."""
    run_and_check(module_db, start_us, n_accounts, funds, ops)


@SMALL
@given(start_us=start_instants, n_accounts=st.integers(1, 2),
       ops=st.lists(lifecycle_operation, min_size=10, max_size=25))
def test_r22_r24_overdue_suspension_lifecycle_matches_reference_model(module_db, start_us,
                                                                       n_accounts, ops):
    """Unpaid fees, suspension at +168 h + 1 µs, top-ups and reactivation as the model says."""
    run_and_check(module_db, start_us, n_accounts, [(0, 0), (0, 0)], ops)


@SMALL
@given(start_us=start_instants, n_accounts=st.integers(1, 2),
       funds=st.lists(st.sampled_from([(60 * USD, 0), (40 * USD, 20 * USD)]), min_size=2,
                      max_size=2),
       ops=st.lists(refund_lifecycle_operation, min_size=10, max_size=25))
def test_r21_r22_refunds_pay_outstanding_as_the_model_says(module_db, start_us, n_accounts,
                                                            funds, ops):
    """Refunds to overdue and suspended accounts pay what is outstanding, vouchers then
    cash (R22 clarified); money is conserved and the journal rebuilds the same figures.
    Each run opens with a plan bought with everything the first account has and a fee that
    the day's bill cannot pay, so that a refund finds something outstanding."""
    owing = [Buy(0, "month-100k"), Configure(0, ("s1", "s2", "s3", "s4"), True),
             Advance("day_end", 0)]
    run_and_check(module_db, start_us, n_accounts, funds, owing + ops)


@SMALL
@given(qty=st.integers(1, 300_000), region=st.sampled_from(sorted(PAYG_PRICE)),
       scenarios=st.integers(0, 6), custom=st.booleans(),
       voucher=st.integers(0, 400 * USD), cash=st.integers(0, 400 * USD))
def test_r15_r16_one_day_bill_rounded_and_paid_vouchers_first(module_db, qty, region, scenarios,
                                                              custom, voucher, cash):
    """One day's bill: exact lines, due = total rounded half up to the cent, vouchers first."""
    d0 = _us(2027, 3, 10, 16)  # 2027-03-11 00:00+08:00
    with ledger_at(module_db, d0) as live:
        live.call(CreateAccount("acme"))
        for kind, amount in ((FundsKind.VOUCHER, voucher), (FundsKind.CASH, cash)):
            if amount:
                live.call(TopUp("acme", f"t{int(kind)}", kind, amount))
        live.call(AdvanceClock(d0 + US_PER_HOUR))
        ids = tuple(SCENARIO_POOL[:scenarios])
        live.call(UpdateFeatures("acme", "f", ids, custom))
        live.call(consume_cmd("acme", "c", qty, region))
        live.call(AdvanceClock(d0 + US_PER_DAY))
        (bill,) = live.call(SettleDay("2027-03-11"))
    total = qty * PAYG_PRICE[region] + max(0, scenarios - 3) * USD + custom * 5 * USD
    due = (total + 5_000) // 10_000 * 10_000
    pv = min(due, voucher)
    pc = min(due - pv, cash)
    assert (bill.total_micros, bill.amount_due_micros) == (total, due)
    assert (bill.paid_voucher_micros, bill.paid_cash_micros, bill.outstanding_micros) == (
        pv, pc, due - pv - pc)
    assert bill.issued_at_us == d0 + US_PER_DAY and bill.bill_date == "2027-03-12"


@SMALL
@given(before=st.integers(0, 6), during=st.lists(st.integers(0, 6), max_size=3),
       custom_moments=st.lists(st.booleans(), min_size=1, max_size=3))
def test_r13_r14_feature_fee_is_the_most_at_any_moment(module_db, before, during,
                                                        custom_moments):
    """Day D pays for the most scenarios configured at any moment of D, custom if ever on."""
    d0 = _us(2027, 3, 10, 16)  # 2027-03-11 00:00+08:00
    with ledger_at(module_db, d0 - US_PER_HOUR) as live:
        live.call(CreateAccount("acme"))
        live.call(TopUp("acme", "t", FundsKind.CASH, 100 * USD))
        live.call(UpdateFeatures("acme", "f-before", tuple(SCENARIO_POOL[:before]),
                                 custom_moments[0]))
        customs = list(custom_moments[1:]) + [False] * len(during)
        for i, n in enumerate(during):
            live.call(AdvanceClock(d0 + (i + 1) * US_PER_HOUR))
            live.call(UpdateFeatures("acme", f"f-{i}", tuple(SCENARIO_POOL[:n]), customs[i]))
        live.call(AdvanceClock(d0 + 2 * US_PER_DAY))
        bills = {d: live.call(SettleDay(d)) for d in ("2027-03-11", "2027-03-12")}
    most = max([before, *during])
    any_custom = custom_moments[0] or any(customs[:len(during)])
    last_n = during[-1] if during else before
    last_custom = customs[len(during) - 1] if during else custom_moments[0]
    for day, (n, custom) in (("2027-03-11", (most, any_custom)),
                             ("2027-03-12", (last_n, last_custom))):
        want = max(0, n - 3) * USD + custom * 5 * USD
        got = bills[day]
        assert sum(b.total_micros for b in got) == want, day
        assert len(got) == (1 if want else 0), day


def test_r22_r23_r24_suspension_exactly_after_168_hours(module_db):
    """Overdue at the settlement; still served at +168 h, suspended 1 µs later; R24 order."""
    d0 = _us(2027, 3, 10, 16)
    with ledger_at(module_db, d0 + US_PER_HOUR) as live:
        live.call(CreateAccount("acme"))
        live.call(UpdateFeatures("acme", "f", SCENARIO_POOL[:5], True))
        live.call(AdvanceClock(d0 + US_PER_DAY))
        since = d0 + US_PER_DAY
        rows = live.account_rows()["acme"]
        assert rows[:5] == (OVERDUE, 0, 0, 7 * USD, since)
        live.call(AdvanceClock(since + SUSPEND_AFTER_US))
        assert live.account_rows()["acme"][0] == OVERDUE
        live.call(consume_cmd("acme", "c-served", 1, 1))  # service goes on while overdue
        live.call(AdvanceClock(since + SUSPEND_AFTER_US + 1))
        status, *_, suspended_at, scenarios, custom = live.account_rows()["acme"]
        assert (status, suspended_at, scenarios, custom) == (SUSPENDED, since + SUSPEND_AFTER_US
                                                             + 1, [], 0)
        assert live.attempt(consume_cmd("acme", "c", 1, 1))[1] == "ACCOUNT_SUSPENDED"
        assert live.attempt(UpdateFeatures("acme", "g", (), False))[1] == "ACCOUNT_SUSPENDED"
        assert live.attempt(Reactivate("acme", "r1"))[1] == "OUTSTANDING_BALANCE"
        owed = live.account_rows()["acme"][3]
        # 7 USD per day on 8 days (the suspension day too, R13/R14) + the served request.
        assert owed == 8 * 7 * USD
        # R22: outstanding first; the rest is cash for the suspension day's own bill (7.00:
        # USD 7.0007 rounded, the fees it had before the deletion, R13/R14, plus one request).
        live.call(TopUp("acme", "t", FundsKind.CASH, owed + 7 * USD))
        assert live.account_rows()["acme"][:5] == (SUSPENDED, 7 * USD, 0, 0, None)
        assert live.attempt(Reactivate("acme", "r2"))[1] is None
        live.call(AdvanceClock(since + 20 * US_PER_DAY))  # then fees stopped with the config
        assert live.account_rows()["acme"][:5] == (ACTIVE, 0, 0, 0, None)
        assert live.attempt(Reactivate("acme", "r3"))[1] == "NOT_SUSPENDED"


@pytest.mark.parametrize("late_us, reason", [(0, None), (1, "REFUND_WINDOW_PASSED")])
def test_r21_refund_window_is_120_hours_inclusive(module_db, late_us, reason):
    """A plan refunds at exactly 120 h after purchase, not 1 µs later; money back as paid."""
    t0 = _us(2027, 3, 10, 2)
    with ledger_at(module_db, t0) as live:
        live.call(CreateAccount("acme"))
        live.call(TopUp("acme", "v", FundsKind.VOUCHER, 20 * USD))
        live.call(TopUp("acme", "c", FundsKind.CASH, 50 * USD))
        plan = live.call(PurchasePlan("acme", "p", "month-100k"))
        live.call(AdvanceClock(t0 + REFUND_WINDOW_US + late_us))
        assert live.attempt(RefundPlan(plan.plan_id, "r"))[1] == reason
        balances = live.account_rows()["acme"][1:3]
    assert balances == ((50 * USD, 20 * USD) if reason is None else (10 * USD, 0))


# ---------------------------------------------------------------------------- regressions
# A refund after a restart once refunded a second copy of the plan (fixed in Engine.plan).


def _bought_then_restarted(live: Live) -> str:
    t0 = _us(2027, 3, 10, 2)
    live.call(CreateAccount("acme"))
    live.call(TopUp("acme", "t", FundsKind.CASH, 60 * USD))
    plan_id = live.call(PurchasePlan("acme", "p", "month-100k")).plan_id
    live.restart()
    assert live.clock.now_us() == t0
    return plan_id


def test_r21_a_plan_is_refunded_once_after_a_restart(module_db):
    """Refund after a restart, then again: PLAN_REFUNDED, and the price came back once."""
    with ledger_at(module_db, _us(2027, 3, 10, 2)) as live:
        plan_id = _bought_then_restarted(live)
        live.call(RefundPlan(plan_id, "r1"))
        second = live.attempt(RefundPlan(plan_id, "r2"))[1]
        cash = live.account_rows()["acme"][1]
    assert (second, cash) == ("PLAN_REFUNDED", 60 * USD)  # actual: (None, 120 USD)


def test_r21_a_plan_refunded_after_a_restart_offsets_nothing(module_db):
    """Refund after a restart, then consume: pay-as-you-go, and the plan stays refunded."""
    with ledger_at(module_db, _us(2027, 3, 10, 2)) as live:
        plan_id = _bought_then_restarted(live)
        live.call(RefundPlan(plan_id, "r1"))
        out = live.call(consume_cmd("acme", "c", 10, 1))
        refunded_at = live.query("SELECT refunded_at_us FROM plans")[0][0]
    # actual: allocations ((plan_id, 10),), payg 0, and refunded_at_us back to NULL
    assert (out.allocations, out.payg_units, refunded_at is not None) == ((), 10, True)
