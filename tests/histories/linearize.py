"""The search for an order (issue 23): just-in-time linearization of one account's
operations against :mod:`.model`, as Knossos and Porcupine do it (see :mod:`.checker`).

A candidate is ``(state, placed, spare)``:

- ``state``: a model state;
- ``placed``: the operations placed (linearized) whose completion has not been reached yet;
- ``spare``: per class of interchangeable unknowns, how many can still be placed.

Unknown outcomes are never "completed". While some operation carrying their
``request_id`` is still open or still to come, they are placed one by one, and the id in
the state's applied set keeps them from being placed twice. Once every operation carrying
an id has begun, and every definite one has completed, the id is *settled*: nothing to come
can tell whether it was applied. Its unknowns that have not taken effect then join a class
(same kind, same request but the id), and the id leaves the state. Two unknown consumes of
one unit become the same thing, so candidates that differ only in *which* of them took
effect are one candidate. Without this, k open unknowns make 2^k candidates; with it, the
count per class is what remains (Porcupine's "P-compositionality" by equal operations).
"""

from __future__ import annotations

from typing import Any

from .model import APPLIED, AccountModel, FinalPlan, final_matches, forget, matches

CONFIGS_MAX = 200_000  # candidates explored for one completion, at most
INVOKE, COMPLETE, EXPIRE, EXPIRE_CLASS = range(4)  # the events, in this order at one time


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


class _Classes:
    """The settle points of the tracked ids, and the classes their unknowns join."""

    def __init__(self, model: AccountModel, ops: list[dict], events: list) -> None:
        self.settle_at: dict[tuple, list[str]] = {}  # (kind, op id) -> ids settled after it
        self.class_of: dict[str, int] = {}  # id -> class, for ids with unknowns
        self.reps: list[dict] = []  # a class's request, as an unknown without an id
        last: dict[str, tuple] = {}
        for _, kind, op_id, op in events:
            rid = op["req"].get("rid")
            if rid in model.tracked and (kind == INVOKE or (kind == COMPLETE
                                                           and op["e"] != "unknown")):
                last[rid] = (kind, op_id)
        until: dict[str, int | None] = {}  # an id's unknowns take effect by then, at the latest
        for op in ops:
            rid = op["req"].get("rid")
            if op["e"] == "unknown" and rid in model.tracked:
                u, prev = op.get("until"), until.get(rid, 0)
                until[rid] = None if u is None or prev is None else max(u, prev)
        keys: dict[tuple, int] = {}
        mixed: set[str] = set()
        for op in ops:
            rid = op["req"].get("rid")
            if op["e"] != "unknown" or rid not in model.tracked:
                continue
            key = (op["k"], tuple(sorted((k, v) for k, v in op["req"].items() if k != "rid")),
                   until.get(rid))
            if key not in keys:
                keys[key] = len(self.reps)
                self.reps.append({"id": f"class-{len(self.reps)}", "k": op["k"],
                                  "e": "unknown", "req": {**op["req"], "rid": None},
                                  "until": key[2]})
            if self.class_of.setdefault(rid, keys[key]) != keys[key]:
                mixed.add(rid)  # retries that differ: never settled, placed one by one
        for rid, i in last.items():
            if rid not in mixed:
                self.settle_at.setdefault(i, []).append(rid)

    def settle(self, configs: set, rids: list[str], open_ops: dict[str, dict], now: int
               ) -> set:
        for rid in rids:
            for op_id in [k for k, o in open_ops.items() if o["req"].get("rid") == rid]:
                del open_ops[op_id]  # only unknowns are left open with a settled id
            c = self.class_of.get(rid)
            if c is not None and self.reps[c]["until"] is not None \
                    and self.reps[c]["until"] <= now:
                c = None  # its unknowns' time is over: spare none
            out = set()
            for state, placed, spare in configs:
                if rid in state[APPLIED]:
                    out.add((forget(state, rid), placed, spare))
                elif c is not None:
                    out.add((state, placed, spare[:c] + (spare[c] + 1,) + spare[c + 1:]))
                else:
                    out.add((state, placed, spare))
            configs = out
        return configs

    def expire(self, configs: set, c: int) -> set:
        """Class ``c``'s unknowns can no longer take effect: none of them is spare."""
        return {(state, placed, spare[:c] + (0,) + spare[c + 1:])
                for state, placed, spare in configs}

    def moves(self, model: AccountModel, state: tuple, spare: tuple):
        """Each settled unknown that can take effect in ``state``: (state after, spare)."""
        for c, n in enumerate(spare):
            if n:
                after = _step(model, state, self.reps[c])
                if after is not None:
                    yield after, spare[:c] + (n - 1,) + spare[c + 1:]


