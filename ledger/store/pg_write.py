"""A group's statements on PostgreSQL, queued in one pipeline (issue 20).

Each statement that takes a group's rows has two forms:

- set-based: one statement for the whole group, its rows as column arrays (``unnest``), so
  a thousand rows are one statement, not a thousand;
- per row: scalar parameters, for a group of at most ``SCALAR_ROWS_MAX`` rows. Measured on
  the test cluster, an array parameter costs 100-160 µs more than a scalar one (psycopg
  dumps lists in Python, and PostgreSQL unnests them), which is most of a unary group.

A step's statements are queued in one ``Connection.pipeline()``: they go out together,
and the step costs one round trip. (Tried and dropped: a unary group's steps as one
simple-protocol query of several statements, values quoted by psycopg. In a side-by-side
loadtest at 1 in flight it was slower than the pipeline: p50 2.8 ms against 2.3 ms.)
"""

from __future__ import annotations

from typing import Any

import psycopg

from ..faults import planted
from .journal import UnitOfWork

SCALAR_ROWS_MAX = 4  # rows up to which a statement is sent once per row, with scalars

LOCK_ONE_SQL = "SELECT pg_advisory_xact_lock(%s)"
LOCK_ACCOUNTS_SQL = "SELECT pg_advisory_xact_lock(k) FROM unnest(%b::bigint[]) AS k"
VERSION_ONE_SQL = "SELECT account_id, version FROM accounts WHERE account_id = %s"
VERSIONS_SQL = "SELECT account_id, version FROM accounts WHERE account_id = ANY(%s)"
KEY_ONE_SQL = ("SELECT account_id, request_id, node, seq, idx FROM consume_keys"
               " WHERE account_id = %s AND request_id = %s")
KEYS_SQL = ("SELECT k.account_id, k.request_id, k.node, k.seq, k.idx FROM consume_keys k"
            " JOIN unnest(%s::text[], %s::text[]) AS w(a, r)"
            " ON k.account_id = w.a AND k.request_id = w.r")

PLAN_ONE_SQL = ("UPDATE plans SET units_remaining = %s, units_forfeited = %s,"
                " refunded_at_us = %s WHERE plan_id = %s")
PLANS_SQL = ("UPDATE plans p SET units_remaining = u.r, units_forfeited = u.f,"
             " refunded_at_us = u.ra FROM unnest(%b::bigint[], %b::bigint[],"
             " %b::bigint[], %b::text[]) AS u(r, f, ra, id) WHERE p.plan_id = u.id")
_USAGE_CONFLICT = (" ON CONFLICT (account_id, day, region) DO UPDATE SET"
                   " payg_units = usage_daily.payg_units + excluded.payg_units,"
                   " payg_micros = usage_daily.payg_micros + excluded.payg_micros")
USAGE_ONE_SQL = "INSERT INTO usage_daily VALUES (%s, %s, %s, %s, %s)" + _USAGE_CONFLICT
USAGE_SQL = ("INSERT INTO usage_daily SELECT * FROM unnest(%b::text[], %b::text[], %b::int[],"
             " %b::bigint[], %b::bigint[])" + _USAGE_CONFLICT)
_OFFSETS_CONFLICT = (" ON CONFLICT (account_id, day, plan_id) DO UPDATE SET"
                     " units = offsets_daily.units + excluded.units")
OFFSETS_ONE_SQL = "INSERT INTO offsets_daily VALUES (%s, %s, %s, %s)" + _OFFSETS_CONFLICT
OFFSETS_SQL = ("INSERT INTO offsets_daily SELECT * FROM unnest(%b::text[], %b::text[],"
               " %b::text[], %b::bigint[])" + _OFFSETS_CONFLICT)
KEYS_ONE_INSERT_SQL = "INSERT INTO consume_keys VALUES (%s, %s, %s, %s, %s)"
KEYS_INSERT_SQL = ("INSERT INTO consume_keys SELECT * FROM unnest(%b::text[], %b::text[],"
                   " %b::int[], %b::bigint[], %b::int[])")
