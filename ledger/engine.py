"""The engine: the ledger's in-memory state and one handler per command.

Only the writer thread calls it. For each group of commands it opens a UnitOfWork, runs each
handler (check everything first, then change state: a refused command changes nothing), and
hands the UnitOfWork to the store to commit as one transaction. If the commit fails, the
in-memory state is thrown away and reloaded from the database, which rolled back.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import logging
from typing import Any, NamedTuple

from . import calendar as cal
from . import shared
from .account_commands import REFUND_WINDOW_US, AccountCommands, Replayed, suspended
from .consume_group import GroupResult, row_of, run_group
from .errors import InvalidArgument, NotFound, Stale, key_reused
from .lifecycle import (
    CLOCK_META_KEY,
    OVERDUE_SUSPEND_AFTER_US,
    SETTLED_META_KEY,
    Lifecycle,
)
from .model import (
    AccountState,
    AdvanceClock,
    Consume,
    CreateAccount,
    PlanSpec,
    PlanState,
    PurchasePlan,
    Reactivate,
    RefundPlan,
    SettleDay,
    TopUp,
    UpdateFeatures,
)
from .money import Region
from .notices import suspends_at
from .store import Entry, Store, UnitOfWork
from .store.blocks import Prior

DUE_HORIZON_ALL = 2**62  # every live plan's expiry

log = logging.getLogger("quota_ledger.engine")


class ConsumeOutcome(NamedTuple):
    """A Consume's result (a NamedTuple: built once per request on the hot path)."""

    request_id: str
    billable: bool
    allocations: tuple[tuple[str, int], ...]
    payg_units: int
    payg_amount_micros: int
    replayed: bool
    billing_day: str
    recorded_at_us: int
    plan_units_remaining: int
    journal_seq: int


