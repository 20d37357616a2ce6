"""Exact money (R15) and the price book (R10, R13, R14): integers in micro-USD, never floats."""

from __future__ import annotations

from enum import IntEnum

MICROS_PER_USD = 1_000_000
MICROS_PER_CENT = 10_000


class Region(IntEnum):
    """Values equal the wire enum's numbers, so conversion is a plain int()."""

    CHINESE_MAINLAND = 1
    OUTSIDE_CHINESE_MAINLAND = 2


# R10: pay-as-you-go unit price per billable request, by region.
PAYG_UNIT_PRICE_MICROS: dict[Region, int] = {
    Region.CHINESE_MAINLAND: 700,  # USD 0.0007
    Region.OUTSIDE_CHINESE_MAINLAND: 1_000,  # USD 0.001
}

# R13: USD 1 per scenario per day beyond the first 3.
SCENARIO_FEE_MICROS = 1 * MICROS_PER_USD
SCENARIOS_FREE = 3
# R14: USD 5 per day with custom policy configuration enabled at any moment of the day.
CUSTOM_POLICY_FEE_MICROS = 5 * MICROS_PER_USD


def payg_cost_micros(region: Region, units: int) -> int:
    return PAYG_UNIT_PRICE_MICROS[region] * units


def round_half_up_to_cent(micros: int) -> int:
    """R15: a bill's amount due is its exact total rounded half up to the cent."""
    if micros < 0:
        return -round_half_up_to_cent(-micros)
    return (micros + MICROS_PER_CENT // 2) // MICROS_PER_CENT * MICROS_PER_CENT


def split_payment(amount_micros: int, voucher_micros: int, cash_micros: int) -> tuple[int, int]:
    """R16: vouchers first, then cash. Returns (from_voucher, from_cash); may leave a rest."""
    from_voucher = min(amount_micros, voucher_micros)
    from_cash = min(amount_micros - from_voucher, cash_micros)
    return from_voucher, from_cash


def format_usd(micros: int) -> str:
    """For people only: exact, with as many decimals as needed beyond the cent."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    digits = f"{frac:06d}".rstrip("0")
    digits = digits.ljust(2, "0")
    return f"{sign}{whole:,}.{digits}"
