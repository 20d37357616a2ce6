"""Moving up (issue 11): copy a whole SQLite ledger into an empty PostgreSQL database.

The SQLite journal is one chain; it becomes node 1's chain on PostgreSQL, entry for entry
and byte for byte (the hash covers seq, time, kind, ids and payload, not the node), so it
verifies there unchanged. gseq follows seq. Every Consume's key (R12) goes into
``consume_keys``, pointing at its block (or at its one-row entry, written before blocks),
so every old ``request_id`` still replays its original result. The derived tables are
copied as they are and then checked against a rebuild by ``verify`` on both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from . import blocks
from .postgres import PgStore
from .sqlite import Store
from .sqlite_rows import PLAN_COLUMNS

COPY_ROWS_PER_READ = 2_000  # journal rows read from SQLite at a time
DERIVED_TABLES = ("accounts", "plans", "usage_daily", "offsets_daily", "features_daily",
                  "bills", "meta")
_ACCOUNT_COLUMNS = ("account_id, display_name, created_at_us, status, cash_micros,"
                    " voucher_micros, outstanding_micros, overdue_since_us, suspended_at_us,"
                    " scenario_ids, custom_policy")
NODE = 1  # the copied chain's node number


class TargetNotEmpty(RuntimeError):
    """The PostgreSQL database already holds a ledger: never merge two."""


def copy_ledger(src_path: str, url: str,
                progress: Callable[[int, int], None] = lambda done, total: None) -> int:
    """Copy; returns the journal rows copied. ``progress(done, total)`` after each chunk."""
    src = Store(src_path)  # the lock: no server writes while we copy; migrates an old file
    dst = PgStore(url, lock=False)
    try:
        c = dst.raw
        assert c is not None
        if c.execute("SELECT (SELECT count(*) FROM journal) + (SELECT count(*) FROM accounts)"
                     ).fetchone()[0]:
            raise TargetNotEmpty(f"{dst.path} already holds a ledger; give an empty database")
        total = src.conn.execute("SELECT count(*) FROM journal").fetchone()[0]
        with c.transaction():
            done = 0
            for rows in _journal_chunks(src):
                _copy_rows(c, rows)
                done += len(rows)
                progress(done, total)
            for table in DERIVED_TABLES:
                _copy_table(src, c, table)
            top = max(src.conn.execute("SELECT coalesce(max(seq), 0) FROM journal").fetchone()[0],
                      src.conn.execute("SELECT coalesce(max(purchase_seq), 0) FROM plans"
                                       ).fetchone()[0])
            if top:  # new plans' ids and order come after every copied one
                c.execute("SELECT setval('purchase_order', %s)", (top,))
        return total
    finally:
        dst.close()
        src.close()


def _journal_chunks(src: Store) -> Iterator[list[tuple]]:
    seq = 0
    while rows := src.conn.execute(
            "SELECT seq, at_us, kind, account_id, request_id, fingerprint, payload, hash"
            " FROM journal WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, COPY_ROWS_PER_READ)).fetchall():
        yield rows
        seq = rows[-1][0]


def _copy_rows(c: Any, rows: list[tuple]) -> None:
    cur = c.cursor()
    cur.executemany(
        "INSERT INTO journal (node, seq, at_us, kind, account_id, request_id, fingerprint,"
        " payload, hash) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
        [(NODE, r[0], r[1], r[2], r[3], r[4], r[5],
          r[6] if isinstance(r[6], bytes) else r[6].encode(), r[7]) for r in rows])
    keys = []
    for seq, _, kind, account_id, request_id, _, payload, _ in rows:
        if kind == "consume":  # one row, before blocks
            keys.append((account_id, request_id, NODE, seq, -1))
        elif kind == blocks.BLOCK_KIND:
            _, items = blocks.decode(payload)
            keys.extend((item[blocks.ACCOUNT], item[blocks.REQUEST], NODE, seq, idx)
                        for idx, item in enumerate(items))
    if keys:
        cur.executemany("INSERT INTO consume_keys VALUES (%s,%s,%s,%s,%s)", keys)


def _copy_table(src: Store, c: Any, table: str) -> None:
    # SQLite's plans rows also hold their newest day of offsets (schema v7), which the
    # offsets_daily view hands over with the older days.
    columns = {"accounts": _ACCOUNT_COLUMNS, "plans": PLAN_COLUMNS}.get(table, "*")
    cur = src.conn.execute(f"SELECT {columns} FROM {table}")
    names = [d[0] for d in cur.description]
    marks = ",".join(["%s"] * len(names))
    c.cursor().executemany(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks})",
                           cur.fetchall())
