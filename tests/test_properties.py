"""Property tests: the real engine, in process, against a small reference model.

Each example opens a fresh ledger, drives the engine through the single writer exactly as the
server does (``writer.call`` + ``unwrap``), and compares every answer with :class:`Ref`, a few
dozen lines that restate R6-R10 directly: plans as dicts, allocation by sorting on (expires_at,
purchase order), pay-as-you-go for the rest. After the run the derived tables are read back
with plain SQL and checked again.

Every test with a ledger runs on both backends (issue 11) through the module-scoped
``module_db`` fixture (hypothesis refuses function-scoped ones): each example gets a new SQLite
file in a temporary directory, or the module's PostgreSQL database emptied
(tests/settlement_live.py: :func:`fresh_db`, :class:`Reader`).
"""

from __future__ import annotations

import calendar
import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger import calendar as cal
from ledger.engine import ConsumeOutcome
from ledger.errors import AlreadyExists
from ledger.model import (
    QUANTITY_MAX,
    AdvanceClock,
    Architecture,
    CaptchaType,
    Consume,
    CreateAccount,
    FundsKind,
    PurchasePlan,
    Step,
    TopUp,
)
from ledger.money import Region
from ledger.store import consume_entries
from ledger.writer import Batch, unwrap

from . import settlement_live
from . import strategies as lst
from .settlement_live import fresh_db

ACCOUNT = "acme"
CASH_MICROS = 10**14  # enough for any number of plans a short run can buy
PRICE_MICROS = {Region.CHINESE_MAINLAND: 700, Region.OUTSIDE_CHINESE_MAINLAND: 1_000}  # R10
US_PER_HOUR = lst.US_PER_HOUR
_NAIVE_EPOCH = datetime(1970, 1, 1)
_LOCAL_OFFSET_US = 8 * US_PER_HOUR  # UTC+08:00, no daylight saving (R1)