def linearize(model: AccountModel, ops: list[dict], initial: tuple
              ) -> tuple[set, dict | None, list[dict], set]:
    """Run the search over ``ops``. Returns (model states at the end, the operation that
    could not be placed or None, the operations open at that moment, the candidates just
    before it)."""
    events = []
    for op in ops:
        events.append((op["t_inv"], 0, op["id"], op))
        if op["t_done"] is not None:
            events.append((op["t_done"], 1, op["id"], op))
        elif op.get("until") is not None:  # an unknown's last moment (see checker.windows)
            events.append((op["until"], EXPIRE, op["id"], op))
    events.sort(key=lambda e: (e[0], e[1]))
    classes = _Classes(model, ops, events)
    for c, rep in enumerate(classes.reps):
        if rep["until"] is not None:
            events.append((rep["until"], EXPIRE_CLASS, rep["id"], {**rep, "class": c}))
    events.sort(key=lambda e: (e[0], e[1]))
    configs: set = {(initial, frozenset(), (0,) * len(classes.reps))}
    open_ops: dict[str, dict] = {}
    for now, kind, op_id, op in events:
        if kind == INVOKE:
            open_ops[op_id] = op
        elif kind == EXPIRE:
            open_ops.pop(op_id, None)
        elif kind == EXPIRE_CLASS:
            configs = classes.expire(configs, op["class"])
        else:
            new, explored = _place(model, classes, configs, open_ops, op)
            if not new:
                return configs, op, list(open_ops.values()), explored
            configs = new
            del open_ops[op_id]
        if (kind, op_id) in classes.settle_at:
            configs = classes.settle(configs, classes.settle_at[kind, op_id], open_ops, now)
    return _close(model, classes, configs, open_ops), None, [], configs


def _place(model: AccountModel, classes: _Classes, configs: set, open_ops: dict[str, dict],
           op: dict) -> tuple[set, set]:
    """Every candidate extended by open operations until ``op`` is placed; also returns
    every candidate explored (to explain a failure)."""
    done: set = set()
    seen = set(configs)
    frontier = list(configs)

    def push(cand: tuple) -> None:
        if cand not in seen:
            seen.add(cand)
            frontier.append(cand)
            if len(seen) > CONFIGS_MAX:
                raise Undecided(op["id"])

    while frontier:
        state, placed, spare = frontier.pop()
        if op["id"] in placed:
            done.add((state, placed - {op["id"]}, spare))
            continue
        for o_id, o in open_ops.items():
            if o_id in placed or (o["e"] == "unknown"
                                  and o["req"].get("rid") in state[APPLIED]):
                continue
            after = _step(model, state, o)
            if after is not None:
                push((after, placed if o["e"] == "unknown" else placed | {o_id}, spare))
        for after, rest in classes.moves(model, state, spare):
            push((after, placed, rest))
    return done, seen


def _close(model: AccountModel, classes: _Classes, configs: set, open_ops: dict[str, dict]
           ) -> set:
    """At the end, only unknowns are open: every model state they can still lead to."""
    seen = {(c[0], c[2]) for c in configs}
    frontier = list(seen)
    while frontier:
        state, spare = frontier.pop()
        nexts = list(classes.moves(model, state, spare))
        for o in open_ops.values():
            if o["req"].get("rid") not in state[APPLIED]:
                after = _step(model, state, o)
                if after is not None:
                    nexts.append((after, spare))
        for cand in nexts:
            if cand not in seen:
                seen.add(cand)
                frontier.append(cand)
                if len(seen) > CONFIGS_MAX:
                    raise Undecided("end")
    return {s for s, _ in seen}


def explain(model: AccountModel, op: dict, before: set) -> str:
    """Why ``op`` cannot be placed: what the model answers for it in the states reachable
    just before it (at most three of them)."""
    said: list[str] = []
    for state, placed, _ in before:
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
