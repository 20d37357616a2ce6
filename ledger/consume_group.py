"""The consume group: a batch of Consume requests run through the engine as a whole (issue 19).

The hot path of R3-R12 in one function over plain values: requests come in as tuples
(:data:`ROW_FIELDS`, validated by the front from tables), outcomes go out as columns
(:class:`GroupResult`), and nothing is built per request but the journal item the block
must hold. Each request is still decided alone and in order, exactly as one ``Consume``
would be (a refused request changes nothing; R8 allocation; R10 pay-as-you-go; R12 keys,
also within the group), so a single ``Consume`` is a group of one (:meth:`Engine.consume`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .account_commands import suspended
from .errors import LedgerError, key_reused
from .model import _BILLABLE, AccountStatus, Consume, PlanState, consume_fingerprint
from .money import PAYG_UNIT_PRICE_MICROS
from .store.blocks import prior_of_item

if TYPE_CHECKING:
    from .engine import Engine

# A request as the front hands it over: plain values, already checked (server/convert.py).
ROW_FIELDS = ("account_id", "request_id", "region", "captcha_type", "architecture", "step",
              "scenario_id", "quantity", "dry_run", "client_observed_us")
_SUSPENDED = AccountStatus.SUSPENDED


def row_of(c: Consume) -> tuple:
    """A ``Consume`` command as the row a consume group takes."""
    return (c.account_id, c.request_id, int(c.region), int(c.captcha_type),
            int(c.architecture), int(c.step), c.scenario_id, c.quantity, c.dry_run,
            c.client_timestamp_us)


class ConsumeRows(list):
    """A batch of request tuples submitted to the writer as one item; answered with a
    :class:`GroupResult`."""


class GroupResult:
    """A consume group's outcomes as columns, index for index with its requests.

    ``errors`` holds the refused requests (their columns keep defaults); ``replays`` the
    instant and billing day a replayed request was first recorded at (R12), every other
    request was recorded at ``at_us`` on ``day``."""

    __slots__ = ("at_us", "day", "billable", "replayed", "allocations", "payg_units",
                 "payg_micros", "remaining", "seq", "errors", "replays")

    def __init__(self, n: int, at_us: int = 0, day: str = "") -> None:
        self.at_us, self.day = at_us, day
        self.billable = [False] * n
        self.replayed = [False] * n
        self.allocations: list[tuple[tuple[str, int], ...]] = [()] * n
        self.payg_units = [0] * n
        self.payg_micros = [0] * n
        self.remaining = [0] * n
        self.seq = [0] * n
        self.errors: dict[int, LedgerError] = {}
        self.replays: dict[int, tuple[int, str]] = {}

    @classmethod
    def failed(cls, n: int, exc: LedgerError) -> GroupResult:
        """Every request refused with the same error (the group's commit failed)."""
        result = cls(n)
        result.errors = dict.fromkeys(range(n), exc)
        return result

    def __len__(self) -> int:
        return len(self.seq)


def run_group(engine: Engine, rows: list[tuple]) -> GroupResult:  # noqa: C901, PLR0912, PLR0915
    """Decide and apply every request of the group, in order, inside the open UnitOfWork."""
    now = engine.now()
    day = engine._billing_day(now)
    out = GroupResult(len(rows), now, day)
    billable_c, replayed_c, allocs_c = out.billable, out.replayed, out.allocations
    units_c, micros_c, remaining_c, seq_c = out.payg_units, out.payg_micros, out.remaining, out.seq
    errors = out.errors
    uow = engine._uow
    accounts = engine.accounts
    held = engine._held if engine.shared else None
    consumed, looked_up, found = uow.consumed, engine._looked_up, engine._found
    plans_changed, offsets, usage = uow.plans, uow.offsets, uow.usage
    block_seq = 0
    items: list[list[Any]] = []
    remaining_of: dict[str, int] = {}
    # The units each plan held when this group first took from it: the day's offsets and
    # the changed plans are folded into the UnitOfWork once per plan, after the loop (only
    # this loop changes a plan's units within it).
    first_units: dict[str, tuple[PlanState, int]] = {}
    for i, (account_id, request_id, region, ctype, arch, step, scenario, qty, dry,
            observed) in enumerate(rows):
        acct = accounts.get(account_id) if held is None or account_id in held else None
        if acct is None:
            try:
                acct = engine.account(account_id)  # loads it, or refuses (NotFound)
            except LedgerError as exc:
                errors[i] = exc
                continue
        key = (account_id, request_id)
        hit = consumed.get(key)
        if hit is not None:  # claimed earlier in this very group: not yet in the database
            prior: Any = prior_of_item(hit[0], hit[2], hit[3], hit[4])
        elif key in looked_up:
            prior = found.get(key) if found else None
        else:
            prior = engine.store.find_consume_keys([key]).get(key)
        if prior is not None:  # R12: only a billable request claims a key
            if prior.fingerprint != consume_fingerprint(region, ctype, arch, step, scenario,
                                                        qty):
                errors[i] = key_reused("consume", request_id)
                continue
            billable_c[i] = replayed_c[i] = True
            allocs_c[i], units_c[i], micros_c[i] = (prior.allocations, prior.payg_units,
                                                    prior.payg_micros)
            remaining_c[i], seq_c[i] = prior.remaining, prior.seq
            out.replays[i] = (prior.at_us, prior.day)
            continue
        if acct.status is _SUSPENDED:  # R23 (a non-billable request too)
            errors[i] = suspended(account_id)
            continue
        # The units the account's plans can offset now: summed once per account and group,
        # then kept up to date here (only this loop changes them within the group).
        remaining = remaining_of.get(account_id)
        if remaining is None:
            remaining = remaining_of[account_id] = acct.units_remaining_at(now)
        if (arch, ctype, step) not in _BILLABLE:  # R3: acknowledged, nothing charged, no key
            remaining_c[i] = remaining
            continue
        billable_c[i] = True
        # R8: the account's plans are kept in R8 order; take from each that can offset now.
        # The common case first: the first plan can offset now and pays the whole quantity.
        plans = acct.live_plans
        plan = plans[0] if plans else None
        if (plan is not None and plan.units_remaining >= qty and plan.refunded_at is None
                and plan.purchased_at <= now < plan.expires_at):
            left = payg_micros = 0
            allocations: tuple = ((plan.plan_id, qty),)
            allocs_c[i] = allocations
            remaining -= qty
            if dry:
                remaining_c[i] = remaining
                continue
            remaining_of[account_id] = remaining_c[i] = remaining
            if plan.plan_id not in first_units:
                first_units[plan.plan_id] = (plan, plan.units_remaining)
            plan.units_remaining -= qty
            if not plan.units_remaining:  # R8 order: an emptied plan leaves the live list
                acct.live_plans = [p for p in plans if p.units_remaining > 0]
        else:
            takes = []
            left = qty
            for plan in plans:
                if (plan.refunded_at is None and plan.units_remaining > 0
                        and plan.purchased_at <= now < plan.expires_at):
                    units = plan.units_remaining
                    if left <= units:
                        takes.append((plan, left))
                        left = 0
                        break
                    takes.append((plan, units))
                    left -= units
            payg_micros = PAYG_UNIT_PRICE_MICROS[region] * left  # R10
            allocations = (((takes[0][0].plan_id, takes[0][1]),) if len(takes) == 1
                           else tuple([(p.plan_id, n) for p, n in takes]))
            allocs_c[i], units_c[i], micros_c[i] = allocations, left, payg_micros
            remaining -= qty - left
            if dry:
                remaining_c[i] = remaining
                continue
            remaining_of[account_id] = remaining_c[i] = remaining
            for plan, n in takes:
                assert 0 < n <= plan.units_remaining, "no plan goes below zero (R11)"
                if plan.plan_id not in first_units:
                    first_units[plan.plan_id] = (plan, plan.units_remaining)
                plan.units_remaining -= n
            if left:
                acc = usage.get((account_id, day, region))
                if acc is None:
                    usage[(account_id, day, region)] = [left, payg_micros]
                else:
                    acc[0] += left
                    acc[1] += payg_micros
            if takes and takes[0][0].units_remaining == 0:  # R8 order: emptied plans go
                acct.live_plans = [p for p in plans if p.units_remaining > 0]
        if not block_seq:
            block_seq = uow.open_block(now, day)
            items = uow.block_items
        # The item holds the allocations' tuple itself: MessagePack writes a tuple as the
        # same array as a list, so the block's bytes do not change.
        item = [account_id, request_id, region, ctype, arch, step, scenario, qty, observed,
                allocations, left, payg_micros, remaining]
        consumed[key] = (block_seq, len(items), now, day, item)
        items.append(item)
        seq_c[i] = block_seq
    for plan_id, (plan, units) in first_units.items():
        plans_changed[plan_id] = plan
        okey = (plan.account_id, day, plan_id)
        offsets[okey] = offsets.get(okey, 0) + units - plan.units_remaining
    return out
