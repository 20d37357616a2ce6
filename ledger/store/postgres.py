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
- **Group commit** per node: one transaction per group, every table written with
  ``executemany`` (pipelined by psycopg: one round trip per statement kind, not per row).

Connection failures raise :class:`Unavailable` (the caller retries; nothing was
acknowledged); the next group reconnects. Credentials are never logged: :func:`mask_url`.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from ..errors import Unavailable
from ..faults import fault
from . import blocks
from .base import StoreReads
from .journal import GENESIS_HASH, UnitOfWork
from .pg_schema import PG_MIGRATIONS, PG_SCHEMA_VERSION
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

    # ------------------------------------------------------------------ connections

    def _connect(self) -> None:
        try:
            self.raw = psycopg.connect(self.url, autocommit=True,
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
                    c.execute(PG_MIGRATIONS[target - 1])
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

    def hold_accounts(self, account_ids: list[str], *, lock: bool = True) -> dict[str, int]:
        """Lock the accounts in key order (no deadlocks) and return their versions."""
        try:
            c = self.raw
            assert c is not None
            if lock:
                keys = sorted({account_lock_key(a) for a in account_ids})
                c.execute("SELECT pg_advisory_xact_lock(k) FROM unnest(%b::bigint[]) AS k",
                          (keys,))
            return dict(c.execute("SELECT account_id, version FROM accounts"
                                  " WHERE account_id = ANY(%s)", (account_ids,)).fetchall())
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
            return _write(self.raw, self.node, uow)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            self.rollback()
            raise Unavailable(f"the journal could not be written: {_first_line(exc)}"
                              ) from exc

    def commit(self, uow: UnitOfWork) -> dict[str, int]:
        """Write the group and COMMIT. Raises Unavailable; then nothing was written."""
        # The crash campaign's points, as SQLite's commit has them, for a transaction that
        # writes (a settlement may have written its part already, through flush).
        writes = bool(uow) or self._written
        if writes:
            fault("before_commit")
        versions = self.write(uow)
        self._written = False
        try:
            if writes:
                fault("during_commit")
            self.raw.execute("COMMIT")  # type: ignore[union-attr]
        except psycopg.Error as exc:
            self.rollback()
            raise Unavailable(f"the journal could not be committed: {_first_line(exc)}"
                              ) from exc
        self.commits += 1
        self.entries_committed += len(uow.rows)
        return versions

    # ------------------------------------------------------------------ consume keys (R12)

    def find_consume_keys(self, keys: list[tuple[str, str]]
                          ) -> dict[tuple[str, str], blocks.Prior]:
        """R12 for a group's consumes, read under the accounts' locks."""
        if not keys:
            return {}
        rows = self.conn.execute(
            "SELECT k.account_id, k.request_id, k.node, k.seq, k.idx FROM consume_keys k"
            " JOIN unnest(?::text[], ?::text[]) AS w(a, r)"
            " ON k.account_id = w.a AND k.request_id = w.r",
            ([a for a, _ in keys], [r for _, r in keys])).fetchall()
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


def _write(c: psycopg.Connection, node: int, uow: UnitOfWork) -> dict[str, int]:
    cur = c.cursor()
    if uow.rows:
        cur.executemany(
            "INSERT INTO journal (node, seq, at_us, kind, account_id, request_id, fingerprint,"
            " payload, hash) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            [(node, r[0], r[1], r[2], r[3], r[4], r[5],
              r[6] if isinstance(r[6], bytes) else r[6].encode(), r[7]) for r in uow.rows])
    if uow.accounts:
        cur.executemany(
            "INSERT INTO accounts (account_id, display_name, created_at_us, status, cash_micros,"
            " voucher_micros, outstanding_micros, overdue_since_us, suspended_at_us,"
            " scenario_ids, custom_policy) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
            " ON CONFLICT (account_id) DO UPDATE SET display_name = excluded.display_name,"
            " status = excluded.status, cash_micros = excluded.cash_micros,"
            " voucher_micros = excluded.voucher_micros,"
            " outstanding_micros = excluded.outstanding_micros,"
            " overdue_since_us = excluded.overdue_since_us,"
            " suspended_at_us = excluded.suspended_at_us, scenario_ids = excluded.scenario_ids,"
            " custom_policy = excluded.custom_policy", uow.account_rows())
    if uow.new_plans:
        cur.executemany("INSERT INTO plans VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                        uow.new_plan_rows())
    # Per-request rows go in one set-based statement each (unnest of column arrays): one
    # statement for a thousand rows, where executemany would run a thousand.
    changed = uow.changed_plan_rows()
    if changed:
        cur.execute("UPDATE plans p SET units_remaining = u.r, units_forfeited = u.f,"
                    " refunded_at_us = u.ra FROM unnest(%b::bigint[], %b::bigint[],"
                    " %b::bigint[], %b::text[]) AS u(r, f, ra, id) WHERE p.plan_id = u.id",
                    _columns(changed, 4))
    if uow.usage:
        cur.execute(
            "INSERT INTO usage_daily SELECT * FROM unnest(%b::text[], %b::text[], %b::int[],"
            " %b::bigint[], %b::bigint[]) ON CONFLICT (account_id, day, region) DO UPDATE SET"
            " payg_units = usage_daily.payg_units + excluded.payg_units,"
            " payg_micros = usage_daily.payg_micros + excluded.payg_micros",
            _columns([(*k, v[0], v[1]) for k, v in uow.usage.items()], 5))
    if uow.offsets:
        cur.execute(
            "INSERT INTO offsets_daily SELECT * FROM unnest(%b::text[], %b::text[], %b::text[],"
            " %b::bigint[]) ON CONFLICT (account_id, day, plan_id) DO UPDATE SET"
            " units = offsets_daily.units + excluded.units",
            _columns([(*k, v) for k, v in uow.offsets.items()], 4))
    if uow.features:
        cur.executemany(
            "INSERT INTO features_daily VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (account_id, day)"
            " DO UPDATE SET start_scenarios = excluded.start_scenarios,"
            " start_custom = excluded.start_custom, max_scenarios = excluded.max_scenarios,"
            " custom_any = excluded.custom_any",
            [(*k, *v) for k, v in uow.features.items()])
    if uow.bills:
        cur.executemany("INSERT INTO bills VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                        uow.bills)
    if uow.meta:
        cur.executemany("INSERT INTO meta VALUES (%s,%s) ON CONFLICT (key) DO UPDATE"
                        " SET value = excluded.value", list(uow.meta.items()))
    if uow.consumed:
        cur.execute(
            "INSERT INTO consume_keys SELECT * FROM unnest(%b::text[], %b::text[], %b::int[],"
            " %b::bigint[], %b::int[])",
            _columns([(a, r, node, v[0], v[1]) for (a, r), v in uow.consumed.items()], 5))
    touched = (set(uow.accounts) | {p.account_id for p in uow.plans.values()}
               | {k[0] for k in uow.features})
    if not touched:
        return {}
    return dict(cur.execute("UPDATE accounts SET version = version + 1"
                            " WHERE account_id = ANY(%s) RETURNING account_id, version",
                            (list(touched),)).fetchall())


def _columns(rows: list[tuple], width: int) -> list[list[Any]]:
    """Rows as ``width`` column lists (parameters of an ``unnest`` of arrays)."""
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[]] * width


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


__all__ = ["PgConn", "PgStore", "account_lock_key", "pg_sql"]