KEYS_OUTSIDE_LOCK = planted("key_outside_lock")
if KEYS_OUTSIDE_LOCK:  # issue 23: a claim that cannot fail, so a duplicate lands
    KEYS_ONE_INSERT_SQL += " ON CONFLICT DO NOTHING"
    KEYS_INSERT_SQL += " ON CONFLICT DO NOTHING"
CHECK_SQL = ("SELECT ql_check(%s::integer, %s::integer, %s::text, %s::text, %s::text,"
             " %s::text, %s::text, %s::text, %s::text)")
STALE_SQLSTATE = "QL409"  # ql_check: the group was decided on state another node moved
BUMP_ONE_SQL = ("UPDATE accounts SET version = version + 1 WHERE account_id = %s"
                " RETURNING account_id, version")
BUMP_SQL = ("UPDATE accounts SET version = version + 1 WHERE account_id = ANY(%s)"
            " RETURNING account_id, version")


def columns(rows: list[tuple], width: int) -> list[list[Any]]:
    """Rows as ``width`` column lists (parameters of an ``unnest`` of arrays)."""
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[]] * width


def queue_rows(cur: psycopg.Cursor, rows: list[tuple], one_sql: str, set_sql: str) -> None:
    """Rows through the per-row statement when few, else the set-based one."""
    if len(rows) <= SCALAR_ROWS_MAX:
        cur.executemany(one_sql, rows)
    else:
        cur.execute(set_sql, columns(rows, len(rows[0])))


def queue_hold(c: psycopg.Connection, account_ids: list[str], lock_keys: list[int] | None
               ) -> psycopg.Cursor | list[psycopg.Cursor]:
    """The accounts' locks in the given (sorted) key order, then their versions; returns
    the cursor(s) that will hold (account_id, version) rows."""
    if lock_keys is not None:
        if len(lock_keys) <= SCALAR_ROWS_MAX:
            for k in lock_keys:
                c.execute(LOCK_ONE_SQL, (k,))
        else:
            c.execute(LOCK_ACCOUNTS_SQL, (lock_keys,))
    if len(account_ids) <= SCALAR_ROWS_MAX:
        return [c.execute(VERSION_ONE_SQL, (a,)) for a in account_ids]
    return c.execute(VERSIONS_SQL, (account_ids,))


def queue_keys(c: psycopg.Connection, keys: list[tuple[str, str]]
               ) -> psycopg.Cursor | list[psycopg.Cursor]:
    """The rows of a group's consume keys: one statement per key when few."""
    if len(keys) <= SCALAR_ROWS_MAX:
        return [c.execute(KEY_ONE_SQL, k) for k in keys]
    return c.execute(KEYS_SQL, ([a for a, _ in keys], [r for _, r in keys]))


def fetch_all(got: psycopg.Cursor | list[psycopg.Cursor]) -> list[tuple]:
    """The rows of one cursor or of several, once the pipeline is synced."""
    if isinstance(got, list):
        return [row for cur in got for row in cur.fetchall()]
    return got.fetchall()


JOURNAL_SQL = ("INSERT INTO journal (node, seq, at_us, kind, account_id, request_id,"
               " fingerprint, payload, hash) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)")


def _journal_rows(node: int, uow: UnitOfWork) -> list[tuple]:
    return [(node, r[0], r[1], r[2], r[3], r[4], r[5],
             r[6] if isinstance(r[6], bytes) else r[6].encode(), r[7]) for r in uow.rows]


def _touched(uow: UnitOfWork) -> list[str]:
    """The accounts whose version the group moves, sorted."""
    return sorted(set(uow.accounts) | {p.account_id for p in uow.plans.values()}
                  | {k[0] for k in uow.features})