class Engine(AccountCommands, Lifecycle):
    """The state and the hot path (Consume); administrative commands and due work come from
    the :class:`AccountCommands` and :class:`Lifecycle` mixins."""

    def __init__(self, store: Store, clock: Any, catalog: dict[str, PlanSpec]) -> None:
        self.store = store
        self.shared: bool = store.shared
        self.clock = clock
        self.catalog = catalog
        self.uow: UnitOfWork | None = None
        self.reload()

    # ------------------------------------------------------------------ state lifecycle

    def reload(self) -> None:
        """(Re)build in-memory state from the committed database; no journal replay."""
        self.accounts: dict[str, AccountState] = {}
        self.plan_index: dict[str, PlanState] = {}  # every plan object held in memory
        self.versions: dict[str, int] = {}  # shared store: the version each cached account is
        self._stale = False
        seq, last_hash, last_at = self.store.journal_tail()
        self.next_seq, self.last_hash = seq + 1, last_hash
        self.clock.floor(last_at)
        saved = self.store.meta_get(CLOCK_META_KEY)
        if saved is not None:
            self.clock.floor(int(saved))
        self._load_due(DUE_HORIZON_ALL)

    def _load_due(self, horizon_us: int) -> None:
        """The due-work queues from committed state: plans expiring by the horizon (R9),
        overdue accounts (R23) and the next day to settle (R17)."""
        self.expiries: list[tuple[int, int, str, str]] = self.store.live_plans_expiring_by(
            horizon_us)
        heapq.heapify(self.expiries)
        self.suspensions: list[tuple[int, str, int]] = [
            (suspends_at(since), acct, since)
            for acct, since in self.store.overdue_accounts()]
        heapq.heapify(self.suspensions)
        self.warnings: list[tuple[int, str, int]] = self._pending_warnings()
        heapq.heapify(self.warnings)
        settled = self.store.meta_get(SETTLED_META_KEY)
        first_at = self.store.first_entry_at()
        self.next_settle_day: str | None = (
            cal.next_day(settled) if settled is not None
            else cal.billing_day(first_at) if first_at is not None else None)

    def begin(self) -> UnitOfWork:
        self.uow = UnitOfWork(last_hash=self.last_hash, next_seq=self.next_seq)
        self._now: int | None = None
        self._looked_up: set[tuple[str, str]] = set()
        self._found: dict[tuple[str, str], Prior] = {}
        self._held: set[str] = set()
        self._exclusive = False
        self._check: tuple | None = None
        return self.uow

    def open(self, cmds: list[Any], rows: list[tuple] = ()) -> None:  # type: ignore[assignment]
        """Before a group's commands (and consume rows) run. On a shared store (PostgreSQL,
        several nodes): open the transaction and hold the group's accounts, reloading any
        that another node changed (:mod:`.shared`). Then look up the group's idempotency
        keys."""
        keys = group_keys(cmds, rows)
        if self.shared:
            if shared.open_optimistic(self, cmds, rows, keys):
                return
            shared.open_group(self, cmds, rows, keys)
        self._prefetch(keys)

    def open_due(self) -> bool:
        """A shared store's due-work group (expiries, settlements, suspensions): False when
        another node is doing it now."""
        return shared.open_group(self, [], exclusive=True, try_only=True)

    def prefetch_keys(self, cmds: list[Any], rows: list[tuple] = ()) -> None:  # type: ignore[assignment]
        """Look up the idempotency keys of a group's consumes at once, not one each; keys
        claimed later in the group are still seen through the UnitOfWork."""
        self._prefetch(group_keys(cmds, rows))

    def _prefetch(self, keys: list[tuple[str, str]]) -> None:
        self._looked_up.update(keys)
        self._found.update(self.store.find_consume_keys(keys))

    def commit(self, defer: bool = False) -> None:
        """Commit the open group; on failure reload state and re-raise (Unavailable).
        An optimistic group that lost (:class:`Stale`) drops its accounts' cached copies
        and re-raises: the writer runs it again. ``defer`` (one writer's SQLite store):
        the store's after-commit work waits for :meth:`finish` or the next group."""
        uow = self._uow
        if uow or self.shared:  # a shared store's group always ends its transaction
            try:
                if self._check is not None:
                    versions = self.store.commit(uow, self._check[1])
                elif defer and not self.shared:
                    versions = self.store.commit(uow, defer=True)
                else:
                    versions = self.store.commit(uow)
            except Stale as exc:
                self.uow = None
                shared.lost(self, exc)
                raise
            except Exception:
                self.abort()
                raise
            if self.shared:
                self._shared_written(uow, versions)
        self.last_hash, self.next_seq = uow.last_hash, uow.next_seq
        self.uow = None

    def finish(self) -> None:
        """The after-commit work a deferred commit left (one writer's SQLite store)."""
        if not self.shared:
            self.store.finish()

    def _shared_written(self, uow: UnitOfWork, versions: dict[str, int]) -> None:
        """A shared store's group wrote: the accounts' new versions, and the meta this node
        wrote itself (an optimistic group relies on it)."""
        self.versions.update(versions)
        if uow.meta and self._meta is not None:
            self._meta.update((k, uow.meta[k]) for k in shared.META_CHECKED if k in uow.meta)

    def abort(self) -> None:
        """Throw the open group away: nothing of it was written. The cached state may hold
        its changes, so it is reloaded (a shared store's, lazily: the database may be away)."""
        if self.uow is None:
            return
        self.uow = None
        if self.shared:
            self.store.rollback()
            self._stale = True
        else:
            self.reload()

    def flush(self) -> None:
        """Write what the open group holds so far (settlement reads committed figures):
        committed with SQLite; within the still-open transaction on a shared store."""
        if not self.shared:
            self.commit()
            self.begin()
            return
        uow = self._uow
        self._shared_written(uow, self.store.write(uow))
        self.last_hash, self.next_seq = uow.last_hash, uow.next_seq
        self.uow = UnitOfWork(last_hash=self.last_hash, next_seq=self.next_seq)

    @property
    def _uow(self) -> UnitOfWork:
        assert self.uow is not None, "commands run inside begin()/commit()"
        return self.uow

    def now(self) -> int:
        """The ledger's time for the open group: read once, shared by the group's entries
        (they commit at one instant); a test-clock step inside the group reads it anew."""
        if self._now is None:
            self._now = self.clock.now_us()
        return self._now

    def _set_clock(self, t_us: int) -> None:
        self.clock.set(t_us)
        self._now = None

    _now: int | None = None
    on_settled: Any = None  # callback(day, bills, seconds), e.g. metrics
    reloads = 0  # shared store: cached accounts dropped because another node changed them
    _meta: dict[str, str | None] | None = None  # shared store: the meta the node last read
    _backoff = 0  # shared store: groups still to run on the locked path (shared.lost)
    _check: tuple | None = None  # the open optimistic group's (accounts, check arguments)

    def _billing_day(self, t_us: int) -> str:
        """R1, cached for the current day: the hot path asks once per request."""
        start, end, day = self._day_cache
        if start <= t_us < end:
            return day
        day = cal.billing_day(t_us)
        self._day_cache = (cal.day_start(day), cal.day_end(day), day)
        return day

    _day_cache: tuple[int, int, str] = (0, 0, "")

    # ------------------------------------------------------------------ helpers

    def account(self, account_id: str) -> AccountState:
        if self.shared and account_id not in self._held:
            shared.hold(self, [account_id])
        acct = self.accounts.get(account_id)
        if acct is None:
            acct = self.store.load_account(account_id)
            if acct is None:
                raise NotFound(f"no account {account_id!r}; create it first",
                               reason="ACCOUNT_NOT_FOUND", account_id=account_id)
            self.accounts[account_id] = acct
            self.plan_index.update((p.plan_id, p) for p in acct.live_plans)
        return acct

    def _hold(self, account_ids: list[str]) -> None:
        """A shared store: lock these accounts now, in one order (e.g. settlement's)."""
        if self.shared:
            shared.hold(self, account_ids)

    def _claimed(self, account_id: str, kind: str, request_id: str, fingerprint: str
                 ) -> tuple[int, dict[str, Any], int] | None:
        """R12: the earlier entry for this key, if any; refuses a key reused for other content."""
        uow = self._uow
        key = (account_id, kind, request_id)
        seq = uow.keys.get(key)
        if seq is not None:  # claimed earlier in this very group: not yet in the database
            row = uow.rows[seq - uow.rows[0][0]]
            found: tuple[int, str | None, str, int] | None = (seq, row[5], row[6], row[1])
        elif key in self._looked_up:
            found = self._found.get(key)
        else:
            found = self.store.find_key(account_id, kind, request_id)
        if found is None:
            return None
        seq, fp, payload_json, at_us = found
        if fp != fingerprint:
            raise key_reused(kind, request_id)
        return seq, json.loads(payload_json), at_us

    def _append(self, at_us: int, kind: str, account_id: str | None, payload: dict[str, Any],
                request_id: str | None = None, fingerprint: str | None = None) -> int:
        uow = self._uow
        if self.next_settle_day is None:
            self.next_settle_day = cal.billing_day(at_us)
        return uow.append(Entry(uow.next_seq, at_us, kind, account_id, request_id, fingerprint,
                                payload))

    def _touch(self, acct: AccountState) -> None:
        self._uow.accounts[acct.account_id] = acct

    def execute(self, cmd: Any) -> Any:
        if type(cmd) is Consume:  # the hot path: its outcome holds no live state
            return self.consume(cmd)
        handler = self._handlers.get(type(cmd))
        if handler is None:
            raise NotImplementedError(type(cmd).__name__)
        return _snapshot(handler(self, cmd))

    # ------------------------------------------------------------------ Consume (R3-R11)

    def consume(self, c: Consume) -> ConsumeOutcome:
        """One Consume: a consume group of one (:mod:`.consume_group`), as an outcome."""
        out = run_group(self, [row_of(c)])
        if out.errors:
            raise out.errors[0]
        at_us, day = out.replays.get(0, (out.at_us, out.day))
        return ConsumeOutcome(c.request_id, out.billable[0], out.allocations[0],
                              out.payg_units[0], out.payg_micros[0], out.replayed[0], day,
                              at_us, out.remaining[0], out.seq[0])

    def consume_rows(self, rows: list[tuple]) -> GroupResult:
        """A batch of consumes as one group of plain values (issue 19)."""
        return run_group(self, rows)

    _handlers: dict[type, Any] = {
        Consume: consume,
        CreateAccount: AccountCommands.create_account,
        TopUp: AccountCommands.top_up,
        UpdateFeatures: AccountCommands.update_features,
        PurchasePlan: AccountCommands.purchase_plan,
        AdvanceClock: Lifecycle.advance_clock,
        SettleDay: Lifecycle.settle_day,
        RefundPlan: AccountCommands.refund_plan,
        Reactivate: AccountCommands.reactivate,
    }


def group_keys(cmds: list[Any], rows: list[tuple] = ()) -> list[tuple[str, str]]:  # type: ignore[assignment]
    """The idempotency keys of a group's consumes (commands, then consume rows)."""
    keys = [(c.account_id, c.request_id) for c in cmds if type(c) is Consume]
    keys += [(r[0], r[1]) for r in rows]
    return keys


def _snapshot(result: Any) -> Any:
    """Results leave the writer thread: hand out copies of live state, never the objects the
    writer goes on changing (a reply is converted on the event loop's thread)."""
    if isinstance(result, Replayed):
        return Replayed(_snapshot(result.value))
    if isinstance(result, AccountState):
        return dataclasses.replace(result, live_plans=[])
    if isinstance(result, PlanState):
        return dataclasses.replace(result)
    return result


__all__ = ["CLOCK_META_KEY", "ConsumeOutcome", "Engine", "InvalidArgument",
           "OVERDUE_SUSPEND_AFTER_US", "REFUND_WINDOW_US", "Region", "Replayed", "SETTLED_META_KEY",
           "suspended"]
