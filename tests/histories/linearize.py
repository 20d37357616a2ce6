"""The search for an order (issue 23): just-in-time linearization of one account's
operations against :mod:`.model`, as Knossos and Porcupine do it (see :mod:`.checker`).

A candidate is ``(state, placed)``: a model state and the operations placed (linearized)
whose completion has not been reached yet. Unknown outcomes are never "completed": once
placed, their ``request_id`` is in the state's applied set, which keeps them from being
placed twice.
"""

from __future__ import annotations

from typing import Any

from .model import APPLIED, AccountModel, FinalPlan, final_matches, matches

CONFIGS_MAX = 200_000  # candidates explored for one completion, at most


class Undecided(Exception):
    pass


def _step(model: AccountModel, state: tuple, op: dict) -> tuple | None:
    """The state after placing ``op`` in ``state``, or None when it cannot go there."""
    got = model.apply(state, op["k"], op["req"])
    if got is None:
        return None
    outcome, after = got
    if op["e"] == "unknown":
        return after if after is not state else None  # a refusal: as if never sent
    return after if matches(op["k"], op, outcome) else None


def linearize(model: AccountModel, ops: list[dict], initial: tuple
              ) -> tuple[set, dict | None, list[dict], set]:
    """Run the search over ``ops``. Returns (candidates at the end, the operation that could
    not be placed or None, the operations open at that moment, the candidates just before
    it)."""
    events = []
    for op in ops:
        events.append((op["t_inv"], 0, op["id"], op))
        if op["t_done"] is not None:
            events.append((op["t_done"], 1, op["id"], op))
    events.sort(key=lambda e: (e[0], e[1]))
    configs: set = {(initial, frozenset())}
    open_ops: dict[str, dict] = {}
    for _, is_done, op_id, op in events:
        if not is_done:
            open_ops[op_id] = op
            continue
        new, explored = _place(model, configs, open_ops, op)
        if not new:
            return configs, op, list(open_ops.values()), explored
        configs = new
        del open_ops[op_id]
    return _close(model, configs, open_ops), None, [], configs


def _place(model: AccountModel, configs: set, open_ops: dict[str, dict], op: dict
           ) -> tuple[set, set]:
    """Every candidate extended by open operations until ``op`` is placed; also returns
    every candidate explored (to explain a failure)."""
    done: set = set()
    seen = set(configs)
    frontier = list(configs)
    while frontier:
        state, placed = frontier.pop()
        if op["id"] in placed:
            done.add((state, placed - {op["id"]}))
            continue
        for o_id, o in open_ops.items():
            if o_id in placed or (o["e"] == "unknown"
                                  and o["req"].get("rid") in state[APPLIED]):
                continue
            after = _step(model, state, o)
            if after is None:
                continue
            cand = (after, placed if o["e"] == "unknown" else placed | {o_id})
            if cand not in seen:
                seen.add(cand)
                frontier.append(cand)
                if len(seen) > CONFIGS_MAX:
                    raise Undecided(op["id"])
    return done, seen


def _close(model: AccountModel, configs: set, open_ops: dict[str, dict]) -> set:
    """At the end, only unknowns are open: every state they can still lead to."""
    states = {c[0] for c in configs}
    frontier = list(states)
    while frontier:
        state = frontier.pop()
        for o in open_ops.values():
            if o["req"].get("rid") in state[APPLIED]:
                continue
            after = _step(model, state, o)
            if after is not None and after not in states:
                states.add(after)
                frontier.append(after)
                if len(states) > CONFIGS_MAX:
                    raise Undecided("end")
    return states


def explain(model: AccountModel, op: dict, before: set) -> str:
    """Why ``op`` cannot be placed: what the model answers for it in the states reachable
    just before it (at most three of them)."""
    said: list[str] = []
    for state, placed in before:
        if op["id"] in placed:
            continue
        got = model.apply(state, op["k"], op["req"])
        text = "impossible here" if got is None else _short(got[0])
        if text not in said:
            said.append(text)
        if len(said) == 3:
            break
    return (f"the ledger answered {_short(op.get('ans') or (op.get('code'), op.get('reason')))}"
            f"; after every order of the operations before it, the model answers "
            f"{' or '.join(said)}")


def _short(x: Any) -> str:
    import json
    return json.dumps(x, separators=(",", ":"), default=str)


__all__ = ["FinalPlan", "Undecided", "explain", "final_matches", "linearize"]
