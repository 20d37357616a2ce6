"""The PostgreSQL store (issue 11): any number of ledger nodes on one database.

Each node is one ``quota-ledger serve`` process with its own writer. What keeps several of
them correct, all inside PostgreSQL (no home-made cluster):

- **A node number**, held with a session advisory lock for the life of the writer
  connection: each node appends to its own hash chain (R25 as amended), so nodes never
  serialize on one global chain.
- **A group transaction** (:meth:`PgStore.open_group`): a shared advisory lock that due work
  and settlement take exclusively (so no consume lands on a day being settled, and every
  day is settled once), then one advisory lock per account of the group, taken in one
  order (sorted keys: no deadlocks), then the accounts' versions: a node's cached account
  is reloaded when another node changed it.
- **Idempotency keys** (R12) are looked up after the account is locked and inserted in the
  same transaction as the entry that claims them (TRAPS: claim the key with the write).
- **Group commit** per node: one transaction per group in two round trips (issue 20):
  its opening (the locks, the shared meta, the versions and the group's keys,
  :meth:`PgStore.open_group_with`) and its writes with the COMMIT, each step's statements
  queued in one psycopg pipeline (:mod:`.pg_write`: set-based statements for many rows,
  scalar ones for a few).

Connection failures raise :class:`Unavailable` (the caller retries; nothing was
acknowledged); the next group reconnects. Credentials are never logged: :func:`mask_url`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from ..errors import Stale, Unavailable
from ..faults import armed, fault
from . import blocks, pg_write
from .base import StoreReads
from .journal import GENESIS_HASH, UnitOfWork
from .pg_schema import PG_MIGRATIONS, PG_SCHEMA_VERSION
from .pg_write import (
    CHECK_SQL,
    OPEN_ONE_SQL,
    STALE_SQLSTATE,
    fetch_all,
    queue_hold,
    queue_keys,
    queue_write,
)
from .sqlite import DatabaseLocked
from .urls import mask_url

LOCK_CLASS = 0x514C  # quota-ledger's space of two-int advisory locks ('QL')
SETTLE_LOCK = 1  # shared by every group; exclusive for due work, settlement, the test clock
MIGRATE_LOCK = 2
NODE_LOCK_BASE = 1_000  # + the node number: held by the node's writer connection
NODES_MAX = 1_000
READERS_MAX = 8  # pooled connections for the read RPCs
CONNECT_TIMEOUT_S = 5
BLOCK_CACHE_MAX = 64  # decoded blocks kept for replays (R12)
CLOCK_SQL = "SELECT clock_timestamp()"
LOCK_KEYS_CACHED = 1 << 16  # accounts whose advisory-lock key is kept (a BLAKE2b each)

@lru_cache(maxsize=LOCK_KEYS_CACHED)
def account_lock_key(account_id: str) -> int:
    """A signed 64-bit advisory-lock key for an account (a collision only serializes two
    accounts more than needed)."""
    digest = hashlib.blake2b(account_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@lru_cache(maxsize=256)
def pg_sql(sql: str) -> str:
    """The shared queries are written with SQLite's ``?``; psycopg takes ``%s``."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Rows:
    """A materialized result with the parts of a DB-API cursor the queries use."""

    def __init__(self, rows: list[tuple], description: Any) -> None:
        self.rows, self.description = rows, description

    def fetchone(self) -> tuple | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple]:
        return self.rows

    def __iter__(self):  # noqa: ANN204
        return iter(self.rows)


class PgConn:
    """An sqlite3-shaped face on one psycopg connection (the writer's open transaction)."""

    def __init__(self, raw: psycopg.Connection) -> None:
        self.raw = raw

    def execute(self, sql: str, params: tuple | list = ()) -> psycopg.Cursor:
        return self.raw.execute(pg_sql(sql), params)


