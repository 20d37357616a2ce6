"""The rules as a sequential model of one account (issue 23), for the history checker.

A state is a plain tuple, hashable, so that the checker can keep sets of them:

    (cash, voucher, live, done, bought, payg_units, payg_micros, applied)

- ``live``: the plans that can still change, in R8 order (expiry, then purchase order), each
  ``(index, rid, remaining, paid_voucher, paid_cash)``; ``index`` is the purchase order;
- ``done``: the plans that never change again (used up, or refunded) as a frozenset of
  ``(index, rid, remaining, refunded, paid_voucher, paid_cash)``: a frozenset keeps its
  hash, so an account that bought hundreds of plans hashes in constant time;
- ``bought``: how many plans were bought;
- ``payg_units``, ``payg_micros``: the day's pay-as-you-go (the test clock never moves);
- ``applied``: the ``request_id`` s applied so far, among those that the checker tracks
  (every id that more than one operation carries, or that an unknown outcome carries).

What the model cannot know from the requests alone it takes from the final state the API
reports: the plans' ids and expiries. Plan ids follow the ledger's purchase order, and an
account's purchases are serialized, so the n-th purchase that the model applies must be
the n-th plan of the final state. A purchase applied beyond them is impossible: it would
have left a plan.

Rules used: R5 (quantity), R3 (a non-billable event changes nothing), R8 (earliest expiry,
then purchase order; a quantity split across plans), R10 (USD 0.0007 mainland, 0.001
outside), R12 (a replay changes nothing; a refusal claims no key), R16 (vouchers, then
cash), R21 (refund only when unused; the price goes back where it came from).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAINLAND = 1  # pb.REGION_CHINESE_MAINLAND
PRICE_MICROS = {1: 700, 2: 1000}  # R10, per region
SPECS = {"h-month-8": (8, 1_000_000), "h-year-12": (12, 1_500_000)}  # run.CATALOG
FAIL = "fail"

State = tuple  # (cash, voucher, live, done, bought, payg_units, payg_micros, applied)
INITIAL: State = (0, 0, (), frozenset(), 0, 0, 0, frozenset())
APPLIED = 7  # where a state keeps its applied request ids


@dataclass(frozen=True)
class FinalPlan:
    plan_id: str
    spec: str
    expires_us: int


class AccountModel:
    def __init__(self, final_plans: list[FinalPlan], tracked: set[str]) -> None:
        self.final_plans = final_plans
        self.tracked = tracked
        self.index = {p.plan_id: i for i, p in enumerate(final_plans)}

    def apply(self, s: State, kind: str, req: dict) -> tuple[Any, State] | None:
        """The outcome of one request in state ``s`` and the state after it; None when the
        request cannot have been applied there (a purchase that left no plan)."""
        return getattr(self, f"_{kind}")(s, req)

    # -- requests -----------------------------------------------------------------------
    def _consume(self, s: State, req: dict) -> tuple[Any, State]:
        cash, voucher, live, done, bought, payg, payg_m, applied = s
        rid = req["rid"]
        if not req["billable"]:  # R3: acknowledged, nothing changes, no key claimed (R12)
            return {"billable": False, "alloc": [], "payg": 0, "payg_micros": 0,
                    "replayed": False}, s
        if rid in applied:
            return {"replayed": True}, s
        need = req["qty"]
        alloc = []
        new_live = []
        used_up = []
        for plan in live:  # R8 order
            i, rid_i, rem, pv, pc = plan
            take = min(rem, need)
            if take:
                alloc.append([self.final_plans[i].plan_id, take])
                need -= take
                if rem == take:
                    used_up.append((i, rid_i, 0, False, pv, pc))
                    continue
                plan = (i, rid_i, rem - take, pv, pc)
            new_live.append(plan)
        cost = need * PRICE_MICROS[req["region"]]
        after = (cash, voucher, tuple(new_live), done.union(used_up) if used_up else done,
                 bought, payg + need, payg_m + cost, self._claim(applied, rid))
        return {"billable": True, "alloc": alloc, "payg": need, "payg_micros": cost,
                "replayed": False, "remaining": sum(p[2] for p in new_live)}, after

    def _purchase(self, s: State, req: dict) -> tuple[Any, State] | None:
        cash, voucher, live, done, bought, payg, payg_m, applied = s
        rid = req["rid"]
        if rid in applied:  # a replay answers the plan as it is now (R12)
            return self._plan(s, rid=rid), s
        units, price = SPECS[req["spec"]]
        if cash + voucher < price:  # R16: refused, nothing changed, no key (R12)
            return (FAIL, "FAILED_PRECONDITION", "INSUFFICIENT_FUNDS"), s
        n = bought
        if n >= len(self.final_plans) or self.final_plans[n].spec != req["spec"]:
            return None
        pv = min(voucher, price)
        pc = price - pv
        key = self._r8
        new_live = tuple(sorted((*live, (n, rid, units, pv, pc)), key=key))
        after = (cash - pc, voucher - pv, new_live, done, n + 1, payg, payg_m,
                 self._claim(applied, rid))
        return self._plan(after, index=n), after

    def _top_up(self, s: State, req: dict) -> tuple[Any, State]:
        cash, voucher, live, done, bought, payg, payg_m, applied = s
        if req["rid"] not in applied:
            if req["kind"] == 1:  # FUNDS_KIND_CASH
                cash += req["amount"]
            else:
                voucher += req["amount"]
        return ({"cash": cash, "voucher": voucher, "outstanding": 0},
                (cash, voucher, live, done, bought, payg, payg_m,
                 self._claim(applied, req["rid"])))

    def _refund(self, s: State, req: dict) -> tuple[Any, State]:
        cash, voucher, live, done, bought, payg, payg_m, applied = s
        i = self.index.get(req["plan_id"])
        if i is None or i >= bought:
            return (FAIL, "NOT_FOUND", "PLAN_NOT_FOUND"), s
        if req["rid"] in applied:
            return self._plan(s, index=i), s
        plan = next((p for p in live if p[0] == i), None)
        if plan is None:
            refunded = next(p[3] for p in done if p[0] == i)
            return (FAIL, "FAILED_PRECONDITION", "PLAN_REFUNDED" if refunded else "PLAN_USED"), s
        _, rid_i, rem, pv, pc = plan
        if rem < SPECS[self.final_plans[i].spec][0]:  # R21: a used plan
            return (FAIL, "FAILED_PRECONDITION", "PLAN_USED"), s
        after = (cash + pc, voucher + pv, tuple(p for p in live if p is not plan),
                 done | {(i, rid_i, rem, True, pv, pc)}, bought, payg, payg_m,
                 self._claim(applied, req["rid"]))
        return self._plan(after, index=i), after

    def _remaining(self, s: State, req: dict) -> tuple[Any, State]:
        live = {self.final_plans[p[0]].plan_id: p[2] for p in s[2]}
        return {"total": sum(live.values()), "payg": s[5], "payg_micros": s[6],
                "plans": live}, s

    # -- helpers ------------------------------------------------------------------------
    def _r8(self, plan: tuple) -> tuple[int, int]:
        return (self.final_plans[plan[0]].expires_us, plan[0])

    def _claim(self, applied: frozenset, rid: str) -> frozenset:
        return applied | {rid} if rid in self.tracked else applied

    def _plan(self, s: State, *, index: int | None = None, rid: str | None = None) -> dict:
        """A plan as PurchasePlan and RefundPlan answer it, found by index or by rid."""
        for p in s[2]:
            if p[0] == index or (rid is not None and p[1] == rid):
                i, _, rem, pv, pc = p
                refunded = False
                break
        else:
            i, _, rem, refunded, pv, pc = next(p for p in s[3] if p[0] == index
                                               or (rid is not None and p[1] == rid))
        return {"plan_id": self.final_plans[i].plan_id, "spec": self.final_plans[i].spec,
                "remaining": rem, "paid_v": pv, "paid_c": pc, "refunded": refunded}


def forget(s: State, rid: str) -> State:
    """``s`` without ``rid``: out of the applied set, and off the plan it bought (a settled
    id, see :mod:`.linearize`: nothing to come carries it)."""
    cash, voucher, live, done, bought, payg, payg_m, applied = s
    live = tuple((p[0], None, *p[2:]) if p[1] == rid else p for p in live)
    if any(p[1] == rid for p in done):
        done = frozenset((p[0], None, *p[2:]) if p[1] == rid else p for p in done)
    return (cash, voucher, live, done, bought, payg, payg_m, applied - {rid})


def plans_of(s: State) -> dict[int, tuple[int, bool]]:
    """Every plan bought, by index: (remaining, refunded)."""
    return {**{p[0]: (p[2], False) for p in s[2]}, **{p[0]: (p[2], p[3]) for p in s[3]}}


def matches(kind: str, recorded: dict, outcome: Any) -> bool:
    """Whether a recorded completion (ok with its answer, or a definite failure) is what
    the model answers."""
    if recorded["e"] == "fail":
        return (isinstance(outcome, tuple) and outcome[1] == recorded["code"]
                and (not recorded.get("reason") or outcome[2] == recorded["reason"]))
    if isinstance(outcome, tuple):
        return False
    ans = recorded["ans"]
    if kind == "consume":
        if outcome.get("replayed"):  # the replay's content: checker.check_replays
            return ans["replayed"]
        if not outcome["billable"]:
            return not ans["billable"] and not ans["replayed"]
        return all(ans[k] == outcome[k] for k in outcome)
    if kind in ("purchase", "refund"):
        refunded = ans["status"] == "PLAN_STATUS_REFUNDED"
        return (all(ans[k] == outcome[k] for k in ("plan_id", "remaining", "paid_v", "paid_c"))
                and refunded == outcome["refunded"])
    return ans == outcome


def final_matches(s: State, final: dict, final_plans: list[FinalPlan]) -> bool:
    """Whether a model state is the final state that the API reported."""
    cash, voucher, _, _, bought, payg, payg_m, _ = s
    if (cash, voucher, payg, payg_m) != (final["cash"], final["voucher"], final["payg"],
                                         final["payg_micros"]):
        return False
    if bought != len(final["plan_list"]):
        return False
    by_id = {p["plan_id"]: p for p in final["plan_list"]}
    for i, (rem, refunded) in plans_of(s).items():
        got = by_id[final_plans[i].plan_id]
        if (got["remaining"], got["status"] == "PLAN_STATUS_REFUNDED") != (rem, refunded):
            return False
    return True
