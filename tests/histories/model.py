"""The rules as a sequential model of one account (issue 23), for the history checker.

A state is a plain tuple, hashable, so that the checker can keep sets of them:

    (cash, voucher, plans, payg_units, payg_micros, applied)

- ``plans``: one ``(rid, remaining, refunded, paid_voucher, paid_cash)`` per plan bought,
  in purchase order;
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

State = tuple  # (cash, voucher, plans, payg_units, payg_micros, applied)
INITIAL: State = (0, 0, (), 0, 0, frozenset())


@dataclass(frozen=True)
class FinalPlan:
    plan_id: str
    spec: str
    expires_us: int


class AccountModel:
    def __init__(self, final_plans: list[FinalPlan], tracked: set[str]) -> None:
        self.final_plans = final_plans
        self.tracked = tracked

    def apply(self, s: State, kind: str, req: dict) -> tuple[Any, State] | None:
        """The outcome of one request in state ``s`` and the state after it; None when the
        request cannot have been applied there (a purchase that left no plan)."""
        return getattr(self, f"_{kind}")(s, req)

    # -- requests -----------------------------------------------------------------------
    def _consume(self, s: State, req: dict) -> tuple[Any, State]:
        cash, voucher, plans, payg, payg_m, applied = s
        rid = req["rid"]
        if not req["billable"]:  # R3: acknowledged, nothing changes, no key claimed (R12)
            return {"billable": False, "alloc": [], "payg": 0, "payg_micros": 0,
                    "replayed": False}, s
        if rid in applied:
            return {"replayed": True}, s
        need = req["qty"]
        order = sorted((i for i, p in enumerate(plans) if not p[2] and p[1] > 0),
                       key=lambda i: (self.final_plans[i].expires_us, i))  # R8
        new = list(plans)
        alloc = []
        for i in order:
            if need == 0:
                break
            rid_i, rem, refunded, pv, pc = new[i]
            take = min(rem, need)
            new[i] = (rid_i, rem - take, refunded, pv, pc)
            alloc.append([self.final_plans[i].plan_id, take])
            need -= take
        cost = need * PRICE_MICROS[req["region"]]
        remaining = sum(p[1] for p in new if not p[2])
        after = (cash, voucher, tuple(new), payg + need, payg_m + cost, self._claim(applied, rid))
        return {"billable": True, "alloc": alloc, "payg": need, "payg_micros": cost,
                "replayed": False, "remaining": remaining}, after

    def _purchase(self, s: State, req: dict) -> tuple[Any, State] | None:
        cash, voucher, plans, payg, payg_m, applied = s
        rid = req["rid"]
        if rid in applied:  # a replay answers the plan as it is now (R12)
            i = next(i for i, p in enumerate(plans) if p[0] == rid)
            return self._plan(plans, i), s
        units, price = SPECS[req["spec"]]
        if cash + voucher < price:  # R16: refused, nothing changed, no key (R12)
            return (FAIL, "FAILED_PRECONDITION", "INSUFFICIENT_FUNDS"), s
        n = len(plans)
        if n >= len(self.final_plans) or self.final_plans[n].spec != req["spec"]:
            return None
        pv = min(voucher, price)
        pc = price - pv
        new = (*plans, (rid, units, False, pv, pc))
        return self._plan(new, n), (cash - pc, voucher - pv, new, payg, payg_m,
                                    self._claim(applied, rid))

    def _top_up(self, s: State, req: dict) -> tuple[Any, State]:
        cash, voucher, plans, payg, payg_m, applied = s
        if req["rid"] not in applied:
            if req["kind"] == 1:  # FUNDS_KIND_CASH
                cash += req["amount"]
            else:
                voucher += req["amount"]
        return ({"cash": cash, "voucher": voucher, "outstanding": 0},
                (cash, voucher, plans, payg, payg_m, self._claim(applied, req["rid"])))

    def _refund(self, s: State, req: dict) -> tuple[Any, State]:
        cash, voucher, plans, payg, payg_m, applied = s
        i = next((i for i in range(len(plans))
                  if self.final_plans[i].plan_id == req["plan_id"]), None)
        if i is None:
            return (FAIL, "NOT_FOUND", "PLAN_NOT_FOUND"), s
        if req["rid"] in applied:
            return self._plan(plans, i), s
        rid_i, rem, refunded, pv, pc = plans[i]
        if refunded:
            return (FAIL, "FAILED_PRECONDITION", "PLAN_REFUNDED"), s
        if rem < SPECS[self.final_plans[i].spec][0]:  # R21: a used plan
            return (FAIL, "FAILED_PRECONDITION", "PLAN_USED"), s
        new = list(plans)
        new[i] = (rid_i, rem, True, pv, pc)
        return self._plan(new, i), (cash + pc, voucher + pv, tuple(new), payg, payg_m,
                                    self._claim(applied, req["rid"]))

    def _remaining(self, s: State, req: dict) -> tuple[Any, State]:
        plans = s[2]
        live = {self.final_plans[i].plan_id: p[1] for i, p in enumerate(plans)
                if not p[2] and p[1] > 0}
        return {"total": sum(live.values()), "payg": s[3], "payg_micros": s[4],
                "plans": live}, s

    # -- helpers ------------------------------------------------------------------------
    def _claim(self, applied: frozenset, rid: str) -> frozenset:
        return applied | {rid} if rid in self.tracked else applied

    def _plan(self, plans: tuple | list, i: int) -> dict:
        rid, rem, refunded, pv, pc = plans[i]
        return {"plan_id": self.final_plans[i].plan_id, "spec": self.final_plans[i].spec,
                "remaining": rem, "paid_v": pv, "paid_c": pc, "refunded": refunded}


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
    cash, voucher, plans, payg, payg_m, _ = s
    if (cash, voucher, payg, payg_m) != (final["cash"], final["voucher"], final["payg"],
                                         final["payg_micros"]):
        return False
    if len(plans) != len(final["plan_list"]):
        return False
    by_id = {p["plan_id"]: p for p in final["plan_list"]}
    for i, p in enumerate(plans):
        got = by_id[final_plans[i].plan_id]
        if (got["remaining"], got["status"] == "PLAN_STATUS_REFUNDED") != (p[1], p[2]):
            return False
    return True