# A small consume group's statements as one call per account (schema v3's functions; issue
# 20): up to ONE_CALL_ACCOUNTS_MAX accounts, each with at most one key, changed plan, offsets
# row and usage row (every group of single Consumes that name distinct accounts). Off only in
# the test that checks both ways write the same rows.
ONE_CALL = True
ONE_CALL_ACCOUNTS_MAX = 8
OPEN_ONE_SQL = ("SELECT * FROM ql_open_one(%s::integer, %s::integer, %s::bigint, %s::text,"
                " %s::text)")
WRITE_ONE_SQL = (
    "SELECT * FROM ql_write_one(%s::integer, %s::bigint, %s::bigint, %s::text, %s::text,"
    " %s::text, %s::text, %s::bytea, %s::bytea, %s::text, %s::bigint, %s::bigint, %s::bigint,"
    " %s::text, %s::text, %s::text, %s::text, %s::bigint, %s::text, %s::text, %s::integer,"
    " %s::bigint, %s::bigint, %s::text, %s::text, %s::bigint, %s::integer, %s::integer)")
_NO_JOURNAL = (None,) * 9
_NO_PLAN, _NO_OFFSETS, _NO_USAGE, _NO_KEY = (None,) * 5, (None,) * 4, (None,) * 5, (None,) * 4
_EMPTY = (_NO_PLAN, _NO_OFFSETS, _NO_USAGE, _NO_KEY)


def one_call_open(account_ids: list[str], keys: list[tuple[str, str]]) -> bool:
    """Whether a group's opening goes as one ``ql_open_one`` call per account."""
    return (ONE_CALL and not KEYS_OUTSIDE_LOCK and 0 < len(account_ids) <= ONE_CALL_ACCOUNTS_MAX
            and len({a for a, _ in keys}) == len(keys) <= len(account_ids)
            and all(a in account_ids for a, _ in keys))


def write_calls(node: int, uow: UnitOfWork) -> list[tuple] | None:
    """``ql_write_one``'s arguments, one call per account, the first with the journal row;
    None when the group is not one journal row and, for each of at most
    ONE_CALL_ACCOUNTS_MAX accounts, at most one changed plan, offsets row, usage row and key
    (``queue_write``'s statements then)."""
    most = ONE_CALL_ACCOUNTS_MAX
    if (not ONE_CALL or KEYS_OUTSIDE_LOCK or len(uow.rows) != 1 or len(uow.plans) > most
            or len(uow.offsets) > most or len(uow.usage) > most or len(uow.consumed) > most
            or uow.accounts or uow.new_plans or uow.features or uow.bills or uow.meta
            or uow.notices):
        return None
    per: dict[str, list[tuple]] = {}
    parts = (
        (0, [(p.account_id, (p.plan_id, p.units_remaining, p.units_forfeited, p.refunded_at,
                             p.account_id)) for p in uow.plans.values()]),
        (1, [(k[0], (*k, v)) for k, v in uow.offsets.items()]),
        (2, [(k[0], (*k, *v)) for k, v in uow.usage.items()]),
        (3, [(a, (a, r, v[0], v[1])) for (a, r), v in uow.consumed.items()]))
    for slot, rows in parts:
        for account_id, args in rows:
            got = per.setdefault(account_id, list(_EMPTY))
            if got[slot] is not _EMPTY[slot]:  # two of a kind for one account
                return None
            got[slot] = args
    if len(per) > most:
        return None
    journal = _journal_rows(node, uow)[0]
    calls = [(*(journal if i == 0 else _NO_JOURNAL), *got[0], *got[1], *got[2], *got[3], node)
             for i, got in enumerate(per.values())]
    return calls or [(*journal, *_NO_PLAN, *_NO_OFFSETS, *_NO_USAGE, *_NO_KEY, node)]


WRITE_GROUP_SQL = "SELECT * FROM ql_write_group(" + ", ".join(
    ["%s::integer", "%s::bigint", "%s::bigint", *["%s::text"] * 4, "%s::bytea", "%s::bytea",
     *["%s::text"] * 18]) + ")"
