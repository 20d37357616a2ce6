"""Unit tests of the pure domain core, each named for the rule in RULES.md it proves.

Expected values are written out by hand (never computed with the code under test), so a
test fails when the code and the rule disagree.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from ledger import calendar as cal
from ledger.allocation import allocate, consumption_order
from ledger.errors import InvalidArgument
from ledger.model import (
    QUANTITY_MAX,
    REQUEST_ID_LEN_MAX,
    Architecture,
    CaptchaType,
    Consume,
    PlanState,
    Step,
    Validity,
    check_quantity,
    check_request_id,
    check_text,
    is_billable,
    parse_enum,
)
from ledger.money import (
    CUSTOM_POLICY_FEE_MICROS,
    PAYG_UNIT_PRICE_MICROS,
    SCENARIO_FEE_MICROS,
    SCENARIOS_FREE,
    Region,
    format_usd,
    payg_cost_micros,
    round_half_up_to_cent,
    split_payment,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US_PER_DAY = 86_400 * 1_000_000


def us(iso: str) -> int:
    """An ISO-8601 instant with an explicit offset, as integer microseconds (no ledger code)."""
    return (datetime.fromisoformat(iso) - _EPOCH) // timedelta(microseconds=1)


# ---------------------------------------------------------------------------- R1 billing day


def test_r1_last_microsecond_of_a_day_belongs_to_it():
    """15:59:59.999999Z is still 23:59:59.999999 of the same UTC+8 day."""
    assert cal.billing_day(us("2027-01-01T15:59:59.999999+00:00")) == "2027-01-01"


def test_r1_first_microsecond_of_the_next_day():
    """16:00:00Z is 00:00 of the next UTC+8 day, although it is the same UTC day."""
    assert cal.billing_day(us("2027-01-01T16:00:00+00:00")) == "2027-01-02"


def test_r1_utc_midnight_is_eight_in_the_morning_local():
    """00:00Z and 15:59Z of one UTC date are the same billing day (the UTC date itself)."""
    assert cal.billing_day(us("2027-03-10T00:00:00+00:00")) == "2027-03-10"
    assert cal.billing_day(us("2027-03-09T23:59:59.999999+00:00")) == "2027-03-10"


def test_r1_year_boundary_is_local():
    """New year arrives at 16:00Z on 31 December."""
    assert cal.billing_day(us("2027-12-31T15:59:59.999999+00:00")) == "2027-12-31"
    assert cal.billing_day(us("2027-12-31T16:00:00+00:00")) == "2028-01-01"


def test_r1_day_start_and_end_are_local_midnights():
    """Day D is [D 00:00+08:00, D+1 00:00+08:00): 16:00Z of D-1 to 16:00Z of D."""
    assert cal.day_start("2027-01-02") == us("2027-01-01T16:00:00+00:00")
    assert cal.day_end("2027-01-01") == us("2027-01-01T16:00:00+00:00")
    assert cal.day_end("2027-01-01") == cal.day_start("2027-01-02")
    assert cal.day_end("2028-02-29") - cal.day_start("2028-02-29") == US_PER_DAY


def test_r1_day_bounds_agree_with_billing_day():
    """day_start is in the day and day_end - 1 is its last microsecond; day_end is not."""
    for day in ("2027-01-01", "2028-02-29", "2028-12-31"):
        assert cal.billing_day(cal.day_start(day)) == day
        assert cal.billing_day(cal.day_end(day) - 1) == day
        assert cal.billing_day(cal.day_end(day)) == cal.next_day(day)
        assert cal.billing_day(cal.day_start(day) - 1) != day


@pytest.mark.parametrize(
    "bad",
    ["2027-02-29", "2027-13-01", "2027-1-1", "20270101", "", "x", "2027-01-01\n",
     "2027-01-01 ", "\uff12\uff10\uff12\uff17-01-01"],
)
def test_r1_malformed_billing_day_is_refused(bad):
    """A billing day must be a real YYYY-MM-DD date, else InvalidArgument."""
    with pytest.raises(InvalidArgument):
        cal.day_start(bad)


# ---------------------------------------------------------------------------- R6 validity


@pytest.mark.parametrize(
    ("bought", "months", "expires"),
    [
        # 31 Jan 10:00 local, one month: 28 Feb (29 in a leap year), same clock time.
        ("2027-01-31T10:00:00+08:00", 1, "2027-02-28T10:00:00+08:00"),
        ("2028-01-31T10:00:00+08:00", 1, "2028-02-29T10:00:00+08:00"),
        # 29 Feb, one year: 28 Feb.
        ("2028-02-29T10:00:00+08:00", 12, "2029-02-28T10:00:00+08:00"),
        # A day that exists stays the same day; 31 Mar -> 30 Apr.
        ("2027-01-15T10:00:00+08:00", 1, "2027-02-15T10:00:00+08:00"),
        ("2027-03-31T23:59:59.999999+08:00", 1, "2027-04-30T23:59:59.999999+08:00"),
        # Month and year wrap.
        ("2027-12-15T10:00:00+08:00", 1, "2028-01-15T10:00:00+08:00"),
        ("2027-12-31T10:00:00+08:00", 1, "2028-01-31T10:00:00+08:00"),
        ("2027-12-31T10:00:00+08:00", 12, "2028-12-31T10:00:00+08:00"),
        ("2027-11-30T00:00:00+08:00", 3, "2028-02-29T00:00:00+08:00"),
    ],
)
def test_r6_add_months_clamps_to_the_last_day(bought, months, expires):
    """Same local clock time one month/year later, clamped to the month's last day."""
    assert cal.add_months(us(bought), months) == us(expires)


