"""The history checker (issue 23): reads only the recorded histories and the final state
that the API reported, and says, per account, whether they can be explained.

Checks, each an anomaly kind in the report:

- ``applied_twice``: one ``request_id`` answered as a first application (not a replay)
  more than once: a unit taken twice (R12);
- ``replay_differs``: the answers to one consume ``request_id`` differ in what they
  charged (R12: a retry gets the first result again);
- ``units_not_conserved``: a plan whose remaining and consumed units do not add up to its
  size, or that went below zero (R11);
- ``acknowledged_lost``: a plan consumed fewer units than the acknowledged consumes took
  from it, or a purchase answered ok whose plan is not in the final state;
- ``money_not_conserved``: the money in the final state (balances and the price of the
  plans kept) is not what the top-ups brought in, within what the unknown top-ups allow;
- ``not_linearizable``: no order of the account's operations that real time allows (an
  operation that completed before another began comes first) gives every ok answer and
  every refusal that the sequential model (:mod:`.model`) gives. Unknown outcomes may be
  placed anywhere after their invoke, or nowhere, and at most once (R12 keys);
- ``final_state``: no such order ends in the final state the API reports;
- ``undecided``: the search passed ``CONFIGS_MAX`` candidate states (never silently ok).

The search is the just-in-time linearization of Knossos and Porcupine: the set of
candidate (state, operations linearized but not yet completed) is carried from event to
event; at each completion, every candidate is extended by the open operations until the
completing one is placed, and the candidates where it cannot be are dropped. The journal
order is not used at all.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .linearize import CONFIGS_MAX, Undecided, explain, linearize
from .model import INITIAL, AccountModel, FinalPlan, final_matches

PRECEDING_SHOWN = 3  # of the operations that completed before an unplaceable one began
NO_EFFECT = "RESOURCE_EXHAUSTED"  # an overloaded refusal: never applied, nothing to check


def load_ops(folder: Path) -> list[dict]:
    """Every operation of every history file: its invoke, and its completion if any (a
    process killed mid-call leaves an invoke alone: an unknown outcome)."""
    ops: dict[str, dict] = {}
    for path in sorted(folder.glob("history-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:  # a line cut by SIGKILL (never seen: one write)
                continue
            if ev["e"] == "invoke":
                ops[ev["id"]] = {**ev, "t_inv": ev["t"], "e": "unknown", "t_done": None}
            elif ev["id"] in ops:
                op = ops[ev["id"]]
                op.update({k: v for k, v in ev.items() if k != "t"}, t_done=ev["t"])
                if ev["e"] == "unknown":
                    op["t_done"] = None  # may take effect at any time after its invoke
                    op["t_ret"] = ev["t"]  # when the caller gave up
    return list(ops.values())


def windows(ops: list[dict], faults: list[dict]) -> list[dict]:
    """Bound when each unknown outcome can take effect, from the node kills in the fault log
    (``dead_from``: the process is gone; ``spawned``: its successor starts):

    - sent while its node had no process and given up before the successor was spawned:
      no process ever had it, so it never took effect: it is left out, like a refusal;
    - sent to a process that was killed later: it took effect by the time the successor
      was spawned (``until``), or never. This assumes a transaction that a killed node left
      at PostgreSQL ends within the down time (1.2 s at least): a wrong assumption could
      only raise a false alarm, never hide a defect, since it removes explanations.

    Operations of other faults (a pause, a PostgreSQL restart, a killed client) keep no
    bound: a resumed or reconnected node may still apply them."""
    kills: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for f in faults:
        if f["kind"] == "kill_node" and "dead_from" in f:
            kills[f["target"]].append((f["dead_from"], f["spawned"]))
    kept = []
    for op in ops:
        if op["e"] == "unknown":
            for dead_from, spawned in sorted(kills.get(op["node"], ())):
                if dead_from <= op["t_inv"] < spawned:
                    if op.get("t_ret") is not None and op["t_ret"] < spawned:
                        break  # never reached a process
                elif op["t_inv"] < dead_from:
                    kept.append({**op, "until": spawned})
                    break
            else:
                kept.append(op)
            continue
        kept.append(op)
    return kept


def describe(op: dict) -> str:
    done = (op.get("ans") if op["e"] == "ok"
            else f"{op.get('code')} {op.get('reason', '')}".strip())
    span = (f"{op['t_inv'] / 1e6:.1f}..{op['t_done'] / 1e6:.1f} ms" if op["t_done"]
            else f"{op['t_inv'] / 1e6:.1f}.. ms")
    return (f"{op['id']} {op['k']} {op['req'].get('rid', '')} node{op['node']} "
            f"[{span}] {op['e']}: {json.dumps(done, separators=(',', ':'))}")


def anomaly(account: str, kind: str, why: str, ops: list[dict]) -> dict:
    return {"account": account, "kind": kind, "why": why, "ops": [describe(o) for o in ops]}


# -- the direct checks --------------------------------------------------------------------
def check_replays(account: str, ops: list[dict]) -> list[dict]:
    found = []
    by_rid: dict[str, list[dict]] = defaultdict(list)
    for op in ops:
        if op["e"] == "ok" and op["k"] in ("consume", "purchase") and op["req"].get("rid"):
            by_rid[op["req"]["rid"]].append(op)
    for rid, group in by_rid.items():
        if group[0]["k"] == "purchase":
            if len({o["ans"]["plan_id"] for o in group}) > 1:
                found.append(anomaly(account, "replay_differs",
                                     f"purchase {rid} answered with different plans", group))
            continue
        first = [o for o in group if not o["ans"]["replayed"] and o["ans"]["billable"]]
        if len(first) > 1:
            found.append(anomaly(account, "applied_twice",
                                 f"consume {rid} was applied {len(first)} times (R12)", first))
        charged = {json.dumps([o["ans"][k] for k in ("billable", "alloc", "payg",
                                                      "payg_micros")]) for o in group}
        if len(charged) > 1:
            found.append(anomaly(account, "replay_differs",
                                 f"consume {rid} answered with different charges", group))
    return found


def check_final(account: str, ops: list[dict], final: dict) -> list[dict]:
    found = []
    plans = {p["plan_id"]: p for p in final["plan_list"]}
    for p in final["plan_list"]:
        if p["remaining"] < 0 or p["remaining"] + p["consumed"] != p["units"]:
            found.append(anomaly(account, "units_not_conserved",
                                 f"plan {p['plan_id']}: {p['units']} units, {p['remaining']} "
                                 f"remaining, {p['consumed']} consumed", []))
    taken_ok: dict[str, int] = defaultdict(int)
    seen: set[str] = set()
    for op in sorted(ops, key=lambda o: o["e"] != "ok"):
        if op["k"] != "consume" or op["req"]["rid"] in seen:
            continue
        if op["e"] == "ok" and op["ans"]["billable"] and not op["ans"]["replayed"]:
            seen.add(op["req"]["rid"])
            for plan_id, units in op["ans"]["alloc"]:
                taken_ok[plan_id] += units
    for plan_id, units in taken_ok.items():
        got = plans.get(plan_id)
        if got is None or got["consumed"] < units:
            acked = [o for o in ops if o["e"] == "ok" and o["k"] == "consume"
                     and any(a[0] == plan_id for a in o["ans"]["alloc"])]
            found.append(anomaly(account, "acknowledged_lost",
                                 f"acknowledged consumes took {units} units of {plan_id}; the "
                                 f"final state shows {got['consumed'] if got else 'no plan'}",
                                 acked))
    for op in ops:
        if op["e"] == "ok" and op["k"] == "purchase" and op["ans"]["plan_id"] not in plans:
            found.append(anomaly(account, "acknowledged_lost",
                                 f"purchase answered {op['ans']['plan_id']}, which the final "
                                 "state does not have", [op]))
    ups_ok = ups_unknown = 0
    seen = set()
    for op in sorted(ops, key=lambda o: o["e"] != "ok"):
        if op["k"] == "top_up" and op["req"]["rid"] not in seen:
            if op["e"] == "ok":
                seen.add(op["req"]["rid"])
                ups_ok += op["req"]["amount"]
            elif op["e"] == "unknown":
                seen.add(op["req"]["rid"])
                ups_unknown += op["req"]["amount"]
    held = final["cash"] + final["voucher"] + sum(
        p["paid_v"] + p["paid_c"] for p in final["plan_list"]
        if p["status"] != "PLAN_STATUS_REFUNDED")
    if not ups_ok <= held <= ups_ok + ups_unknown:
        found.append(anomaly(account, "money_not_conserved",
                             f"balances and plans kept hold {held} micro-USD; acknowledged "
                             f"top-ups brought {ups_ok}, unknown ones up to {ups_unknown} more",
                             []))
    return found


# -- the search, per account --------------------------------------------------------------
def check_account(account: str, ops: list[dict], final: dict) -> list[dict]:
    found = check_replays(account, ops) + check_final(account, ops, final)
    final_plans = sorted((FinalPlan(p["plan_id"], p["spec"], p["expires_us"])
                          for p in final["plan_list"]),
                         key=lambda p: int(p.plan_id.rsplit("-", 1)[1]))
    rids: dict[str, int] = defaultdict(int)
    for op in ops:
        if op["req"].get("rid"):
            rids[op["req"]["rid"]] += 1
    tracked = {op["req"]["rid"] for op in ops
               if op["req"].get("rid") and (op["e"] == "unknown" or rids[op["req"]["rid"]] > 1)}
    model = AccountModel(final_plans, tracked)
    live = [op for op in ops if not _inert(op)]
    try:
        ends, stuck, open_ops, explored = linearize(model, live, INITIAL)
    except Undecided as exc:
        return [*found, anomaly(account, "undecided", f"more than {CONFIGS_MAX} candidate "
                                f"states at operation {exc}", [])]
    if stuck is not None:
        others = [o for o in open_ops if o["id"] != stuck["id"]]
        before = sorted((o for o in live if o["t_done"] is not None
                         and o["t_done"] < stuck["t_inv"]), key=lambda o: o["t_done"])
        before = before[-PRECEDING_SHOWN:]
        return [*found, anomaly(account, "not_linearizable",
                                f"{stuck['id']} cannot be placed: {explain(model, stuck, explored)}"
                                f"; listed after it: the {len(others)} operations open at its "
                                f"completion, then the last {len(before)} that completed "
                                "before it began (real time puts those first)",
                                [stuck, *others, *before])]
    if not any(final_matches(s, final, final_plans) for s in ends):
        return [*found, anomaly(account, "final_state",
                                f"no order of the {len(live)} operations ends in the final "
                                f"state the API reports ({len(ends)} candidate end states)",
                                [])]
    return found


def _inert(op: dict) -> bool:
    """Operations that constrain nothing: an overload refusal (never applied), and an
    unknown read or non-billable consume (no effect either way)."""
    if op["e"] == "fail" and op["code"] == NO_EFFECT:
        return True
    return op["e"] == "unknown" and (op["k"] == "remaining"
                                     or (op["k"] == "consume" and not op["req"]["billable"]))


def check_folder(folder: Path) -> dict:
    """Check one run's folder: its histories against its final.json."""
    ops = load_ops(folder)
    final = json.loads((folder / "final.json").read_text())
    faults = folder / "faults.json"
    bounded = windows(ops, json.loads(faults.read_text())) if faults.exists() else ops
    by_account: dict[str, list[dict]] = defaultdict(list)
    for op in bounded:
        by_account[op["acct"]].append(op)
    anomalies = []
    for account in sorted(final):
        anomalies += check_account(account, by_account.get(account, []), final[account])
    return {"operations": len(ops), "unknown": sum(op["e"] == "unknown" for op in ops),
            "unknown_unsent": len(ops) - len(bounded),
            "ok": sum(op["e"] == "ok" for op in ops),
            "accounts": len(final), "anomalies": anomalies}
