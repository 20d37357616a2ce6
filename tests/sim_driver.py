"""The simulation's driver: one server, one reference model, one step at a time.

Each step (tests/sim_ops.py) goes through :class:`LedgerClient` to a real ``--test-clock``
server and to :class:`RefLedger` (tests/sim_model.py). Every answer is compared (success, or
gRPC code and ``ErrorInfo`` reason; a Consume's billable, allocations, pay-as-you-go, replayed,
day, instant, remaining units and, for a replay, the first journal_seq). After every step every
account's figures are compared (GetAccount, GetRemaining, ListPlans with inactive plans); after
settlements and restarts also every bill (ListBills, GetBill), the daily usage (GetUsage) and the
clock. After a seed's run the journal must pass ``ledger.verify`` (R25: a rebuild from the
journal gives every figure).

A failure raises ``AssertionError("simulation diverged: seed=S step=N ...")`` with the last steps
and the command that replays it (see tests/test_simulation.py).
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from clients.client import LedgerClient
from ledger.verify import verify

from .conftest import ServerProcess
from .sim_compare import (
    Mismatch,
    account_view,
    bill_view,
    consume_view,
    expect,
    expect_outcome,
    on_model,
    on_server,
    plan_view,
    remaining_view,
    summary,
)
from .sim_model import BillTuple, MPlan, RefLedger
from .sim_ops import (
    Advance,
    Batch,
    Consume,
    Create,
    Features,
    Gen,
    Op,
    Purchase,
    Reactivate,
    Refund,
    Restart,
    SetTime,
    Settle,
    TopUp,
    start_instant,
)
from .sim_rules import (
    ADVANCE_MAX_US,
    PAYG_PRICE,
    US_PER_S,
    billing_day,
    days_between,
    shift_day,
    ts,
    us,
)

LOG_STEPS = 12
PLAN_ID = re.compile(r"plan-(\d+)")
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


# ---------------------------------------------------------------------------- the driver


class Sim:
    """One server, one model, one step at a time; every answer and figure compared."""

    def __init__(self, srv: ServerProcess, label: str, start_us: int) -> None:
        self.srv, self.label = srv, label
        if srv.proc is None or srv.proc.poll() is not None:
            srv.start()
        self.client: LedgerClient = srv.client()
        now = us(self.client.get_time().now)
        assert now <= start_us, "simulate() needs a fresh ledger whose clock is before its start"
        while now < start_us:  # the test clock moves at most 3 years per call
            now = us(self.client.set_time(ts(min(start_us, now + ADVANCE_MAX_US))).now)
        self.model = RefLedger(start_us)
        self.log: deque[str] = deque(maxlen=LOG_STEPS)  # the last steps, for a failure
        self.history: list[str] = []  # every step and its answer
        self.last_plan_no = 0
        self.bills_seen = 0

    def close(self) -> None:
        self.client.close()

    def step(self, n: int, op: Op) -> None:
        self.log.append(f"  {n:4d} {op!r}")
        try:
            result = self.execute(op)
            self.check(op)
        except Mismatch as exc:
            raise AssertionError(self.diverged(n, str(exc))) from None
        except Exception as exc:  # an error the model did not expect, a dead server, ...
            raise AssertionError(self.diverged(n, f"{type(exc).__name__}: {exc}")) from exc
        self.log[-1] += f" -> {result}"
        self.history.append(self.log[-1])

    def diverged(self, n: int, what: str) -> str:
        return (f"simulation diverged: {self.label} step={n}: {what}\n"
                f"  model clock {self.model.now} ({billing_day(self.model.now)} UTC+8)\n"
                f"  replay: {replay_hint(self.label, n)}\n"
                f"  last steps (newest last):\n" + "\n".join(self.log))

    # -- one request

    def execute(self, op: Op) -> str:
        m, c = self.model, self.client
        if isinstance(op, Create):
            got = on_server(lambda: account_view(c.create_account(op.acct, op.name)))
            want = on_model(lambda: m.create(op.acct, op.name))
            if expect_outcome("CreateAccount", got, want):
                expect("CreateAccount reply", got[1], want[1])
            return summary(got)
        if isinstance(op, TopUp):
            got = on_server(lambda: account_view(c.top_up(op.acct, op.amount, op.kind, op.rid)))
            want = on_model(lambda: m.top_up(op.acct, op.rid, op.kind, op.amount))
            if expect_outcome("TopUp", got, want):
                expect("TopUp reply", got[1], want[1])
            return summary(got)
        if isinstance(op, Features):
            got = on_server(lambda: account_view(
                c.update_features(op.acct, op.ids, op.custom, op.rid)))
            want = on_model(lambda: m.features(op.acct, op.rid, op.ids, op.custom))
            if expect_outcome("UpdateFeatures", got, want):
                expect("UpdateFeatures reply", got[1], want[1])
            return summary(got)
        if isinstance(op, Reactivate):
            got = on_server(lambda: account_view(c.reactivate(op.acct, op.rid)))
            want = on_model(lambda: m.reactivate(op.acct, op.rid))
            if expect_outcome("Reactivate", got, want):
                expect("Reactivate reply", got[1], want[1])
            return summary(got)
        if isinstance(op, Purchase):
            got = on_server(lambda: plan_view(c.purchase_plan(op.acct, op.spec, op.rid)))
            want = on_model(lambda: m.purchase(op.acct, op.rid, op.spec))
            if expect_outcome("PurchasePlan", got, want):
                plan = want[1]
                if plan.plan_id == "?":
                    self.name_plan(plan, got[1]["plan_id"])
                expect("PurchasePlan reply", got[1], plan.view(m.now))
                return f"OK {plan.plan_id}"
            return summary(got)
        if isinstance(op, Refund):
            got = on_server(lambda: plan_view(c.refund_plan(op.plan_id, op.reason, op.rid)))
            want = on_model(lambda: m.refund(op.plan_id, op.rid))
            if expect_outcome("RefundPlan", got, want):
                expect("RefundPlan reply", got[1], want[1].view(m.now))
            return summary(got)
        if isinstance(op, Consume):
            r = op.req
            got = on_server(lambda: consume_view(c.consume(
                r.acct, region=r.region, captcha_type=r.ctype, architecture=r.arch,
                step=r.step, quantity=r.qty, request_id=r.rid, scenario_id=r.scenario,
                dry_run=r.dry)))
            want = on_model(lambda: m.consume(r))
            if expect_outcome(f"Consume {r!r}", got, want):
                self.expect_consume(f"Consume {r!r}", got[1], want[1])
                return consume_summary(got[1])
            return summary(got)
        if isinstance(op, Batch):
            reqs = [c.consume_request(
                r.acct, region=r.region, captcha_type=r.ctype, architecture=r.arch, step=r.step,
                quantity=r.qty, request_id=r.rid, scenario_id=r.scenario, dry_run=r.dry)
                for r in op.items]
            name = "ConsumeStream" if op.stream else "ConsumeBatch"
            results = (list(c.consume_stream(iter(reqs), timeout_s=30.0)) if op.stream
                       else list(c.consume_batch(reqs).results))
            expect(f"{name} result count", len(results), len(op.items))
            out = []
            for i, (r, res) in enumerate(zip(op.items, results, strict=True)):
                what = f"{name}[{i}] {r!r}"
                expect(f"{what} request_id", res.request_id, r.rid)
                if res.WhichOneof("outcome") == "response":
                    got = ("ok", consume_view(res.response))
                else:
                    got = ("err", CODE_NAMES.get(res.error.code, str(res.error.code)),
                           res.error.reason)
                want = on_model(lambda r=r: m.consume(r))
                if expect_outcome(what, got, want):
                    self.expect_consume(what, got[1], want[1])
                    out.append(consume_summary(got[1]))
                else:
                    out.append(summary(got))
            return "[" + ", ".join(out) + "]"
        if isinstance(op, Settle):
            got = on_server(lambda: [bill_view(b) for b in c.settle_day(op.day).bills])
            want = on_model(lambda: m.settle_day(op.day))
            if expect_outcome(f"SettleDay {op.day}", got, want):
                expect(f"SettleDay {op.day} bills", got[1], want[1])
                return f"OK {len(got[1])} bills"
            return summary(got)
        if isinstance(op, Advance):
            got = on_server(lambda: us(c.advance_time(op.seconds).now))
            want = on_model(lambda: m.set_time(m.now + op.seconds * US_PER_S)
                            if op.seconds >= 0 else m.set_time(-1))
            if expect_outcome("AdvanceTime", got, want):
                expect("AdvanceTime now", got[1], want[1])
            return summary(got)
        if isinstance(op, SetTime):
            got = on_server(lambda: us(c.set_time(ts(op.to_us)).now))
            want = on_model(lambda: m.set_time(op.to_us))
            if expect_outcome("SetTime", got, want):
                expect("SetTime now", got[1], want[1])
            return summary(got)
        if isinstance(op, Restart):
            self.client.close()
            if op.crash:
                self.srv.kill()
            else:
                rc = self.srv.stop()
                expect("graceful stop exit code", rc, 0)
            self.srv.start()
            self.client = self.srv.client()
            expect("clock after the restart", us(self.client.get_time().now), m.now)
            return "OK"
        raise AssertionError(f"unknown op {op!r}")

    def name_plan(self, plan: MPlan, plan_id: str) -> None:
        """The model cannot know journal numbers: take the id, check its form and order."""
        found = PLAN_ID.fullmatch(plan_id)
        if found is None or int(found.group(1)) <= self.last_plan_no:
            raise Mismatch(f"plan id {plan_id!r} is not plan-<n> with n growing in purchase "
                           f"order (last plan-{self.last_plan_no})")
        self.last_plan_no = int(found.group(1))
        plan.plan_id = plan_id

    def expect_consume(self, what: str, got: dict[str, Any], want: dict[str, Any]) -> None:
        if want["journal_seq"] is None:  # fresh and applied: a new journal entry
            if got["journal_seq"] <= 0:
                raise Mismatch(f"{what}: journal_seq {got['journal_seq']} for an applied request")
            want["journal_seq"] = got["journal_seq"]  # a replay must answer the same (R12)
        expect(what, got, want)

    # -- every figure

    def check(self, op: Op) -> None:
        m, c = self.model, self.client
        for account_id in sorted(m.accounts):
            a = m.accounts[account_id]
            expect(f"GetAccount {account_id}", account_view(c.get_account(account_id)),
                   a.view())
            expect(f"GetRemaining {account_id}", remaining_view(c.get_remaining(account_id)),
                   m.remaining(account_id))
            expect(f"ListPlans {account_id} (all)",
                   [plan_view(p) for p in c.list_plans(account_id, True).plans],
                   [p.view(m.now) for p in m.plans_of(account_id)])
        if isinstance(op, Advance | SetTime | Restart):
            expect("GetTime", us(c.get_time().now), m.now)
        if len(m.settled) != self.bills_seen or isinstance(op, Settle | Restart):
            self.check_bills()
            self.bills_seen = len(m.settled)

    def check_bills(self) -> None:
        m, c = self.model, self.client
        if not m.settled:
            return
        first, last = m.first_day, m.settled[-1]
        assert first is not None
        fresh = set(m.settled[self.bills_seen:])
        for account_id in sorted(m.accounts):
            got: list[BillTuple] = []
            lo = first
            while lo <= last:  # a range is at most 366 days
                hi = min(shift_day(lo, 365), last)
                got += [bill_view(b) for b in c.list_bills(account_id, lo, hi).bills]
                lo = shift_day(hi, 1)
            want = [b for d in m.settled for b in m.bills[d] if b[0] == account_id]
            expect(f"ListBills {account_id} {first}..{last}", got, want)
            for b in want:
                if b[1] in fresh:
                    expect(f"GetBill {account_id} {b[1]}",
                           bill_view(c.get_bill(account_id, b[1])), b)
            if not any(b[1] == last for b in want):  # R18: no activity, no bill
                o = on_server(lambda a=account_id: c.get_bill(a, last))
                expect(f"GetBill {account_id} {last} (no bill)", o[1:],
                       ("NOT_FOUND", "BILL_NOT_FOUND"))
            self.check_usage(account_id, first, m.day())

    def check_usage(self, account_id: str, first: str, today: str) -> None:
        """GetUsage: each day's pay-as-you-go per region and units per plan (R10, R8)."""
        a = self.model.accounts[account_id]
        got, lo = {}, first
        while lo <= today:
            hi = min(shift_day(lo, 365), today)
            days = self.client.get_usage(account_id, lo, hi).days
            expect(f"GetUsage {account_id} {lo}..{hi} days",
                   [d.billing_day for d in days], days_between(lo, hi))
            for d in days:
                if d.payg or d.plan_units:
                    got[d.billing_day] = (
                        sorted((u.region, u.units, u.amount_micros) for u in d.payg),
                        sorted((u.plan_id, u.units) for u in d.plan_units))
            lo = shift_day(hi, 1)
        want = {}
        for day in sorted(set(a.payg) | set(a.offsets)):
            payg = sorted((r, n, n * PAYG_PRICE[r]) for r, n in a.payg.get(day, {}).items() if n)
            offs = sorted(a.offsets.get(day, {}).items())
            if payg or offs:
                want[day] = (payg, offs)
        expect(f"GetUsage {account_id} {first}..{today}", got, want)