def test_r6_utc_instant_on_a_different_local_day():
    """2027-01-31T20:00Z is 1 Feb 04:00 local, so one month later is 1 Mar 04:00 local."""
    t = us("2027-01-31T20:00:00+00:00")
    assert cal.billing_day(t) == "2027-02-01"
    assert cal.add_months(t, 1) == us("2027-03-01T04:00:00+08:00")


def test_r6_local_day_decides_the_clamp_not_the_utc_day():
    """30 Jan 20:00Z is 31 Jan 04:00 local: expires 28 Feb 04:00 local, not 28 Feb 20:00Z."""
    t = us("2027-01-30T20:00:00+00:00")
    assert cal.add_months(t, 1) == us("2027-02-28T04:00:00+08:00")
    assert cal.add_months(t, 1) == us("2027-02-27T20:00:00+00:00")


def test_r6_local_midnight_keeps_its_local_day():
    """28 Feb 16:00Z is 1 Mar 00:00 local: one month later is 1 Apr 00:00 local."""
    assert cal.add_months(us("2027-02-28T16:00:00+00:00"), 1) == us("2027-04-01T00:00:00+08:00")


def test_r6_validity_is_half_open():
    """Valid means purchased_at <= t < expires_at (R6, R7)."""
    p = _plan("p", units=10, purchased_at=100, expires_at=200)
    assert not p.is_valid_at(99)
    assert p.is_valid_at(100)
    assert p.is_valid_at(199)
    assert not p.is_valid_at(200)


def test_r6_validity_months():
    """A one-month plan adds 1 month, a one-year plan 12."""
    assert Validity.ONE_MONTH.months == 1
    assert Validity.ONE_YEAR.months == 12


# ---------------------------------------------------------------------------- R3 billable


# R3's table, by hand: V2 all five types at step 3; V3 the four visible types at step 3;
# V3 invisible at step 3 and step 4.1. Nothing else.
_R3_BILLABLE = {
    (Architecture.V2, CaptchaType.SLIDER, Step.STEP_3),
    (Architecture.V2, CaptchaType.PUZZLE, Step.STEP_3),
    (Architecture.V2, CaptchaType.ONE_CLICK, Step.STEP_3),
    (Architecture.V2, CaptchaType.IMAGE_RESTORATION, Step.STEP_3),
    (Architecture.V2, CaptchaType.INVISIBLE, Step.STEP_3),
    (Architecture.V3, CaptchaType.SLIDER, Step.STEP_3),
    (Architecture.V3, CaptchaType.PUZZLE, Step.STEP_3),
    (Architecture.V3, CaptchaType.ONE_CLICK, Step.STEP_3),
    (Architecture.V3, CaptchaType.IMAGE_RESTORATION, Step.STEP_3),
    (Architecture.V3, CaptchaType.INVISIBLE, Step.STEP_3),
    (Architecture.V3, CaptchaType.INVISIBLE, Step.STEP_4_1),
}


