"""Fault injection for the crash campaigns (``make crash``): the process kills itself with
SIGKILL at a named point of the commit path, with a given probability.

Off unless ``QUOTA_LEDGER_FAULT=point:probability:seed`` is set in the environment, e.g.
``during_commit:0.02:7``. Points: ``before_commit`` (nothing of the group written),
``during_commit`` (rows written, COMMIT not yet issued), ``after_commit`` (durable, no reply
sent yet). A disabled point costs one comparison.

A fourth field, ``point:probability:seed:stall_s``, stalls there for that many seconds
instead of dying: a transaction held open with its locks (the multi-node tests of issue 11).
"""

from __future__ import annotations

import os
import random
import signal
import time

POINTS = ("before_commit", "during_commit", "after_commit")
ENV = "QUOTA_LEDGER_FAULT"


def _parse(spec: str | None) -> tuple[str, float, random.Random, float] | None:
    if not spec:
        return None
    point, probability, seed, *stall = spec.split(":")
    if point not in POINTS:
        raise ValueError(f"{ENV}: unknown point {point!r}; one of {', '.join(POINTS)}")
    return point, float(probability), random.Random(int(seed)), float(stall[0]) if stall else 0.0


_ARMED = _parse(os.environ.get(ENV))


def fault(point: str) -> None:
    if _ARMED is not None and _ARMED[0] == point and _ARMED[2].random() < _ARMED[1]:
        if _ARMED[3]:
            time.sleep(_ARMED[3])
        else:
            os.kill(os.getpid(), signal.SIGKILL)


def armed(point: str) -> bool:
    """Whether this point is the one armed (a commit may then do what the point's meaning
    needs, e.g. send its rows before the point, which it would otherwise pipeline)."""
    return _ARMED is not None and _ARMED[0] == point


# -- planted bugs (issue 23) -------------------------------------------------------------
# Known bugs that the history checker (tests/histories) must catch: never set in production.
# ``QUOTA_LEDGER_PLANT=<name>`` turns one on in the process; an unknown name stops it at start.
PLANTS = {
    "reply_before_commit": "a group's replies leave before its commit, which follows "
                           "PLANT_COMMIT_DELAY_S later (R11 broken)",
    "key_outside_lock": "a group's consume keys are read before the accounts' locks and "
                        "claimed with ON CONFLICT DO NOTHING (R12 broken across nodes)",
    "stale_cache": "a cached account is kept when another node moved its version "
                   "(the shared store's reload skipped)",
}
PLANT_ENV = "QUOTA_LEDGER_PLANT"
PLANT_COMMIT_DELAY_S = 0.05  # reply_before_commit: how long a replied group waits to commit


def _plant(name: str | None) -> str | None:
    if name and name not in PLANTS:
        raise ValueError(f"{PLANT_ENV}: unknown bug {name!r}; one of {', '.join(PLANTS)}")
    return name or None


PLANTED = _plant(os.environ.get(PLANT_ENV))


def planted(name: str) -> bool:
    """True when the named bug is planted in this process (one comparison when not)."""
    return PLANTED == name
