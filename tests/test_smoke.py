"""The end-to-end path a new user takes in the README tour."""

from clients.client import LedgerError

from .conftest import make_account


def test_r8_r10_consume_uses_plan_then_payg(client):
    """A plan pays first (R8); once empty, requests accrue pay-as-you-go at 0.0007 (R10)."""
    make_account(client, cash_micros=100_000_000)
    plan = client.purchase_plan("acme", "month-100k")
    r = client.consume("acme", quantity=99_999)
    assert [(a.plan_id, a.units) for a in r.allocations] == [(plan.plan_id, 99_999)]
    assert r.plan_units_remaining == 1 and r.payg_units == 0
    r = client.consume("acme", quantity=5, region="mainland")
    assert [(a.plan_id, a.units) for a in r.allocations] == [(plan.plan_id, 1)]
    assert r.payg_units == 4 and r.payg_amount_micros == 4 * 700
    rem = client.get_remaining("acme")
    assert rem.units_remaining_total == 0 and rem.payg_units == 4


def test_unknown_account_is_not_found(client):
    """Consume for an account nobody created is NOT_FOUND and journals nothing."""
    try:
        client.consume("nobody")
    except LedgerError as exc:
        assert exc.code.name == "NOT_FOUND" and exc.reason == "ACCOUNT_NOT_FOUND"
    else:
        raise AssertionError("expected NOT_FOUND")
