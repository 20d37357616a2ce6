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

A group of consumes whose accounts are all cached is optimistic (issue 20,
:func:`open_optimistic`): it is decided on the cached accounts and meta without asking the
database, and its commit checks, under the same locks taken in the same order, that nothing
it was decided on has moved, in the round trip that writes it. When something had moved
(another node changed an account, settled a day, stepped the shared clock or claimed one of
the group's keys), nothing is written: the writer runs the group again on the locked path
above, and, unless what it found was a key claimed before (a retry's), the next
``OPTIMISTIC_BACKOFF_GROUPS`` groups go that way too (nodes that share accounts, as with
round-robin routing, would otherwise lose often).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import calendar as cal
from .errors import Stale, Unavailable
from .faults import PLANTED, planted
from .lifecycle import CLOCK_META_KEY, SETTLED_META_KEY
from .model import _BILLABLE, AccountStatus, AdvanceClock, Consume, RefundPlan, SettleDay

if TYPE_CHECKING:
    from .engine import Engine

GLOBAL_COMMANDS = (SettleDay, AdvanceClock)
_STALE_CACHE = planted("stale_cache")  # run with the settlement lock exclusive
# The planted bugs (issue 23) live on the locked path: a process with one runs only that.
OPTIMISTIC = PLANTED is None
OPTIMISTIC_BACKOFF_GROUPS = 32  # groups on the locked path after an optimistic one lost
META_CHECKED = (CLOCK_META_KEY, SETTLED_META_KEY)  # the meta an optimistic group relies on
_SUSPENDED = AccountStatus.SUSPENDED


def open_optimistic(engine: Engine, cmds: list[Any], rows: list[tuple],
                    keys: list[tuple[str, str]]) -> bool:
    """Open a group of consumes on cached state alone, when every account it names is
    cached and nothing has failed since: True when opened (``engine._check``: its accounts,
    and the arguments of the check that its commit sends), False for the locked path
    (:func:`open_group`)."""
    if not OPTIMISTIC or engine._stale or engine._meta is None:
        return False
    if engine._backoff:
        engine._backoff -= 1
        return False
    if any(type(c) is not Consume for c in cmds):
        return False
    # Only requests that claim their key when they are not replays: a dry run, a
    # non-billable request (R3) or one on a suspended account (R23) claims none, so a key
    # claimed before would not be found at the INSERT, and the replay or the refusal (R12)
    # that the locked path gives would be missed.
    if any(r[8] or (r[4], r[3], r[5]) not in _BILLABLE for r in rows) or any(
            c.dry_run or (c.architecture, c.captcha_type, c.step) not in _BILLABLE
            for c in cmds):
        return False
    ids = _accounts(engine, cmds, rows)
    accounts, versions = engine.accounts, engine.versions
    held = []
    for account_id in ids:
        version = versions.get(account_id)
        acct = accounts.get(account_id)
        if version is None or acct is None or acct.status is _SUSPENDED:
            return False
        held.append(str(version))
    if not ids:
        return False
    engine._check = (ids, engine.store.check_args(ids, held, engine._meta))
    engine._exclusive = False
    engine._now = None
    engine._held.update(ids)
    engine._looked_up.update(keys)  # assumed unclaimed: the key's INSERT checks it (R12)
    return True


def lost(engine: Engine, exc: Stale) -> None:
    """An optimistic group's commit found something moved: nothing was written. Its
    accounts' cached copies hold its changes, so they go; the locked path reloads them."""
    for account_id in engine._check[0] if engine._check else ():
        evict(engine, account_id)
    engine.reloads += len(exc.accounts)  # another node changed these (contention)
    if not exc.key_claimed:  # a retry's key is no sign of contention: only its group redone
        engine._meta = None  # read again by the locked path
    engine._backoff = 1 if exc.key_claimed else OPTIMISTIC_BACKOFF_GROUPS


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
    engine._meta = {k: meta.get(k) for k in META_CHECKED}
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
