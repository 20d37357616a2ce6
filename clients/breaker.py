"""The client's circuit breaker: fail open fast while the ledger is down or hung (issue 21, R26).

One breaker per client, shared by its threads or tasks::

    closed --(FAILURES_TO_OPEN failures in a row, or the channel in TRANSIENT_FAILURE)--> open
    open --(the background probe: a health check answers SERVING)--> half_open
    half_open --(the one trial call succeeds)--> closed      (and the spool's replay starts)
    half_open --(the trial call fails)--> open

- A failure is what says "the ledger cannot be reached": UNAVAILABLE, DEADLINE_EXCEEDED, or
  the call's latency budget running out. An answer of any other kind (a refusal included)
  proves the ledger is there and counts as a success.
- While open, ``consume()`` makes no network attempt: it spools and answers ``provisional``
  at once; a query fails at once with UNAVAILABLE, reason ``LEDGER_UNREACHABLE``.
- In half_open one caller at a time makes the trial call; the others are treated as open.

This module is the state machine alone: the clock is injected, nothing here does I/O, and
:class:`Prober` (the probe's schedule) is a pure function of its failures. The clients wire
them to their channel (``clients/client.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
FAILURES_TO_OPEN = 3  # failures in a row that open the breaker
PROBE_INTERVAL_MIN_S = 0.05  # the first health probe after opening
PROBE_INTERVAL_MAX_S = 0.5  # probes back off to this, so a returning ledger is seen quickly
PROBE_TIMEOUT_S = 0.25  # a probe that is not answered by then failed (a hung ledger)

log = logging.getLogger("quota_ledger.client")

StateListener = Callable[[str, str], None]  # (old state, new state)


class CircuitBreaker:
    """Thread-safe; every transition is logged once and reported to ``on_state_change``."""

    def __init__(self, *, failures_to_open: int = FAILURES_TO_OPEN,
                 on_state_change: StateListener | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failures_to_open < 1:
            raise ValueError(f"failures_to_open must be at least 1 (got {failures_to_open})")
        self.failures_to_open, self.clock = failures_to_open, clock
        self._listeners: list[StateListener] = [on_state_change] if on_state_change else []
        self._lock = threading.Lock()
        self.state, self.since = CLOSED, clock()
        self.failures = 0  # in a row, while closed
        self.opened = 0  # times it opened since the client started
        self._trial_out = False

    def listen(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    # ---------------------------------------------------------------- the callers' side
    def allow(self) -> bool:
        """May this call go to the network? Closed: yes. Open: no. Half-open: one trial."""
        with self._lock:
            if self.state == CLOSED:
                return True
            if self.state == HALF_OPEN and not self._trial_out:
                self._trial_out = True
                return True
            return False

    def succeeded(self) -> None:
        with self._lock:
            self.failures = 0
            changed = self._move(CLOSED) if self.state == HALF_OPEN else None
        self._report(changed)

    def failed(self, why: str) -> None:
        """A call could not reach the ledger (``why``: a status code name, or ``budget``)."""
        with self._lock:
            self.failures += 1
            changed = None
            if self.state == HALF_OPEN or (self.state == CLOSED
                                           and self.failures >= self.failures_to_open):
                changed = self._move(OPEN, why)
        self._report(changed)

    def unreachable(self, why: str) -> None:
        """The channel itself says so (TRANSIENT_FAILURE): open at once."""
        with self._lock:
            changed = self._move(OPEN, why) if self.state == CLOSED else None
        self._report(changed)

    # ---------------------------------------------------------------- the probe's side
    def probe_answered(self) -> None:
        """The health probe got SERVING: let one trial call through."""
        with self._lock:
            changed = self._move(HALF_OPEN) if self.state == OPEN else None
        self._report(changed)

    @property
    def is_open(self) -> bool:
        return self.state == OPEN

    # ---------------------------------------------------------------- transitions
    def _move(self, to: str, why: str = "") -> tuple[str, str, str] | None:
        if to == self.state:
            return None
        old, self.state, self.since = self.state, to, self.clock()
        self._trial_out = False
        if to == OPEN:
            self.opened += 1
        if to == CLOSED:
            self.failures = 0
        return old, to, why

    def _report(self, changed: tuple[str, str, str] | None) -> None:
        if changed is None:
            return
        old, new, why = changed
        if new == OPEN:
            log.warning("ledger unreachable (%s): circuit breaker %s -> open; consume() "
                        "spools and answers provisional", why or "trial failed", old)
        else:
            log.info("circuit breaker %s -> %s", old, new)
        for listener in self._listeners:
            try:
                listener(old, new)
            except Exception:  # a caller's callback must not break the breaker
                log.exception("on_state_change callback raised")


class Prober:
    """When to probe next while open: doubling from PROBE_INTERVAL_MIN_S to the max."""

    def __init__(self, interval_min_s: float = PROBE_INTERVAL_MIN_S,
                 interval_max_s: float = PROBE_INTERVAL_MAX_S) -> None:
        self.interval_min_s, self.interval_max_s = interval_min_s, interval_max_s
        self.misses = 0

    def next_pause_s(self, answered: bool) -> float:
        self.misses = 0 if answered else self.misses + 1
        return min(self.interval_max_s, self.interval_min_s * 2 ** min(self.misses, 16))