def consume_summary(v: dict[str, Any]) -> str:
    if not v["billable"]:
        return "not billable"
    alloc = ",".join(f"{p}:{n}" for p, n in v["allocations"])
    return f"[{alloc}] payg {v['payg_units']}" + (" REPLAY" if v["replayed"] else "")


def replay_hint(label: str, n: int) -> str:
    found = re.fullmatch(r"seed=(-?\d+)", label)
    if found is None:
        return "the ops list of this test"
    return (f"SIM_SEED={found.group(1)} SIM_STEPS={n + 1} .venv/bin/python -m pytest -q "
            "tests/test_simulation.py::test_simulation_seeds")


# ---------------------------------------------------------------------------- entry points


def simulate(seed: int, steps: int, srv: ServerProcess) -> None:
    """Run ``steps`` seeded random steps on ``srv`` (fresh ledger, --test-clock) and on the
    reference model; raise ``AssertionError('simulation diverged: seed=...')`` on a mismatch."""
    simulate_log(seed, steps, srv)


def simulate_log(seed: int, steps: int, srv: ServerProcess) -> list[str]:
    """:func:`simulate`, returning every step with its answer."""
    rng = random.Random(seed)
    if srv.proc is None or srv.proc.poll() is not None:
        srv.start()
    with srv.client() as probe:
        not_before = us(probe.get_time().now)
    sim = Sim(srv, f"seed={seed}", start_instant(rng, not_before))
    gen = Gen(rng)
    try:
        for n in range(steps):
            sim.step(n, gen.next(n, sim.model))
    finally:
        sim.close()
    return sim.history


def run_ops(ops: Sequence[Op], srv: ServerProcess, start_us: int, label: str = "ops"
            ) -> RefLedger:
    """The same checks over a given list of steps (a minimal failing sequence)."""
    sim = Sim(srv, label, start_us)
    try:
        for n, op in enumerate(ops):
            sim.step(n, op)
    finally:
        sim.close()
    return sim.model


def run_seed(tmp: Path, seed: int, steps: int, db: str | None = None) -> None:
    """One seed on a fresh server; then R25: the journal rebuilds every figure. ``db``: a
    fresh ledger (an SQLite path or an empty PostgreSQL database), by default tmp's file."""
    srv = ServerProcess(tmp, db=db).start()
    try:
        simulate(seed, steps, srv)
    finally:
        srv.stop()
    report = verify(str(srv.db))
    if not report.ok:
        raise AssertionError(f"simulation diverged: seed={seed} step={steps}: quota-ledger "
                             f"verify (R25): {report.problems[:5]}")
