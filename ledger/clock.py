"""The ledger's clock (R2): injected everywhere, never read from inside the domain.

Both clocks only move forward: the system clock holds its last reading when the host's clock
steps back, and starts no earlier than the newest journal entry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .errors import InvalidArgument


class SystemClock:
    """Wall time in microseconds, made non-decreasing."""

    is_test_clock = False

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def floor(self, t_us: int) -> None:
        with self._lock:
            self._last = max(self._last, t_us)

    def now_us(self) -> int:
        with self._lock:
            self._last = max(self._last, time.time_ns() // 1_000)
            return self._last


class TestClock:
    """Moves only when told to (the TestClock service); never backwards."""

    is_test_clock = True
    __test__ = False  # not a pytest class

    def __init__(self, start_us: int | None = None) -> None:
        self._t = start_us if start_us is not None else time.time_ns() // 1_000
        self._lock = threading.Lock()

    def floor(self, t_us: int) -> None:
        with self._lock:
            self._t = max(self._t, t_us)

    def now_us(self) -> int:
        return self._t

    def set(self, t_us: int) -> None:
        with self._lock:
            if t_us < self._t:
                raise InvalidArgument(
                    f"the ledger's time never goes backwards: {t_us} is before {self._t} (R2)")
            self._t = t_us


class SharedTestClock(TestClock):
    """The test clock of several nodes on one database (CONTRACT: with ``--test-clock`` the
    clock lives in the database and every node sees it): each reading first catches up
    with the time the database holds, which ``read_db_us`` returns (or None)."""

    def __init__(self, read_db_us: Callable[[], int | None]) -> None:
        super().__init__()
        self._read_db_us = read_db_us

    def now_us(self) -> int:
        db_us = self._read_db_us()
        if db_us is not None:
            self.floor(db_us)
        return self._t