# Bounded so the file runs in well under a minute; raise it to hunt: LEDGER_EXAMPLES=1000.
EXAMPLES = int(os.environ.get("LEDGER_EXAMPLES", "50"))
RUN = settings(max_examples=EXAMPLES, deadline=None,
               suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------- reference model


def ref_local(t_us: int) -> datetime:
    """The UTC+8 wall clock at t, as a naive datetime."""
    return _NAIVE_EPOCH + timedelta(microseconds=t_us + _LOCAL_OFFSET_US)


def ref_billing_day(t_us: int) -> str:
    return ref_local(t_us).date().isoformat()


def ref_add_months(t_us: int, months: int) -> int:
    """R6: same local wall time `months` later; a missing day becomes the month's last."""
    local = ref_local(t_us)
    years, month0 = divmod(local.month - 1 + months, 12)
    year, month = local.year + years, month0 + 1
    wall = local.replace(year=year, month=month,
                         day=min(local.day, calendar.monthrange(year, month)[1]))
    return (wall - _NAIVE_EPOCH) // timedelta(microseconds=1) - _LOCAL_OFFSET_US


@dataclass
class Ref:
    """Plans as dicts; time moves only forward; expiry forfeits what is left (R9)."""

    now: int
    plans: list[dict[str, Any]] = field(default_factory=list)  # in purchase order
    forfeits: list[tuple[str, int, int]] = field(default_factory=list)  # (plan, units, at)

    def purchase(self, plan_id: str, spec_id: str) -> dict[str, Any]:
        units, validity = lst.SPEC_UNITS_VALIDITY[spec_id]
        plan = {"id": plan_id, "total": units, "left": units, "forfeited": 0,
                "bought": self.now, "expires": ref_add_months(self.now, validity.months),
                "order": len(self.plans)}
        self.plans.append(plan)
        return plan

    def advance(self, to_us: int) -> None:
        due = [p for p in self.plans if p["expires"] <= to_us and p["left"] > 0]
        for p in sorted(due, key=lambda p: (p["expires"], p["order"])):
            self.forfeits.append((p["id"], p["left"], p["expires"]))
            p["forfeited"], p["left"] = p["left"], 0
        self.now = to_us

    def valid(self) -> list[dict[str, Any]]:
        return sorted((p for p in self.plans
                       if p["bought"] <= self.now < p["expires"] and p["left"] > 0),
                      key=lambda p: (p["expires"], p["order"]))

    def consume(self, quantity: int) -> tuple[list[tuple[str, int]], int]:
        """R8 then R10: (allocations in order, pay-as-you-go units)."""
        takes, left = [], quantity
        for p in self.valid():
            if left == 0:
                break
            n = min(left, p["left"])
            p["left"] -= n
            left -= n
            takes.append((p["id"], n))
        return takes, left

    def units_left(self) -> int:
        return sum(p["left"] for p in self.valid())


# ---------------------------------------------------------------------------- the real ledger


class Live(settlement_live.Live):
    """The settlement tests' live ledger, read back the way these properties compare it."""

    def consume_entries(self) -> list[tuple]:
        with self.reads.connection() as conn:
            return list(consume_entries(conn))

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a replay must leave alone (``max(seq)``: one node, one chain)."""
        return (self.query("SELECT count(*), max(seq) FROM journal"),
                self.query("SELECT * FROM plans ORDER BY plan_id"),
                self.query("SELECT * FROM usage_daily ORDER BY 1, 2, 3"),
                self.query("SELECT * FROM offsets_daily ORDER BY 1, 2, 3"),
                self.query("SELECT * FROM accounts"))


@contextmanager
def ledger_at(backend_db: str, start_us: int) -> Iterator[Live]:
    """A fresh ledger per hypothesis example on ``backend_db``'s backend (pytest's tmp_path
    is per test, not example): a new SQLite file, or the PostgreSQL database emptied."""
    with fresh_db(backend_db) as db:
        live = Live(db, start_us)
        try:
            live.call(CreateAccount(ACCOUNT))
            live.call(TopUp(ACCOUNT, "funds", FundsKind.CASH, CASH_MICROS))
            yield live
        finally:
            live.close()


def consume_cmd(use: lst.Use, request_id: str) -> Consume:
    return Consume(ACCOUNT, request_id, use.region, use.captcha_type, use.architecture,
                   use.step, quantity=use.quantity)


@dataclass
class Run:
    """What a driven sequence produced, next to what the reference expected."""

    consumes: list[tuple[Consume, ConsumeOutcome, list[tuple[str, int]], int, int]] = field(
        default_factory=list)  # (command, outcome, expected allocations, payg, units left)
    purchases: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    replays: list[dict[str, Any]] = field(default_factory=list)
    dry_runs: list[tuple[ConsumeOutcome, int]] = field(default_factory=list)  # (answer, index)


def drive(live: Live, ref: Ref, ops: list[object], *, dry_run: bool = False) -> Run:
    """Run ``ops`` on both the ledger and the reference; record, do not judge."""
    run = Run()
    for i, op in enumerate(ops):
        if isinstance(op, lst.Purchase):
            # A copy: the engine hands back its live object, which later consumes change.
            plan = dataclasses.replace(live.call(PurchasePlan(ACCOUNT, f"p-{i}", op.spec_id)))
            run.purchases.append((plan, ref.purchase(plan.plan_id, op.spec_id)))
        elif isinstance(op, lst.Use):
            cmd = consume_cmd(op, f"c-{i}")
            if dry_run:  # ask first what would happen, under another key
                dry = dataclasses.replace(cmd, request_id=f"dry-{i}", dry_run=True)
                run.dry_runs.append((live.call(dry), len(run.consumes)))
            out = live.call(cmd)
            takes, payg = ref.consume(op.quantity) if cmd.billable else ([], 0)
            run.consumes.append((cmd, out, takes, payg, ref.units_left()))
        elif isinstance(op, lst.Advance):
            to_us = live.clock.now_us() + op.delta_us
            assert live.call(AdvanceClock(to_us)) == to_us
            ref.advance(to_us)
        elif isinstance(op, lst.Replay):
            run.replays.extend(_replay(live, run, op.pick))
        elif isinstance(op, lst.Restart):
            live.restart()
            assert live.clock.now_us() == ref.now, "the clock survives a restart"
    return run


def as_replay(out: ConsumeOutcome) -> ConsumeOutcome:
    """The first answer as a replay must return it: identical but for ``replayed``."""
    if dataclasses.is_dataclass(out):
        return dataclasses.replace(out, replayed=True)
    return out._replace(replayed=True)


def _replay(live: Live, run: Run, pick: int) -> list[dict[str, Any]]:
    earlier = [(cmd, out) for cmd, out, *_ in run.consumes if out.billable]
    if not earlier:
        return []
    cmd, first = earlier[pick % len(earlier)]
    before = live.snapshot()
    again = live.call(cmd)
    after_replay = live.snapshot()
    other = dataclasses.replace(cmd, quantity=cmd.quantity % QUANTITY_MAX + 1)
    try:
        live.call(other)
        refused: BaseException | None = None
    except AlreadyExists as exc:
        refused = exc
    return [{"first": first, "again": again, "before": before, "after_replay": after_replay,
             "refused": refused, "after_refusal": live.snapshot()}]


# ---------------------------------------------------------------------------- R6


@RUN
@given(t_us=lst.start_instants(), months=st.sampled_from([1, 12]) | st.integers(1, 36))
def test_r6_add_months_matches_reference(t_us, months):
    """add_months equals the reference wall-clock computation for any instant and months."""
    assert cal.add_months(t_us, months) == ref_add_months(t_us, months)
    assert cal.billing_day(t_us) == ref_billing_day(t_us)


# ---------------------------------------------------------------------------- R8


@RUN
@given(start_us=lst.start_instants(), ops=lst.operations(restart=True))
def test_r8_allocations_match_reference(module_db, start_us, ops):
    """Every consume's allocations, in order, and its payg figures equal the reference's."""
    with ledger_at(module_db, start_us) as live:
        ref = Ref(now=live.clock.now_us())
        run = drive(live, ref, ops)
    for plan, expected in run.purchases:
        assert (plan.purchased_at, plan.expires_at) == (expected["bought"], expected["expires"])
        assert plan.units_total == plan.units_remaining == expected["total"]
    for cmd, out, takes, payg, units_left in run.consumes:
        assert out.billable is cmd.billable
        assert [tuple(a) for a in out.allocations] == takes
        assert out.payg_units == payg
        assert out.payg_amount_micros == payg * PRICE_MICROS[cmd.region]
        assert out.billing_day == ref_billing_day(out.recorded_at_us)
        assert out.replayed is False
        assert out.plan_units_remaining == units_left


@RUN
@given(start_us=lst.start_instants(), ops=lst.operations())
def test_r8_dry_run_predicts_and_changes_nothing(module_db, start_us, ops):
    """A dry run answers exactly what the real request then does, and writes nothing."""
    with ledger_at(module_db, start_us) as live:
        ref = Ref(now=live.clock.now_us())
        run = drive(live, ref, ops, dry_run=True)
        dry_keys = live.query("SELECT count(*) FROM journal WHERE request_id LIKE 'dry-%'")
    assert dry_keys == [(0,)]
    for dry, index in run.dry_runs:
        real = run.consumes[index][1]
        assert (dry.billable, dry.allocations, dry.payg_units, dry.payg_amount_micros,
                dry.billing_day, dry.recorded_at_us, dry.plan_units_remaining, dry.replayed) == (
            real.billable, real.allocations, real.payg_units, real.payg_amount_micros,
            real.billing_day, real.recorded_at_us, real.plan_units_remaining, False)


@RUN
@given(start_us=lst.start_instants(),
       specs=st.lists(lst.plan_spec_ids, min_size=2, max_size=5),
       quantity=st.integers(1, QUANTITY_MAX))
def test_r8_same_instant_purchases_drain_in_purchase_order(module_db, start_us, specs, quantity):
    """Plans bought at one instant: shorter validity first, equal expiry by purchase order."""
    with ledger_at(module_db, start_us) as live:
        plans = [live.call(PurchasePlan(ACCOUNT, f"p-{i}", s)) for i, s in enumerate(specs)]
        out = live.call(consume_cmd(
            lst.Use(quantity, Region.OUTSIDE_CHINESE_MAINLAND, Architecture.V3,
                    CaptchaType.INVISIBLE, Step.STEP_4_1), "c"))
    order = sorted(plans, key=lambda p: (p.validity.months, p.purchase_seq))
    expected, left = [], quantity
    for p in order:
        if left == 0:
            break
        expected.append((p.plan_id, min(left, p.units_total)))
        left -= expected[-1][1]
    assert [tuple(a) for a in out.allocations] == expected
    assert out.payg_units == left


# ---------------------------------------------------------------------------- R8/R10/R11


@RUN
@given(start_us=lst.start_instants(), ops=lst.operations(replay=True, restart=True, max_size=16))
def test_r11_units_are_conserved(module_db, start_us, ops):
    """Plan units taken + payg units == billable quantity, in replies and in the tables."""
    with ledger_at(module_db, start_us) as live:
        ref = Ref(now=live.clock.now_us())
        run = drive(live, ref, ops)
        plans = live.query("SELECT plan_id, units_total, units_remaining, units_forfeited"
                           " FROM plans ORDER BY plan_id")
        offsets = live.query("SELECT day, plan_id, units FROM offsets_daily")
        usage = live.query("SELECT day, region, payg_units, payg_micros FROM usage_daily")
        journal_qty = sum(e[4]["qty"] for e in live.consume_entries())
    billable = sum(cmd.quantity for cmd, out, *_ in run.consumes if out.billable)
    taken = sum(n for _, out, *_ in run.consumes for _, n in out.allocations)
    payg = sum(out.payg_units for _, out, *_ in run.consumes)
    assert taken + payg == billable
    assert journal_qty == billable
    # The tables, read back: per (day, plan) offsets and per (day, region) payg as replied.
    want_offsets: Counter[tuple[str, str]] = Counter()
    want_usage: Counter[tuple[str, int]] = Counter()
    want_micros: Counter[tuple[str, int]] = Counter()
    for cmd, out, *_ in run.consumes:
        for plan_id, n in out.allocations:
            want_offsets[(out.billing_day, plan_id)] += n
        if out.payg_units:
            want_usage[(out.billing_day, int(cmd.region))] += out.payg_units
            want_micros[(out.billing_day, int(cmd.region))] += out.payg_amount_micros
    assert {(d, p): n for d, p, n in offsets} == dict(want_offsets)
    assert {(d, r): n for d, r, n, _ in usage} == dict(want_usage)
    assert {(d, r): m for d, r, _, m in usage} == dict(want_micros)
    assert sum(n for *_, n in offsets) + sum(n for _, _, n, _ in usage) == billable
    consumed = Counter()
    for _, plan_id, n in offsets:
        consumed[plan_id] += n
    ref_plans = {p["id"]: p for p in ref.plans}
    assert {p[0] for p in plans} == set(ref_plans)
    for plan_id, total, remaining, forfeited in plans:
        assert remaining >= 0 and forfeited >= 0
        assert total == consumed[plan_id] + remaining + forfeited
        assert (remaining, forfeited) == (ref_plans[plan_id]["left"],
                                          ref_plans[plan_id]["forfeited"])


# ---------------------------------------------------------------------------- R12


@RUN
@given(start_us=lst.start_instants(), ops=lst.operations(replay=True, restart=True, max_size=16))
def test_r12_replay_returns_the_first_result_and_changes_nothing(module_db, start_us, ops):
    """A retry with the same key and content is a replay; other content is refused."""
    with ledger_at(module_db, start_us) as live:
        ref = Ref(now=live.clock.now_us())
        run = drive(live, ref, ops)
    for r in run.replays:
        first, again = r["first"], r["again"]
        assert again.replayed is True
        assert again == as_replay(first)  # every field, in full
        assert r["after_replay"] == r["before"]
        assert isinstance(r["refused"], AlreadyExists)
        assert r["refused"].reason == "IDEMPOTENCY_KEY_REUSED"
        assert r["after_refusal"] == r["before"]
    # Replays did not disturb the reference comparison either.
    for _, out, takes, payg, _ in run.consumes:
        assert ([tuple(a) for a in out.allocations], out.payg_units) == (takes, payg)


@RUN
@given(start_us=lst.start_instants(), use=lst.uses(billable_only=True),
       spec=st.none() | lst.plan_spec_ids)
def test_r12_replay_within_one_commit_group(module_db, start_us, use, spec):
    """A retry queued in the same group as the original is still a replay of it."""
    with ledger_at(module_db, start_us) as live:
        if spec is not None:
            live.call(PurchasePlan(ACCOUNT, "p", spec))
        cmd = consume_cmd(use, "c")
        other = dataclasses.replace(cmd, quantity=cmd.quantity % QUANTITY_MAX + 1)
        first, again, changed = live.writer.call(Batch([cmd, cmd, other]))
        count = len(live.consume_entries())
    first, again = unwrap(first), unwrap(again)
    assert first.replayed is False
    assert again == as_replay(first)
    with pytest.raises(AlreadyExists) as exc:
        unwrap(changed)
    assert exc.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert count == 1


# ---------------------------------------------------------------------------- R9


@RUN
@given(start_us=lst.start_instants(), ops=lst.operations(restart=True))
def test_r9_forfeits_match_reference(module_db, start_us, ops):
    """Each expiry with units left is one plan_expired entry at expires_at with those units."""
    with ledger_at(module_db, start_us) as live:
        ref = Ref(now=live.clock.now_us())
        # A final month and a bit: every one-month plan expires with what it has left (not a
        # year: each day passed is also a daily settlement, and the run must stay short).
        drive(live, ref, [*ops, lst.Advance(32 * lst.US_PER_DAY)])
        entries = live.query("SELECT at_us, payload FROM journal WHERE kind = 'plan_expired'"
                             " ORDER BY seq")
    got = [(json.loads(p)["plan_id"], json.loads(p)["units_forfeited"], at) for at, p in entries]
    assert got == ref.forfeits
    assert all(json.loads(p)["expires_at_us"] == at for at, p in entries)


@RUN
@given(start_us=lst.start_instants(), used=st.integers(0, 99_999),
       backup=st.none() | st.sampled_from(["year-1m", "month-1m"]),
       late_us=st.integers(0, 3 * lst.US_PER_DAY), quantity=st.integers(1, QUANTITY_MAX))
def test_r9_expiry_forfeits_and_later_consumes_go_elsewhere(module_db, start_us, used, backup,
                                                             late_us, quantity):
    """Past expiry a plan's units are forfeited (journaled) and never offset again."""
    use = lst.Use(1, Region.CHINESE_MAINLAND, Architecture.V2, CaptchaType.SLIDER, Step.STEP_3)
    with ledger_at(module_db, start_us) as live:
        live.call(AdvanceClock(start_us + 1))
        plan = live.call(PurchasePlan(ACCOUNT, "p", "month-100k"))
        live.call(AdvanceClock(start_us + 2))  # a backup bought later expires later
        backup_plan = None if backup is None else live.call(PurchasePlan(ACCOUNT, "b", backup))
        if used:
            live.call(consume_cmd(dataclasses.replace(use, quantity=used), "c-used"))
        live.call(AdvanceClock(plan.expires_at - 1))
        last = live.call(consume_cmd(use, "c-last"))
        live.call(AdvanceClock(plan.expires_at + late_us))
        after = live.call(consume_cmd(dataclasses.replace(use, quantity=quantity), "c-after"))
        expired = live.query("SELECT at_us, payload FROM journal WHERE kind = 'plan_expired'")
        row = live.query("SELECT units_remaining, units_forfeited FROM plans WHERE plan_id = ?",
                         (plan.plan_id,))[0]
    # One microsecond before its expiry the plan still pays, and pays first.
    assert [tuple(a) for a in last.allocations] == [(plan.plan_id, 1)]
    left = 100_000 - used - 1
    mine = [(at, json.loads(p)) for at, p in expired if json.loads(p)["plan_id"] == plan.plan_id]
    if left:
        assert len(mine) == 1
        at, payload = mine[0]
        assert at == plan.expires_at and payload["units_forfeited"] == left
    else:  # nothing left, nothing to forfeit
        assert mine == []
    assert row == (0, left)
    now = plan.expires_at + late_us
    if backup_plan is not None and backup_plan.expires_at > now:
        take = min(quantity, backup_plan.units_total)
        assert [tuple(a) for a in after.allocations] == [(backup_plan.plan_id, take)]
        assert after.payg_units == quantity - take
    else:
        assert after.allocations == () and after.payg_units == quantity