SEP = "\x1f"  # between the values of one list (schema v6's ql_write_group): in no id


def _texts(rows: list[tuple], width: int) -> list[str] | None:
    """Rows as ``width`` texts, one per column, each its values joined by SEP (''
    for no rows); None when a text value holds SEP itself."""
    if not rows:
        return [""] * width
    out = []
    for col in zip(*rows, strict=True):
        if type(col[0]) is str:
            joined = SEP.join(col)
            if joined.count(SEP) != len(col) - 1:
                return None
        else:
            joined = SEP.join(map(str, col))
        out.append(joined)
    return out


def group_call(node: int, uow: UnitOfWork) -> tuple | None:
    """``ql_write_group``'s arguments for a consume group (one journal row; changed plans,
    offsets, usage and keys; nothing else), or None (``queue_write``'s statements)."""
    if (not ONE_CALL or KEYS_OUTSIDE_LOCK or len(uow.rows) != 1 or uow.accounts
            or uow.new_plans or uow.features or uow.bills or uow.meta or uow.notices):
        return None
    parts = (
        _texts([(p.plan_id, p.units_remaining, p.units_forfeited, p.refunded_at)
                for p in uow.plans.values()], 4),
        _texts([(*k, v) for k, v in uow.offsets.items()], 4),
        _texts([(*k, v[0], v[1]) for k, v in uow.usage.items()], 5),
        _texts([(a, r, v[0], v[1]) for (a, r), v in uow.consumed.items()], 4),
        _texts([(a,) for a in _touched(uow)], 1))
    if any(p is None for p in parts):
        return None
    return (*_journal_rows(node, uow)[0], *(t for p in parts for t in p))  # type: ignore[union-attr]


def queue_write(c: psycopg.Connection, node: int, uow: UnitOfWork
                ) -> psycopg.Cursor | list[psycopg.Cursor] | None:
    """Queue a group's statements (in a pipeline: no round trip each); returns the
    cursor(s) of the touched accounts' new versions, to fetch once the pipeline is synced.
    A small consume group is one call of ``ql_write_one`` per account, a larger one one
    call of ``ql_write_group``."""
    calls = write_calls(node, uow)
    if calls is not None:
        return [c.execute(WRITE_ONE_SQL, args) for args in calls]
    group = group_call(node, uow)
    if group is not None:
        return c.execute(WRITE_GROUP_SQL, group)
    cur = c.cursor()
    if uow.rows:
        cur.executemany(JOURNAL_SQL, _journal_rows(node, uow))
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
    changed = uow.changed_plan_rows()
    if changed:
        queue_rows(cur, changed, PLAN_ONE_SQL, PLANS_SQL)
    if uow.usage:
        queue_rows(cur, [(*k, v[0], v[1]) for k, v in uow.usage.items()], USAGE_ONE_SQL,
                   USAGE_SQL)
    if uow.offsets:
        queue_rows(cur, [(*k, v) for k, v in uow.offsets.items()], OFFSETS_ONE_SQL,
                   OFFSETS_SQL)
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
    if uow.notices:
        cur.executemany("INSERT INTO notices (notice_id, account_id, kind, at_us, payload)"
                        " VALUES (%s,%s,%s,%s,%s) ON CONFLICT (notice_id) DO NOTHING",
                        uow.notices)
    if uow.consumed:
        queue_rows(cur, [(a, r, node, v[0], v[1]) for (a, r), v in uow.consumed.items()],
                   KEYS_ONE_INSERT_SQL, KEYS_INSERT_SQL)
    touched = _touched(uow)
    if not touched:
        return None
    if len(touched) <= SCALAR_ROWS_MAX:
        return [c.execute(BUMP_ONE_SQL, (a,)) for a in touched]
    return c.execute(BUMP_SQL, (touched,))
