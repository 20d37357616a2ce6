"""The journal store: the one package that speaks SQL.

- :mod:`.journal`: entries, the hash chain (R25) and the :class:`UnitOfWork` a group commit
  writes; engine-independent.
- :mod:`.schema`: the SQLite schema and its migrations.
- :mod:`.sqlite`: :class:`Store`, the SQLite backend (the lock file, the writer connection,
  readers, the group commit).
- :mod:`.postgres` and :mod:`.pg_schema`: :class:`~.postgres.PgStore`, the PostgreSQL
  backend that several nodes share (issue 11); :mod:`.base`: the reads both share.
- :mod:`.queries`: read queries on committed state (the servicers, settlement, verify).

Tables:
- ``journal``: append-only (R25), refused UPDATE/DELETE by triggers; each entry chained to the
  previous one by a SHA-256 hash; the idempotency key (R12) of administrative entries is a
  partial unique index on ``(account_id, kind, request_id)``.
- derived tables (``accounts``, ``plans``, ``usage_daily``, ``offsets_daily``,
  ``features_daily``, ``bills``), written in the same transaction as the entries that change
  them.

The engine hands over one :class:`UnitOfWork` per group of requests; :meth:`Store.commit`
writes it in one transaction (group commit: one fsync for the whole group).
"""

from .journal import GENESIS_HASH, Entry, UnitOfWork, canonical_json, chain_hash
from .queries import (
    accounts_with_live_plans,
    backup_to,
    bill_row,
    consume_entries,
    day_figures,
    dump_derived,
    existing_notices,
    hash_before,
    iter_journal,
    journal_count,
    read_account,
    read_accounts,
    read_bills,
    read_notices,
    read_notices_by_id,
    read_plans,
    read_runway_window,
    read_usage,
    read_window,
)
from .schema import MIGRATIONS, SCHEMA_VERSION
from .sqlite import DatabaseLocked, Store
from .urls import is_pg_url, mask_url


def open_store(db: str, *, lock: bool = True):  # noqa: ANN201
    """The store a ``--db`` value names: :class:`Store` (SQLite) for a path, or
    :class:`~.postgres.PgStore` for a ``postgresql://`` URL (psycopg imported only then)."""
    if is_pg_url(db):
        from .postgres import PgStore
        return PgStore(db, lock=lock)
    return Store(db, lock=lock)


__all__ = [
    "GENESIS_HASH", "MIGRATIONS", "SCHEMA_VERSION", "DatabaseLocked", "Entry", "Store",
    "is_pg_url", "mask_url", "open_store",
    "UnitOfWork", "backup_to", "bill_row", "canonical_json",
    "consume_entries", "chain_hash", "day_figures",
    "dump_derived", "hash_before", "iter_journal", "journal_count", "read_account",
    "read_accounts", "read_bills", "read_plans", "read_runway_window", "read_usage", "read_window",
    "accounts_with_live_plans", "existing_notices", "read_notices", "read_notices_by_id",
]