def test_r9_one_year_plan_expires_at_the_clamped_instant(module_db):
    """A year plan bought 29 Feb 2028 10:00 local pays until 28 Feb 2029 10:00 local, then
    forfeits what is left at exactly that instant."""
    bought = (datetime(2028, 2, 29, 2) - _NAIVE_EPOCH) // timedelta(microseconds=1)
    expires = (datetime(2029, 2, 28, 2) - _NAIVE_EPOCH) // timedelta(microseconds=1)
    use = lst.Use(10, Region.OUTSIDE_CHINESE_MAINLAND, Architecture.V3, CaptchaType.PUZZLE,
                  Step.STEP_3)
    with ledger_at(module_db, bought) as live:
        plan = live.call(PurchasePlan(ACCOUNT, "p", "year-1m"))
        live.call(AdvanceClock(expires - 1))
        before = live.call(consume_cmd(use, "c-before"))
        live.call(AdvanceClock(expires))
        after = live.call(consume_cmd(use, "c-after"))
        expired = live.query("SELECT at_us, payload FROM journal WHERE kind = 'plan_expired'")
    assert plan.expires_at == expires
    assert before.allocations == ((plan.plan_id, 10),) and before.payg_units == 0
    assert after.allocations == () and after.payg_units == 10
    assert after.payg_amount_micros == 10_000
    assert [(at, json.loads(p)["units_forfeited"]) for at, p in expired] == [
        (expires, 1_000_000 - 10)]
