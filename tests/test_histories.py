"""Issue 23: the history checker, on histories written by hand (each kind of anomaly must be
found, and a concurrent history that needs reordering must pass), then short recorded runs
on PostgreSQL with two nodes under faults: none on the current code, and a planted bug
that must be caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.histories import checker
from tests.histories.run import run_once

MONTH_END, YEAR_END = 1_000, 2_000  # expiries (µs): only their order matters to R8
MAINLAND, OUTSIDE = 1, 2


class History:
    """A run's folder written by hand: operations with explicit invoke and completion
    times, and the final state the API would report."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lines: list[dict] = []
        self.n = 0

    def op(self, kind: str, req: dict, t0: int, t1: int | None, outcome: str = "ok",
           **fields) -> None:
        self.n += 1
        op_id = f"p-{self.n}"
        self.lines.append({"e": "invoke", "id": op_id, "p": "p", "k": kind,
                           "acct": req["acct"], "rid": req.get("rid"), "node": 0,
                           "req": req, "t": t0})
        if t1 is not None:
            self.lines.append({"e": outcome, "id": op_id, "t": t1, **fields})

    def consume(self, rid: str, qty: int, t0: int, t1: int | None, ans: dict | None = None,
                region: int = MAINLAND, outcome: str = "ok") -> None:
        req = {"acct": "a", "rid": rid, "qty": qty, "region": region, "billable": True}
        self.op("consume", req, t0, t1, outcome, **({"ans": ans} if ans else {}))

    def check(self, final: dict) -> list[str]:
        (self.folder / "history-p.jsonl").write_text(
            "".join(json.dumps(x) + "\n" for x in self.lines))
        (self.folder / "final.json").write_text(json.dumps({"a": final}))
        return [a["kind"] for a in checker.check_folder(self.folder)["anomalies"]]


def took(alloc: list, payg: int = 0, remaining: int = 0, region: int = MAINLAND) -> dict:
    return {"billable": True, "alloc": alloc, "payg": payg,
            "payg_micros": payg * (700 if region == MAINLAND else 1000), "replayed": False,
            "remaining": remaining}


def plan(plan_id: str, spec: str, remaining: int, consumed: int, expires: int,
         paid_c: int, status: str = "PLAN_STATUS_ACTIVE") -> dict:
    units = {"h-month-8": 8, "h-year-12": 12}[spec]
    return {"plan_id": plan_id, "spec": spec, "remaining": remaining, "paid_v": 0,
            "paid_c": paid_c, "status": status, "units": units, "consumed": consumed,
            "expires_us": expires}


def final(cash: int, plans: list[dict], payg: int = 0, payg_micros: int = 0) -> dict:
    live = {p["plan_id"]: p["remaining"] for p in plans if p["remaining"] > 0}
    return {"cash": cash, "voucher": 0, "outstanding": 0, "total": sum(live.values()),
            "payg": payg, "payg_micros": payg_micros, "plans": live, "plan_list": plans}


@pytest.fixture
def h(tmp_path: Path) -> History:
    """An account with USD 5 and a month plan (8 units, USD 1) bought at once."""
    hist = History(tmp_path)
    hist.op("top_up", {"acct": "a", "rid": "up", "kind": 1, "amount": 5_000_000}, 1, 2,
            ans={"cash": 5_000_000, "voucher": 0, "outstanding": 0})
    hist.op("purchase", {"acct": "a", "rid": "buy", "spec": "h-month-8"}, 3, 4,
            ans={"plan_id": "plan-1", "spec": "h-month-8", "remaining": 8, "paid_v": 0,
                 "paid_c": 1_000_000, "status": "PLAN_STATUS_ACTIVE"})
    return hist


def test_concurrent_history_that_needs_reordering_passes(h: History) -> None:
    # invoked x then y, overlapping; the answers say y went first
    h.consume("x", 2, 10, 20, took([["plan-1", 2]], remaining=3))
    h.consume("y", 3, 11, 19, took([["plan-1", 3]], remaining=5))
    h.op("remaining", {"acct": "a"}, 21, 22,
         ans={"total": 3, "payg": 0, "payg_micros": 0, "plans": {"plan-1": 3}})
    assert h.check(final(4_000_000, [plan("plan-1", "h-month-8", 3, 5, MONTH_END,
                                          1_000_000)])) == []