class PgReader:
    """Reads for the RPCs and metrics: each statement on a pooled autocommit connection."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    def execute(self, sql: str, params: tuple | list = ()) -> _Rows:
        try:
            with self.pool.connection() as conn:
                cur = conn.execute(pg_sql(sql), params)
                return _Rows(cur.fetchall() if cur.description else [], cur.description)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise Unavailable(f"the journal database cannot be read: {exc}") from exc


    @contextmanager
    def snapshot(self) -> Iterator[PgConn]:
        """One pooled connection in a read-only REPEATABLE READ transaction: every statement
        sees one snapshot (see ``Store.snapshot``)."""
        try:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield PgConn(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise Unavailable(f"the journal database cannot be read: {exc}") from exc


class PgStore(StoreReads):
    """The journal and derived tables in PostgreSQL, shared by any number of nodes."""

    shared = True

    def __init__(self, url: str, *, lock: bool = True) -> None:
        self.url = url
        self.path = mask_url(url)
        self.node = 0  # claimed below (lock=True); tools that only read claim none
        self._claim = lock
        self.raw: psycopg.Connection | None = None
        self._connect()
        self._migrate()
        if lock:
            self.node = self._claim_node()
        self.pool = ConnectionPool(url, min_size=1, max_size=READERS_MAX, open=True,
                                   kwargs={"autocommit": True,
                                           "connect_timeout": CONNECT_TIMEOUT_S})
        self._reader = PgReader(self.pool)
        self.commits = 0
        self.entries_committed = 0
        self._blocks: dict[tuple[int, int], tuple[int, str, list]] = {}
        # Contention (issue 20): seconds groups waited for their accounts' locks, as
        # PostgreSQL's own clock saw them (clock_timestamp() before and after the locks)
        self.lock_wait_s = 0.0
        # The group's consume keys and their rows, read by open_group_with
        self._key_rows: tuple[list[tuple[str, str]], list[tuple]] | None = None

    # ------------------------------------------------------------------ connections

    def _connect(self) -> None:
        try:
            # Statements are prepared on their first use (prepare_threshold 0): psycopg
            # 3.3 marks a statement prepared on its threshold-th use even when a pipeline
            # that an earlier error aborted (an optimistic group that lost) skipped its
            # Parse, and every later use then fails ("prepared statement _pg3_1 does not
            # exist"); a first use is checked against its result.
            self.raw = psycopg.connect(self.url, autocommit=True, prepare_threshold=0,
                                       connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as exc:
            raise Unavailable(f"cannot connect to the journal database {self.path}: "
                              f"{_first_line(exc)}") from exc
        self.conn = PgConn(self.raw)

    def _claim_node(self, only: int | None = None) -> int:
        """The lowest node number no live node holds (or exactly ``only``, on reconnect)."""
        for n in ([only] if only else range(1, NODES_MAX + 1)):
            got = self.raw.execute("SELECT pg_try_advisory_lock(%s, %s)",  # type: ignore[union-attr]
                                   (LOCK_CLASS, NODE_LOCK_BASE + n)).fetchone()[0]
            if got:
                return n
        if only:
            raise Unavailable(f"node {only}'s number was taken while the database was away")
        raise DatabaseLocked(f"{self.path} already has {NODES_MAX} ledger nodes")

    def ensure(self) -> None:
        """Reconnect now if the writer connection was lost (before reloading state)."""
        self._ensure()

    def _ensure(self) -> psycopg.Connection:
        """The writer connection, reconnected (same node number) after a failure."""
        if self.raw is None or self.raw.closed or self.raw.broken:
            if self.raw is not None:
                self.raw.close()
            self._connect()
            if self._claim:
                self._claim_node(self.node)
        return self.raw  # type: ignore[return-value]

    def _migrate(self) -> None:
        c = self.raw
        assert c is not None
        c.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, MIGRATE_LOCK))
        try:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            row = c.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > PG_SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema version {version}, newer than "
                                   f"this build's {PG_SCHEMA_VERSION}; upgrade quota-ledger")
            for target in range(version + 1, PG_SCHEMA_VERSION + 1):
                with c.transaction():
                    c.execute(PG_MIGRATIONS[target - 1], prepare=False)  # several statements
                    c.execute("DELETE FROM schema_version")
                    c.execute("INSERT INTO schema_version VALUES (%s)", (target,))
        finally:
            c.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, MIGRATE_LOCK))

    def close(self) -> None:
        self.pool.close()
        if self.raw is not None:
            self.raw.close()
            self.raw = None

    def checkpoint(self) -> None:
        """PostgreSQL checkpoints by itself."""

    def reader(self) -> PgReader:
        return self._reader

    def snapshot(self) -> AbstractContextManager[PgConn]:
        return self._reader.snapshot()

    # ------------------------------------------------------------------ writer-side loads

    def journal_tail(self) -> tuple[int, bytes, int]:
        """This node's chain: (last seq, last hash, last at_us)."""
        row = self.conn.execute("SELECT seq, hash, at_us FROM journal WHERE node = ?"
                                " ORDER BY seq DESC LIMIT 1", (self.node,)).fetchone()
        return (row[0], bytes(row[1]), row[2]) if row else (0, GENESIS_HASH, 0)

    def first_entry_at(self) -> int | None:
        row = self.conn.execute("SELECT at_us FROM journal ORDER BY gseq LIMIT 1").fetchone()
        return row[0] if row else None

    def purchase_order(self, seq: int) -> int:
        """A plan's place among its account's purchases (R8 ties): from one sequence, drawn
        under the account's lock, so it grows with every later purchase on any node."""
        return self.conn.execute("SELECT nextval('purchase_order')").fetchone()[0]

    # ------------------------------------------------------------------ the group transaction

    def open_group(self, exclusive: bool, *, try_only: bool = False) -> dict[str, str] | None:
        """BEGIN, then the settlement lock (shared, or exclusive for due work); returns the
        shared meta (clock, settled day), or None when ``try_only`` found it busy."""
        try:
            c = self._ensure()
            c.execute("BEGIN")
            if exclusive and try_only:
                if not c.execute("SELECT pg_try_advisory_xact_lock(%s, %s)",
                                 (LOCK_CLASS, SETTLE_LOCK)).fetchone()[0]:
                    c.execute("ROLLBACK")
                    return None
            else:
                fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
                c.execute(f"SELECT {fn}(%s, %s)", (LOCK_CLASS, SETTLE_LOCK))
            return dict(c.execute("SELECT key, value FROM meta").fetchall())
        except psycopg.Error as exc:
            self.rollback()
            raise Unavailable(f"the journal database is unavailable: {_first_line(exc)}"
                              ) from exc

    def open_group_with(self, exclusive: bool, account_ids: list[str],
                        keys: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, int]]:
        """``open_group``, ``hold_accounts`` and the keys' lookup in one round trip (issue
        20), pipelined in this order: BEGIN, the settlement lock, the shared meta, the
        accounts' locks in key order (none when exclusive), their versions and the rows of
        the group's consume ``keys`` (read under those locks), kept for
        ``find_consume_keys``. Returns (meta, versions)."""
        if not exclusive and pg_write.one_call_open(account_ids, keys):
            return self._open_calls(account_ids, keys)
        fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        settle = (f"SELECT {fn}(%s, %s)", (LOCK_CLASS, SETTLE_LOCK))
        lock_keys = None if exclusive else _lock_keys(account_ids)
        try:
            c = self._ensure()
            early = None
            if keys and pg_write.KEYS_OUTSIDE_LOCK:  # planted bug (issue 23): read first
                with c.pipeline():
                    early = fetch_all(queue_keys(c, keys))
            with c.pipeline():
                c.execute("BEGIN")
                c.execute(*settle)
                meta = c.execute("SELECT key, value FROM meta")
                clocks = []  # the server's clock around the accounts' locks: their wait
                if lock_keys:  # none for an exclusive group, or one naming no account
                    clocks.append(c.execute(CLOCK_SQL))
                versions = queue_hold(c, account_ids, lock_keys) if account_ids else []
                if clocks:
                    clocks.append(c.execute(CLOCK_SQL))
                found = queue_keys(c, keys) if keys and early is None else []
            self._key_rows = (keys, early if early is not None else fetch_all(found))
            if clocks:
                t0, t1 = (cur.fetchone()[0] for cur in clocks)  # type: ignore[index]
                self.lock_wait_s += max(0.0, (t1 - t0).total_seconds())
            return dict(meta.fetchall()), dict(fetch_all(versions))
        except psycopg.Error as exc:
            self.rollback()
            raise Unavailable(f"the journal database is unavailable: {_first_line(exc)}"
                              ) from exc

    def _open_calls(self, account_ids: list[str], keys: list[tuple[str, str]]
                    ) -> tuple[dict[str, str], dict[str, int]]:
        """``open_group_with`` for a small group whose accounts have at most one key each
        (``pg_write.one_call_open``): BEGIN and one call of ``ql_open_one`` per account, in
        the order of their lock keys, which run the same statements in the same order on
        the server (schema v3); the first call alone takes the settlement lock and reads
        the meta."""
        request_of = dict(keys)
        try:
            c = self._ensure()
            with c.pipeline():
                c.execute("BEGIN")
                curs = [(a, request_of.get(a), c.execute(OPEN_ONE_SQL, (
                    LOCK_CLASS if i == 0 else None, SETTLE_LOCK, account_lock_key(a), a,
                    request_of.get(a))))
                    for i, a in enumerate(sorted(account_ids, key=account_lock_key))]
            got = [(a, r, cur.fetchone()) for a, r, cur in curs]
        except psycopg.Error as exc:
            self.rollback()
            raise Unavailable(f"the journal database is unavailable: {_first_line(exc)}"
                              ) from exc
        versions, found = {}, []
        for account_id, request_id, (_, _, version, node, seq, idx, waited_s) in got:
            self.lock_wait_s += waited_s
            if version is not None:
                versions[account_id] = version
            if node is not None:
                found.append((account_id, request_id, node, seq, idx))
        self._key_rows = (keys, found)
        meta_keys, meta_values = got[0][2][0], got[0][2][1]
        return dict(zip(meta_keys or (), meta_values or (), strict=True)), versions

    def check_args(self, account_ids: list[str], versions: list[str], meta: dict[str, Any]
                   ) -> tuple:
        """``ql_check``'s arguments for an optimistic group over these (sorted) accounts,
        decided on these versions and this meta (:func:`ledger.shared.open_optimistic`)."""
        (clock_key, clock), (settled_key, settled) = meta.items()
        return (LOCK_CLASS, SETTLE_LOCK, " ".join(map(str, _lock_keys(account_ids))),
                " ".join(account_ids), " ".join(versions), clock_key, clock, settled_key,
                settled)

    def hold_accounts(self, account_ids: list[str], *, lock: bool = True) -> dict[str, int]:
        """Lock the accounts in key order (no deadlocks) and return their versions."""
        try:
            c = self.raw
            assert c is not None
            with c.pipeline():
                got = queue_hold(c, account_ids, _lock_keys(account_ids) if lock else None)
            return dict(fetch_all(got))
        except psycopg.Error as exc:
            self.rollback()
            raise Unavailable(f"the journal database is unavailable: {_first_line(exc)}"
                              ) from exc

    _written = False  # the open transaction has rows in it (PgStore.write)

    def rollback(self) -> None:
        self._written = False
        try:
            if self.raw is not None and not self.raw.closed:
                self.raw.execute("ROLLBACK")
        except psycopg.Error:
            self.raw.close()  # type: ignore[union-attr]

    def write(self, uow: UnitOfWork) -> dict[str, int]:
        """Write a group's rows inside the open transaction; returns the new versions."""
        uow.seal_block()
        self._written = self._written or bool(uow)
        try:
            with self.raw.pipeline():  # type: ignore[union-attr]
                got = queue_write(self.raw, self.node, uow)  # type: ignore[arg-type]
            return dict(fetch_all(got)) if got is not None else {}
        except psycopg.Error as exc:
            self.rollback()
            raise Unavailable(f"the journal could not be written: {_first_line(exc)}"
                              ) from exc

    def commit(self, uow: UnitOfWork, check: tuple | None = None) -> dict[str, int]:
        """Write the group and COMMIT, pipelined: one round trip (issue 20). Raises
        Unavailable; then nothing was written.

        ``check`` (an optimistic group, :func:`ledger.shared.open_optimistic`): no
        transaction is open yet, and BEGIN and ``ql_check(*check)`` lead the same pipeline;
        when the check finds the group's accounts, clock or settled day moved, or another
        node claimed one of its keys, nothing is written and :class:`Stale` is raised."""
        # The crash campaign's points, as SQLite's commit has them, for a transaction that
        # writes (a settlement may have written its part already, through flush).
        writes = bool(uow) or self._written
        if writes:
            fault("before_commit")
        uow.seal_block()
        self._written = False
        try:
            c = self._ensure() if check is not None else self.raw
            assert c is not None
            with c.pipeline() as p:
                checked = None
                if check is not None:
                    c.execute("BEGIN")
                    checked = c.execute(CHECK_SQL, check)
                pending = queue_write(c, self.node, uow)
                if writes:
                    if checked is not None and armed("during_commit"):
                        p.sync()  # the point's meaning: the locks held, the rows written
                    fault("during_commit")
                c.execute("COMMIT")
            versions = dict(fetch_all(pending)) if pending is not None else {}
            if checked is not None:
                self.lock_wait_s += checked.fetchone()[0]  # type: ignore[index]
        except psycopg.Error as exc:
            self.rollback()
            if check is not None:
                if exc.sqlstate == STALE_SQLSTATE:
                    self.lock_wait_s += float(exc.diag.message_hint or 0)
                    raise Stale(_first_line(exc), (exc.diag.message_detail or "").split()
                                ) from exc
                if (isinstance(exc, psycopg.errors.UniqueViolation)
                        and exc.diag.constraint_name == "consume_keys_pkey"):
                    raise Stale("one of the group's keys was claimed before", [],
                                key_claimed=True) from exc
            raise Unavailable(f"the journal could not be committed: {_first_line(exc)}"
                              ) from exc
        self.commits += 1
        self.entries_committed += len(uow.rows)
        return versions

    # ------------------------------------------------------------------ consume keys (R12)

    def find_consume_keys(self, keys: list[tuple[str, str]]
                          ) -> dict[tuple[str, str], blocks.Prior]:
        """R12 for a group's consumes, read under the accounts' locks."""
        pre, self._key_rows = self._key_rows, None
        if not keys:
            return {}
        if pre is not None and pre[0] is keys:  # read by open_group_with
            rows = pre[1]
        else:
            with self.raw.pipeline():  # type: ignore[union-attr]
                got = queue_keys(self.raw, keys)  # type: ignore[arg-type]
            rows = fetch_all(got)
        found = {}
        for account_id, request_id, node, seq, idx in rows:
            if idx < 0:  # a one-row consume, copied from an SQLite ledger written before blocks
                fingerprint, payload, at_us = self.conn.execute(
                    "SELECT fingerprint, payload, at_us FROM journal WHERE node = ? AND seq = ?",
                    (node, seq)).fetchone()
                found[(account_id, request_id)] = blocks.prior_of_entry(
                    seq, fingerprint, json.loads(payload), at_us)
                continue
            at_us, day, items = self._block(node, seq)
            found[(account_id, request_id)] = blocks.prior_of_item(seq, at_us, day, items[idx])
        return found

    def _block(self, node: int, seq: int) -> tuple[int, str, list]:
        cached = self._blocks.get((node, seq))
        if cached is None:
            at_us, payload = self.conn.execute(
                "SELECT at_us, payload FROM journal WHERE node = ? AND seq = ?",
                (node, seq)).fetchone()
            cached = (at_us, *blocks.decode(payload))
            if len(self._blocks) >= BLOCK_CACHE_MAX:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[(node, seq)] = cached
        return cached


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _lock_keys(account_ids: list[str]) -> list[int]:
    """The accounts' advisory lock keys in one sorted order (no deadlocks)."""
    return sorted({account_lock_key(a) for a in account_ids})


__all__ = ["PgConn", "PgStore", "account_lock_key", "pg_sql"]
