"""Where the writer's time goes, phase by phase, for `make bench-writer` (issue 19, point 4).

Wraps, in this process only, the functions each phase runs and sums their time on the
writer's thread:

- ``validation``: ``server.convert.consume_row`` turning a ``ConsumeRequest`` into a row,
  measured apart on requests of the bench's shape (the writer is fed commands directly);
- ``key lookups``: ``Engine._prefetch`` (memtable, filter, runs);
- ``engine``: the rest of begin-to-commit (due work, every command);
- ``block``: ``UnitOfWork.seal_block`` (MessagePack and the SHA-256 chain);
- ``rows``: the journal and derived-table statements (``GroupRows.write``);
- ``keys``: the key index after a commit (``add``, ``committed``) and its slice written
  inside the transaction (``write_step``);
- ``commit``: the rest of ``Store.commit``: BEGIN, COMMIT and its fsync.

Each figure is µs per request answered; the wrappers themselves cost well under 1 µs a
request (one call each per group, not per request).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from quota_ledger.v1 import quota_ledger_pb2 as qpb

from ledger.store import journal
from ledger.store.keyindex import KeyIndex
from ledger.store.sqlite_rows import GroupRows
from server import convert

PHASES = ("validation", "key lookups", "engine", "block", "rows", "keys", "commit")
VALIDATION_REQUESTS = 20_000


class Phases:
    """Seconds per phase, from wrappers installed on the given engine's objects and on the
    classes whose methods the group commit calls (restored by :meth:`close`)."""

    def __init__(self, engine: Any) -> None:
        self.s = dict.fromkeys(PHASES, 0.0)
        self._undo: list[Callable[[], None]] = []
        self._wrap(engine, "_prefetch", "key lookups")
        self._wrap(journal.UnitOfWork, "seal_block", "block")
        self._wrap(GroupRows, "write", "rows")
        for name in ("add", "committed", "write_step"):
            self._wrap(KeyIndex, name, "keys")

    def _wrap(self, owner: Any, name: str, phase: str) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        sums = self.s

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sums[phase] = sums.get(phase, 0.0) + time.perf_counter() - t

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()

    def snapshot(self) -> dict[str, float]:
        return dict(self.s)

    def per_request_us(self, before: dict[str, float], engine_s: float, commit_s: float,
                       requests: int, validation_us: float) -> dict[str, float]:
        """µs per request of each phase between ``before`` and now; ``engine_s`` and
        ``commit_s`` are the bench's own begin-to-commit and commit sums over the same span."""
        d = {k: self.s.get(k, 0.0) - before.get(k, 0.0) for k in self.s}
        keys_in_commit = d["keys"]  # add, committed and write_step all run inside commit()
        out = {"validation": validation_us,
               "key lookups": d["key lookups"],
               "engine": engine_s - d["key lookups"],
               "block": d["block"], "rows": d["rows"], "keys": keys_in_commit,
               "commit": commit_s - d["block"] - d["rows"] - keys_in_commit}
        return {k: (v if k == "validation" else v / requests * 1e6) for k, v in out.items()}


def validation_us(account_ids: list[str]) -> float:
    """``convert.consume_row`` per request, on ConsumeRequests like the bench's commands."""
    reqs = [qpb.ConsumeRequest(account_id=account_ids[i % len(account_ids)],
                               request_id=str(uuid.uuid4()), region=1 + i % 2,
                               captcha_type=1, architecture=1, step=1, quantity=1)
            for i in range(VALIDATION_REQUESTS)]
    t = time.perf_counter()
    for r in reqs:
        convert.consume_row(r)
    return (time.perf_counter() - t) / len(reqs) * 1e6