def test_a_read_that_misses_an_acknowledged_consume_is_found(h: History) -> None:
    h.consume("x", 2, 10, 20, took([["plan-1", 2]], remaining=6))
    h.op("remaining", {"acct": "a"}, 21, 22,  # began after x was acknowledged
         ans={"total": 8, "payg": 0, "payg_micros": 0, "plans": {"plan-1": 8}})
    assert h.check(final(4_000_000, [plan("plan-1", "h-month-8", 6, 2, MONTH_END,
                                          1_000_000)])) == ["not_linearizable"]


def test_a_request_id_applied_twice_is_found(h: History) -> None:
    h.consume("x", 2, 10, 20, took([["plan-1", 2]], remaining=6))
    h.consume("x", 2, 11, 21, took([["plan-1", 2]], remaining=4))
    kinds = h.check(final(4_000_000, [plan("plan-1", "h-month-8", 4, 4, MONTH_END,
                                           1_000_000)]))
    assert "applied_twice" in kinds and "not_linearizable" in kinds


def test_an_acknowledged_consume_missing_from_the_final_state_is_found(h: History) -> None:
    h.consume("x", 2, 10, 20, took([["plan-1", 2]], remaining=6))
    kinds = h.check(final(4_000_000, [plan("plan-1", "h-month-8", 8, 0, MONTH_END,
                                           1_000_000)]))
    assert kinds == ["acknowledged_lost", "final_state"]


def test_r8_the_plan_that_expires_first_pays_first(h: History) -> None:
    h.op("purchase", {"acct": "a", "rid": "buy2", "spec": "h-year-12"}, 5, 6,
         ans={"plan_id": "plan-2", "spec": "h-year-12", "remaining": 12, "paid_v": 0,
              "paid_c": 1_500_000, "status": "PLAN_STATUS_ACTIVE"})
    h.consume("x", 1, 10, 20, took([["plan-2", 1]], remaining=19))  # the year plan: wrong
    kinds = h.check(final(2_500_000, [
        plan("plan-1", "h-month-8", 8, 0, MONTH_END, 1_000_000),
        plan("plan-2", "h-year-12", 11, 1, YEAR_END, 1_500_000)]))
    assert kinds == ["not_linearizable"]


def test_an_unknown_outcome_may_apply_once_but_not_twice(h: History) -> None:
    h.consume("x", 2, 10, None, outcome="unknown")  # a deadline: applied or not
    once = final(4_000_000, [plan("plan-1", "h-month-8", 6, 2, MONTH_END, 1_000_000)])
    assert h.check(once) == []
    assert h.check(final(4_000_000, [plan("plan-1", "h-month-8", 8, 0, MONTH_END,
                                          1_000_000)])) == []
    twice = final(4_000_000, [plan("plan-1", "h-month-8", 4, 4, MONTH_END, 1_000_000)])
    assert h.check(twice) == ["final_state"]


def test_a_refusal_the_rules_do_not_give_is_found(h: History) -> None:
    h.op("purchase", {"acct": "a", "rid": "buy2", "spec": "h-month-8"}, 10, 11,
         outcome="fail", code="FAILED_PRECONDITION", reason="INSUFFICIENT_FUNDS")
    assert h.check(final(4_000_000, [plan("plan-1", "h-month-8", 8, 0, MONTH_END,
                                          1_000_000)])) == ["not_linearizable"]


def test_pay_as_you_go_at_the_regions_price_after_the_plans(h: History) -> None:
    h.consume("x", 9, 10, 20, took([["plan-1", 8]], payg=1, region=OUTSIDE), region=OUTSIDE)
    assert h.check(final(4_000_000, [plan("plan-1", "h-month-8", 0, 8, MONTH_END, 1_000_000,
                                          "PLAN_STATUS_EXHAUSTED")], 1, 1000)) == []
    h.lines[-1]["ans"]["payg_micros"] = 700  # the mainland's price for an outside request
    assert "not_linearizable" in h.check(final(
        4_000_000, [plan("plan-1", "h-month-8", 0, 8, MONTH_END, 1_000_000,
                         "PLAN_STATUS_EXHAUSTED")], 1, 1000))


