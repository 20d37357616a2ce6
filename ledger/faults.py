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
