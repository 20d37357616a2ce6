"""The engine on a shared store: several nodes, one PostgreSQL database (issue 11).

A node's engine keeps the same in-memory state as with SQLite, but it is only a cache:
another node may change any account at any moment. So every group runs inside one
transaction that first

1. takes the settlement lock: shared by every group, exclusive for settlement, due work
   and the test clock (``SettleDay``, ``AdvanceClock``). No Consume can then land on a day
   being settled, and every day, expiry and suspension is done once, by one node;
2. floors the node's clock to the database's: the shared test clock (CONTRACT: with
   ``--test-clock`` every node sees the same time), and the end of the last settled day,
   so a node whose wall clock lags never records on a settled day (R26);
3. holds the group's accounts (advisory locks in one sorted order: no deadlocks) and
   reloads each account whose version another node moved.

Unrelated accounts never wait for each other (R25 as amended): only the accounts a group
names are locked, and the settlement lock is shared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import calendar as cal
from .errors import Unavailable
from .faults import planted
from .lifecycle import CLOCK_META_KEY, SETTLED_META_KEY
from .model import AdvanceClock, RefundPlan, SettleDay

if TYPE_CHECKING:
    from .engine import Engine

GLOBAL_COMMANDS = (SettleDay, AdvanceClock)
_STALE_CACHE = planted("stale_cache")  # run with the settlement lock exclusive


def open_group(engine: Engine, cmds: list[Any], rows: list[tuple] = (),  # type: ignore[assignment]
               keys: list[tuple[str, str]] | None = None, *, exclusive: bool | None = None,
               try_only: bool = False) -> bool:
    """Open a shared store's group: ``cmds`` and consume ``rows`` (account id first).

    When the group's accounts are known without asking the database (no ``RefundPlan``),
    the transaction, the settlement lock, the shared meta, the accounts' locks and versions
    and the group's consume ``keys`` are one round trip (issue 20,
    ``PgStore.open_group_with``)."""
    if engine._stale:  # a failed group or a lost connection: start again from the database
        try:
            engine.store.ensure()
            engine.reload()
        except Exception as exc:
            engine.store.rollback()
            raise Unavailable(f"the journal database is unavailable: {exc}") from exc
    if exclusive is None:
        exclusive = any(type(c) in GLOBAL_COMMANDS for c in cmds)
    versions = None
    if try_only or any(type(c) is RefundPlan for c in cmds):  # its account: a query
        meta = engine.store.open_group(exclusive, try_only=try_only)
        if meta is None:
            return False
    else:
        ids = _accounts(engine, cmds, rows)
        meta, versions = engine.store.open_group_with(exclusive, ids, keys or [])
    engine._exclusive = exclusive
    engine._now = None
    if CLOCK_META_KEY in meta:
        engine.clock.floor(int(meta[CLOCK_META_KEY]))
    settled = meta.get(SETTLED_META_KEY)
    if settled is not None:
        engine.clock.floor(cal.day_end(settled))
    if exclusive:  # due work and settlement run here: see everything every node did
        horizon = max([engine.clock.now_us(),
                       *(c.to_us for c in cmds if type(c) is AdvanceClock)])
        engine._load_due(horizon)
    if versions is None:
        hold(engine, _accounts(engine, cmds, rows))
    else:
        hold(engine, ids, versions)
    return True


def _accounts(engine: Engine, cmds: list[Any], rows: list[tuple]) -> list[str]:
    """The accounts a group's commands and consume rows name, sorted."""
    return sorted({*group_accounts(engine, cmds), *(r[0] for r in rows)})


def group_accounts(engine: Engine, cmds: list[Any]) -> list[str]:
    ids = set()
    for c in cmds:
        account_id = getattr(c, "account_id", None)
        if account_id:
            ids.add(account_id)
        elif type(c) is RefundPlan:  # a plan never changes account
            plan = engine.plan_index.get(c.plan_id)
            found = [plan] if plan else engine.store.load_plans("WHERE plan_id = ?",
                                                                (c.plan_id,))
            if found:
                ids.add(found[0].account_id)
    return sorted(ids)


def hold(engine: Engine, account_ids: list[str], versions: dict[str, int] | None = None
         ) -> None:
    """Lock these accounts for the open transaction (exclusive groups need no lock: nobody
    else runs) and drop cached copies that another node has changed since. ``versions``:
    the accounts are locked already, and these are their versions."""
    want = [a for a in account_ids if a not in engine._held]
    if not want:
        return
    if versions is None:
        versions = engine.store.hold_accounts(want, lock=not engine._exclusive)
    for account_id in want:
        version = versions.get(account_id)
        if (account_id in engine.accounts and engine.versions.get(account_id) != version
                and not _STALE_CACHE):  # planted bug "stale_cache" (issue 23) skips this
            evict(engine, account_id)
            engine.reloads += 1  # another node changed it (issue 20: contention)
        if version is not None:
            engine.versions[account_id] = version
    engine._held.update(want)
    missing = [a for a in want if a in versions and a not in engine.accounts]
    if len(missing) > 1:  # one at a time is Engine.account's own path
        for account_id, acct in engine.store.load_accounts(missing).items():
            engine.accounts[account_id] = acct
            engine.plan_index.update((p.plan_id, p) for p in acct.live_plans)


def evict(engine: Engine, account_id: str) -> None:
    acct = engine.accounts.pop(account_id, None)
    engine.versions.pop(account_id, None)
    if acct is not None:
        for p in acct.live_plans:
            engine.plan_index.pop(p.plan_id, None)