def test_unknowns_that_nothing_can_tell_apart_are_counted_not_enumerated(h: History) -> None:
    """Thirty unknown consumes of one unit, each under its own id: 2^30 subsets, but only
    how many took effect matters once their ids are settled (any number from 0 to 8 fits
    the plan, and one more unit is pay-as-you-go)."""
    for i in range(30):
        h.consume(f"u{i}", 1, 10 + i, None, outcome="unknown")
    h.consume("x", 1, 100, 110, took([["plan-1", 1]], remaining=2))  # so 5 took effect
    left_2 = final(4_000_000, [plan("plan-1", "h-month-8", 2, 6, MONTH_END, 1_000_000)])
    assert h.check(left_2) == []
    assert h.check(final(4_000_000, [plan("plan-1", "h-month-8", 0, 8, MONTH_END, 1_000_000,
                                          "PLAN_STATUS_EXHAUSTED")], 2, 1400)) == []
    assert h.check(final(4_000_000, [plan("plan-1", "h-month-8", 0, 8, MONTH_END, 1_000_000,
                                          "PLAN_STATUS_EXHAUSTED")], 26, 26 * 700)) \
        == ["final_state"]  # 2 + 8 + 26 > 31 consumes


def test_a_killed_nodes_unknowns_take_effect_before_its_successor_or_never(h: History
                                                                          ) -> None:
    """windows(): sent to a process killed later, an unknown takes effect before the
    successor is spawned; sent while no process was there and given up before one was, it
    never does."""
    h.consume("before", 2, 10, None, outcome="unknown")  # the process dies at 15
    h.consume("dead", 3, 16, None, outcome="unknown")
    h.lines[-1:] = [h.lines[-1], {"e": "unknown", "id": h.lines[-1]["id"], "t": 20,
                                  "code": "UNAVAILABLE"}]  # gave up at 20, spawned at 30
    h.op("remaining", {"acct": "a"}, 40, 41,
         ans={"total": 8, "payg": 0, "payg_micros": 0, "plans": {"plan-1": 8}})
    (h.folder / "faults.json").write_text(json.dumps([
        {"kind": "kill_node", "target": 0, "at_s": 0, "start": 14, "end": 31,
         "dead_from": 15, "spawned": 30}]))
    untouched = final(4_000_000, [plan("plan-1", "h-month-8", 8, 0, MONTH_END, 1_000_000)])
    assert h.check(untouched) == []
    after_read = final(4_000_000, [plan("plan-1", "h-month-8", 6, 2, MONTH_END, 1_000_000)])
    assert h.check(after_read) == ["final_state"]  # "before" cannot land after 30
    (h.folder / "faults.json").unlink()
    assert h.check(after_read) == []  # with no kill logged, it could have
    h.lines.pop()  # the read
    (h.folder / "faults.json").write_text(json.dumps([
        {"kind": "kill_node", "target": 0, "at_s": 0, "start": 14, "end": 31,
         "dead_from": 15, "spawned": 30}]))
    dead_applied = final(4_000_000, [plan("plan-1", "h-month-8", 5, 3, MONTH_END, 1_000_000)])
    assert h.check(dead_applied) == ["final_state"]  # no process ever had "dead"


# -- recorded runs: two nodes on PostgreSQL, faults from a seeded schedule -----------------
SHORT_SECONDS = 15.0
SHORT_SEEDS = (5, 23)  # their schedules include a PostgreSQL restart and a paused node


@pytest.mark.parametrize("seed", SHORT_SEEDS)
def test_a_short_run_finds_no_anomaly(pg_cluster, tmp_path: Path, seed: int) -> None:
    r = run_once(pg_cluster, seed, SHORT_SECONDS, tmp_path / f"seed-{seed}")
    assert r.operations > 1_000 and r.faults >= 2
    assert r.anomalies == [], json.dumps(r.anomalies[:3], indent=1)


def test_a_planted_bug_is_caught(pg_cluster, tmp_path: Path) -> None:
    """A cached account kept after another node changed it (stale_cache): caught, and the
    report names the operations involved."""
    r = run_once(pg_cluster, 2, SHORT_SECONDS, tmp_path / "planted", plant="stale_cache")
    assert r.anomalies, "the planted bug went unnoticed"
    assert any(a["kind"] in ("not_linearizable", "acknowledged_lost") and a["ops"]
               for a in r.anomalies)