@pytest.mark.parametrize(
    ("arch", "ctype", "step"),
    list(itertools.product(Architecture, CaptchaType, Step)),
    ids=lambda v: v.name,
)
def test_r3_billing_step_table(arch, ctype, step):
    """Every architecture x type x step is billable exactly when R3's table says so."""
    expected = (arch, ctype, step) in _R3_BILLABLE
    assert is_billable(arch, ctype, step) is expected
    event = Consume("a", "r", Region.CHINESE_MAINLAND, ctype, arch, step)
    assert event.billable is expected


def test_r3_table_size():
    """The product has 20 combinations, of which exactly 11 are billable."""
    combos = list(itertools.product(Architecture, CaptchaType, Step))
    assert len(combos) == 20
    assert sum(is_billable(*c) for c in combos) == 11


# ---------------------------------------------------------------------------- R10 / R15 / R20


def test_r10_payg_unit_prices():
    """USD 0.0007 in the Chinese mainland and USD 0.001 outside it, in micro-USD."""
    assert PAYG_UNIT_PRICE_MICROS[Region.CHINESE_MAINLAND] == 700
    assert PAYG_UNIT_PRICE_MICROS[Region.OUTSIDE_CHINESE_MAINLAND] == 1_000
    assert set(PAYG_UNIT_PRICE_MICROS) == set(Region)


def test_r10_payg_cost_is_price_times_units():
    """Pay-as-you-go cost is exact integer multiplication by the region's price."""
    assert payg_cost_micros(Region.CHINESE_MAINLAND, 1) == 700
    assert payg_cost_micros(Region.OUTSIDE_CHINESE_MAINLAND, 3) == 3_000
    assert payg_cost_micros(Region.CHINESE_MAINLAND, 0) == 0
    assert isinstance(payg_cost_micros(Region.CHINESE_MAINLAND, 7), int)


@pytest.mark.parametrize(
    ("micros", "rounded"),
    [
        (5_000, 10_000),  # half a cent rounds up
        (4_999, 0),  # just under half rounds down
        (15_000, 20_000),  # half up, not half even
        (25_000, 30_000),
        (357_000_000, 357_000_000),  # a whole number of cents stays
        (0, 0),
        (10_000, 10_000),
        (14_999, 10_000),
        (700, 0),
        (350_004_999, 350_000_000),
        (350_005_000, 350_010_000),
    ],
)
def test_r15_round_half_up_to_cent(micros, rounded):
    """A bill's amount due is its exact total rounded half up to the cent."""
    assert round_half_up_to_cent(micros) == rounded


def test_r15_money_is_integers():
    """Rounding returns an int, never a float."""
    assert type(round_half_up_to_cent(5_000)) is int


def test_r20_worked_example_arithmetic():
    """500,000 mainland requests cost USD 350.00; with 5 scenarios and custom policy, 357.00."""
    verification = payg_cost_micros(Region.CHINESE_MAINLAND, 500_000)
    assert verification == 500_000 * 700 == 350_000_000
    scenarios = (5 - SCENARIOS_FREE) * SCENARIO_FEE_MICROS
    assert scenarios == 2_000_000
    assert CUSTOM_POLICY_FEE_MICROS == 5_000_000
    total = verification + scenarios + CUSTOM_POLICY_FEE_MICROS
    assert total == 357_000_000
    assert round_half_up_to_cent(total) == 357_000_000
    assert format_usd(total) == "357.00"


# ---------------------------------------------------------------------------- R16 paying


