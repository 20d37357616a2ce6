"""R8/R10: which plans pay for a request of quantity N, and how much falls to pay-as-you-go.

Pure: takes the plans in any order and returns the decision; the caller applies it. This is
also the function the property tests compare with their reference model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .model import PlanState


class Allocation(NamedTuple):
    takes: list[tuple[PlanState, int]]  # (plan, units taken), in R8 order
    payg_units: int


def consumption_order(plans: Iterable[PlanState], t_us: int) -> list[PlanState]:
    """R8: the plans that can offset at t (R6, R7, R21), earliest expiry then purchase first."""
    return sorted((p for p in plans if p.can_offset_at(t_us)), key=lambda p: p.order_key)


def allocate(plans: Sequence[PlanState], quantity: int, t_us: int) -> Allocation:
    """Split ``quantity`` across plans in R8 order; the rest is pay-as-you-go (R10)."""
    return take_in_order(consumption_order(plans, t_us), quantity, t_us)


def take_in_order(plans_in_order: Iterable[PlanState], quantity: int, t_us: int) -> Allocation:
    """The same for plans already in R8 order (the engine keeps each account's so); plans
    that cannot offset at t are skipped."""
    assert quantity > 0, "quantity is checked before allocation"
    takes: list[tuple[PlanState, int]] = []
    left = quantity
    for plan in plans_in_order:
        if not plan.can_offset_at(t_us):
            continue
        take = left if left < plan.units_remaining else plan.units_remaining
        takes.append((plan, take))
        left -= take
        if left == 0:
            break
    return Allocation(takes, left)