@pytest.mark.parametrize(
    ("amount", "voucher", "cash", "expected"),
    [
        (100, 30, 100, (30, 70)),  # vouchers first, the rest from cash
        (100, 200, 100, (100, 0)),  # vouchers alone cover it
        (100, 0, 100, (0, 100)),  # no vouchers
        (100, 30, 20, (30, 20)),  # not enough: 50 stays unpaid
        (100, 0, 0, (0, 0)),
        (0, 50, 50, (0, 0)),
        (60_000_000, 10_000_000, 100_000_000, (10_000_000, 50_000_000)),
    ],
)
def test_r16_split_payment_vouchers_then_cash(amount, voucher, cash, expected):
    """Money leaves vouchers first, then cash; what neither covers is left over."""
    got = split_payment(amount, voucher, cash)
    assert got == expected
    assert got[0] <= voucher and got[1] <= cash and sum(got) <= amount


# ---------------------------------------------------------------------------- R8 / R7 allocate


def _plan(plan_id: str, *, units: int, purchased_at: int = 0, expires_at: int = 1_000,
          seq: int = 1, remaining: int | None = None, refunded_at: int | None = None
          ) -> PlanState:
    return PlanState(
        plan_id=plan_id, account_id="a", spec_id="s", units_total=units,
        units_remaining=units if remaining is None else remaining, price_micros=0,
        validity=Validity.ONE_MONTH, purchased_at=purchased_at, expires_at=expires_at,
        purchase_seq=seq, refunded_at=refunded_at)


def _taken(alloc) -> list[tuple[str, int]]:
    return [(p.plan_id, n) for p, n in alloc.takes]


def test_r8_earliest_expiry_first():
    """The plan that expires first pays first, whatever order the plans come in."""
    late = _plan("late", units=10, expires_at=900, seq=1)
    early = _plan("early", units=10, expires_at=500, seq=2)
    a = allocate([late, early], 3, t_us=100)
    assert _taken(a) == [("early", 3)] and a.payg_units == 0


def test_r8_equal_expiry_earliest_purchase_first():
    """With equal expires_at, the ledger's purchase order decides (not the list order)."""
    second = _plan("second", units=10, expires_at=500, seq=7)
    first = _plan("first", units=10, expires_at=500, seq=3)
    assert _taken(allocate([second, first], 4, t_us=100)) == [("first", 4)]
    assert [p.plan_id for p in consumption_order([second, first], 100)] == ["first", "second"]


def test_r8_split_across_plans_in_order():
    """A request of quantity N drains plans one after another, then falls to payg (R10)."""
    a1 = _plan("a1", units=5, expires_at=300, seq=1)
    b2 = _plan("b2", units=5, expires_at=400, seq=2)
    c3 = _plan("c3", units=5, expires_at=400, seq=3)
    a = allocate([c3, b2, a1], 12, t_us=100)
    assert _taken(a) == [("a1", 5), ("b2", 5), ("c3", 2)] and a.payg_units == 0
    a = allocate([c3, b2, a1], 20, t_us=100)
    assert _taken(a) == [("a1", 5), ("b2", 5), ("c3", 5)] and a.payg_units == 5


def test_r8_allocate_is_pure():
    """allocate decides; it does not take the units itself (compute, then apply)."""
    p = _plan("p", units=5)
    allocate([p], 3, t_us=100)
    assert p.units_remaining == 5


def test_r8_skips_refunded_plans():
    """A refunded plan offsets nothing (R21)."""
    refunded = _plan("refunded", units=10, expires_at=300, seq=1, refunded_at=50)
    ok = _plan("ok", units=10, expires_at=900, seq=2)
    assert _taken(allocate([refunded, ok], 2, t_us=100)) == [("ok", 2)]


def test_r8_skips_expired_plans():
    """A plan at or past its expires_at offsets nothing (R6)."""
    expired = _plan("expired", units=10, expires_at=100, seq=1)
    ok = _plan("ok", units=10, expires_at=900, seq=2)
    assert _taken(allocate([expired, ok], 2, t_us=100)) == [("ok", 2)]
    assert _taken(allocate([expired, ok], 2, t_us=99)) == [("expired", 2)]


def test_r7_skips_plans_not_yet_purchased():
    """A plan never offsets requests from before its purchase; it does from that instant."""
    future = _plan("future", units=10, purchased_at=200, expires_at=300, seq=1)
    ok = _plan("ok", units=10, purchased_at=0, expires_at=900, seq=2)
    assert _taken(allocate([future, ok], 2, t_us=199)) == [("ok", 2)]
    assert _taken(allocate([future, ok], 2, t_us=200)) == [("future", 2)]


def test_r8_skips_empty_plans():
    """A plan with no units left is passed over, not taken for zero."""
    empty = _plan("empty", units=10, remaining=0, expires_at=300, seq=1)
    ok = _plan("ok", units=10, expires_at=900, seq=2)
    assert _taken(allocate([empty, ok], 2, t_us=100)) == [("ok", 2)]


def test_r10_no_plan_means_all_payg():
    """With no plan that can offset, the whole quantity is pay-as-you-go."""
    expired = _plan("expired", units=10, expires_at=50)
    a = allocate([expired], 7, t_us=100)
    assert a.takes == [] and a.payg_units == 7
    assert allocate([], 1, t_us=100).payg_units == 1


# ---------------------------------------------------------------------------- input checks


def test_r5_quantity_zero_means_one():
    """Quantity 0 (the proto default) is one request; 1..1,000,000 pass unchanged."""
    assert check_quantity(0) == 1
    assert check_quantity(1) == 1
    assert check_quantity(QUANTITY_MAX) == QUANTITY_MAX == 1_000_000


@pytest.mark.parametrize("bad", [-1, -1_000, QUANTITY_MAX + 1, 10**12])
def test_r5_quantity_out_of_range_is_refused(bad):
    """A negative quantity or one over 1,000,000 is InvalidArgument."""
    with pytest.raises(InvalidArgument):
        check_quantity(bad)


@pytest.mark.parametrize(
    "bad",
    ["", "a\nb", "tab\there", "nul\x00", "del\x7f", "caf\u00e9", "\u4e2d\u6587",
     "x" * (REQUEST_ID_LEN_MAX + 1)],
    ids=["empty", "newline", "tab", "nul", "del", "latin1", "cjk", "too-long"],
)
def test_r12_request_id_must_be_printable_ascii_and_bounded(bad):
    """A request_id is 1..128 printable ASCII characters; anything else is InvalidArgument."""
    with pytest.raises(InvalidArgument):
        check_request_id(bad)


def test_r12_request_id_limits_accept_the_edges():
    """Exactly 128 characters and every printable ASCII character are accepted."""
    assert check_request_id("x" * REQUEST_ID_LEN_MAX) == "x" * REQUEST_ID_LEN_MAX
    printable = "".join(chr(c) for c in range(0x20, 0x7F))
    assert check_text(printable, "f", 200) == printable


def test_check_text_allow_empty_and_length():
    """An optional field may be empty; the length limit counts characters."""
    assert check_text("", "f", 5, allow_empty=True) == ""
    assert check_text("abcde", "f", 5) == "abcde"
    with pytest.raises(InvalidArgument):
        check_text("abcdef", "f", 5)


@pytest.mark.parametrize("enum_cls", [Region, CaptchaType, Architecture, Step, Validity])
def test_parse_enum_refuses_unspecified_and_unknown(enum_cls):
    """0 (*_UNSPECIFIED) and numbers the contract does not know are InvalidArgument."""
    with pytest.raises(InvalidArgument, match="unspecified"):
        parse_enum(enum_cls, 0, "field")
    with pytest.raises(InvalidArgument, match="unknown"):
        parse_enum(enum_cls, max(enum_cls) + 1, "field")
    with pytest.raises(InvalidArgument):
        parse_enum(enum_cls, -1, "field")
    for member in enum_cls:
        assert parse_enum(enum_cls, int(member), "field") is member
