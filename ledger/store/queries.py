"""Read queries on a connection (``Store.reader()`` or the writer's): committed state only."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from ..calendar import day_end
from ..model import AccountState, AccountStatus, PlanState, Validity
from ..money import Region
from ..runway import Window, window_days
from ..settlement import Bill, BillLine, DayFigures
from . import blocks
from .journal import GENESIS_HASH

BUSY_TIMEOUT_MS = 5_000

# ---------------------------------------------------------------------- read queries
# Run on a reader connection (Store.reader()): they see only committed state.

_ACCOUNT_COLUMNS = (
    "account_id, display_name, created_at_us, status, cash_micros, voucher_micros,"
    " outstanding_micros, overdue_since_us, suspended_at_us, scenario_ids, custom_policy")


def read_account(conn: sqlite3.Connection, account_id: str) -> AccountState | None:
    row = conn.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE account_id = ?",
                       (account_id,)).fetchone()
    return None if row is None else account_of_row(row)


def account_of_row(row: Any) -> AccountState:
    return AccountState(
        account_id=row[0], display_name=row[1], created_at=row[2],
        status=AccountStatus(row[3]), cash_micros=row[4], voucher_micros=row[5],
        outstanding_micros=row[6], overdue_since=row[7], suspended_at=row[8],
        scenario_ids=tuple(json.loads(row[9])), custom_policy_enabled=bool(row[10]))


ACCOUNT_COLUMNS = _ACCOUNT_COLUMNS


def read_accounts(conn: sqlite3.Connection, prefix: str, after: str, limit: int
                  ) -> list[AccountState]:
    """Accounts whose id starts with prefix and sorts after `after`, in id order (a range
    scan of the primary key: ids are printable ASCII, so prefix + DEL bounds the range)."""
    low = max(prefix, after)
    op = ">" if after and after >= prefix else ">="
    rows = conn.execute(
        f"SELECT account_id FROM accounts WHERE account_id {op} ? AND account_id < ?"
        " ORDER BY account_id LIMIT ?", (low, prefix + "\x7f", limit)).fetchall()
    return [a for (account_id,) in rows if (a := read_account(conn, account_id)) is not None]


_PLAN_COLUMNS = (
    "plan_id, account_id, spec_id, units_total, units_remaining, price_micros, validity,"
    " purchased_at_us, expires_at_us, purchase_seq, paid_voucher_micros, paid_cash_micros,"
    " refunded_at_us, units_forfeited")


def read_plans(conn: sqlite3.Connection, where: str, params: tuple = ()) -> list[PlanState]:
    rows = conn.execute(f"SELECT {_PLAN_COLUMNS} FROM plans {where}"
                        " ORDER BY expires_at_us, purchase_seq", params).fetchall()
    return [PlanState(r[0], r[1], r[2], r[3], r[4], r[5], Validity(r[6]), r[7], r[8], r[9],
                      r[10], r[11], r[12], r[13]) for r in rows]


def read_usage(conn: sqlite3.Connection, account_id: str, from_day: str, to_day: str
               ) -> tuple[list[tuple[str, int, int, int]], list[tuple[str, str, int]]]:
    """(payg rows (day, region, units, micros), offset rows (day, plan_id, units)), by day."""
    payg = conn.execute(
        "SELECT day, region, payg_units, payg_micros FROM usage_daily"
        " WHERE account_id = ? AND day BETWEEN ? AND ? ORDER BY day, region",
        (account_id, from_day, to_day)).fetchall()
    offsets = conn.execute(
        "SELECT day, plan_id, units FROM offsets_daily"
        " WHERE account_id = ? AND day BETWEEN ? AND ? ORDER BY day, plan_id",
        (account_id, from_day, to_day)).fetchall()
    return [tuple(r) for r in payg], [tuple(r) for r in offsets]  # type: ignore[misc]


def day_figures(conn: sqlite3.Connection, day: str) -> dict[str, DayFigures]:
    """Every account's figures for one billing day (R13, R14, R18), from the derived tables."""
    out: dict[str, dict[str, Any]] = {}

    def row(account_id: str) -> dict[str, Any]:
        return out.setdefault(account_id, {"payg": {}, "offsets": [], "scen": 0, "custom": 0})

    for acct, region, units in conn.execute(
            "SELECT account_id, region, payg_units FROM usage_daily WHERE day = ?", (day,)):
        row(acct)["payg"][region] = units
    for acct, plan_id, units in conn.execute(
            "SELECT o.account_id, o.plan_id, o.units FROM offsets_daily o"
            " JOIN plans p USING (plan_id) WHERE o.day = ?"
            " ORDER BY o.account_id, p.expires_at_us, p.purchase_seq", (day,)):
        row(acct)["offsets"].append((plan_id, units))
    # R13/R14: the configuration of a day with changes is its row; a day without changes
    # had the configuration the next change started from, or else the current one.
    features: dict[str, tuple[int, int]] = {}
    for acct, scen, custom in conn.execute(
            "SELECT account_id, json_array_length(scenario_ids), custom_policy FROM accounts"
            " WHERE (json_array_length(scenario_ids) > 0 OR custom_policy != 0)"
            " AND created_at_us < ?",
            (day_end(day),)):
        features[acct] = (scen, custom)
    for acct, scen, custom in conn.execute(
            "SELECT f.account_id, f.start_scenarios, f.start_custom FROM features_daily f"
            " WHERE f.day = (SELECT min(g.day) FROM features_daily g"
            "                WHERE g.account_id = f.account_id AND g.day > ?)", (day,)):
        features[acct] = (scen, custom)
    for acct, scen, custom in conn.execute(
            "SELECT account_id, max_scenarios, custom_any FROM features_daily WHERE day = ?",
            (day,)):
        features[acct] = (scen, custom)
    for acct, (scen, custom) in features.items():
        if scen or custom:
            r = row(acct)
            r["scen"], r["custom"] = scen, custom
    figures = {a: DayFigures(r["payg"], tuple(r["offsets"]), r["scen"], bool(r["custom"]))
               for a, r in out.items()}
    return {a: f for a, f in figures.items() if f.has_activity}


def read_bills(conn: sqlite3.Connection, where: str, params: tuple = ()) -> list[Bill]:
    rows = conn.execute(
        "SELECT account_id, day, bill_date, lines, plan_offsets, total_micros,"
        " amount_due_micros, paid_voucher_micros, paid_cash_micros, outstanding_micros,"
        f" issued_at_us FROM bills {where} ORDER BY day, account_id", params).fetchall()
    return [Bill(r[0], r[1], r[2], tuple(BillLine(*ln) for ln in json.loads(r[3])),
                 tuple((a, b) for a, b in json.loads(r[4])), r[5], r[6], r[7], r[8], r[9], r[10])
            for r in rows]


def bill_row(b: Bill, seq: int) -> tuple:
    return (b.account_id, b.billing_day, b.bill_date,
            json.dumps([[ln.item, ln.region, ln.quantity, ln.unit_price_micros,
                         ln.amount_micros] for ln in b.lines]),
            json.dumps([list(p) for p in b.plan_offsets]), b.total_micros, b.amount_due_micros,
            b.paid_voucher_micros, b.paid_cash_micros, b.outstanding_micros, b.issued_at_us, seq)


def journal_count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM journal").fetchone()[0]


def iter_journal(conn: sqlite3.Connection, from_seq: int = 1):
    """Every entry as stored: (seq, at_us, kind, account_id, request_id, fingerprint,
    payload_json, hash), in seq order."""
    yield from conn.execute(
        "SELECT seq, at_us, kind, account_id, request_id, fingerprint, payload, hash"
        " FROM journal WHERE seq >= ? ORDER BY seq", (from_seq,))


def hash_before(conn: sqlite3.Connection, seq: int) -> bytes:
    row = conn.execute("SELECT hash FROM journal WHERE seq = ?", (seq - 1,)).fetchone()
    return bytes(row[0]) if row else GENESIS_HASH


def dump_derived(conn: sqlite3.Connection) -> dict[str, dict[Any, Any]]:
    """The derived tables as row images keyed like ledger.rebuild.Derived."""
    out: dict[str, dict[Any, Any]] = {}
    cur = conn.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts")
    cols = [c[0] for c in cur.description]
    out["accounts"] = {r[0]: {**dict(zip(cols[1:], r[1:], strict=True)),
                              "scenario_ids": json.loads(r[9])} for r in cur}
    cur = conn.execute(f"SELECT {_PLAN_COLUMNS} FROM plans")  # not SQLite's offsets (v7)
    cols = [c[0] for c in cur.description]
    out["plans"] = {r[0]: dict(zip(cols[1:], r[1:], strict=True)) for r in cur}
    out["usage_daily"] = {(r[0], r[1], r[2]): (r[3], r[4])
                          for r in conn.execute("SELECT * FROM usage_daily")}
    out["offsets_daily"] = {(r[0], r[1], r[2]): r[3]
                            for r in conn.execute("SELECT * FROM offsets_daily")}
    out["features_daily"] = {(r[0], r[1]): tuple(r[2:])
                             for r in conn.execute("SELECT * FROM features_daily")}
    out["bills"] = {(r[0], r[1]): {
        "day": r[1], "bill_date": r[2], "lines": json.loads(r[3]),
        "plan_offsets": json.loads(r[4]), "total_micros": r[5], "amount_due_micros": r[6],
        "paid_voucher_micros": r[7], "paid_cash_micros": r[8], "outstanding_micros": r[9],
        "issued_at_us": r[10], "journal_seq": r[11]} for r in conn.execute("SELECT * FROM bills")}
    return out


def backup_to(db_path: str, to_path: str) -> None:
    """Copy a live database with SQLite's online backup API (a consistent snapshot)."""
    src = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    dst = sqlite3.connect(to_path)
    try:
        src.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        src.backup(dst)
        dst.execute("PRAGMA journal_mode = WAL")
    finally:
        dst.close()
        src.close()


def consume_entries(conn: sqlite3.Connection, where: str = "", params: tuple = ()):
    """Every Consume entry in journal order, whether written as one row (before blocks) or
    inside a block: (seq, at_us, account_id, request_id, payload as the one-row JSON had
    it). ``where`` filters journal rows (e.g. ``AND seq > ?``)."""
    for seq, at_us, kind, account_id, request_id, payload in conn.execute(
            "SELECT seq, at_us, kind, account_id, request_id, payload FROM journal"
            f" WHERE kind IN ('consume', '{blocks.BLOCK_KIND}') {where} ORDER BY seq", params):
        if kind == "consume":
            yield seq, at_us, account_id, request_id, json.loads(payload)
            continue
        day, items = blocks.decode(payload)
        for item in items:
            yield (seq, at_us, item[blocks.ACCOUNT], item[blocks.REQUEST],
                   blocks.entry_payload(day, item))


def read_window(conn: sqlite3.Connection, account_id: str, from_day: str, to_day: str
                ) -> tuple[int, int, int]:
    """Runway's window (issue 22): (units plans offset, pay-as-you-go units in the Chinese
    mainland, outside it) over the days, from the derived rows, not a journal scan."""
    (offset,) = conn.execute(
        "SELECT coalesce(sum(units), 0) FROM offsets_daily"
        " WHERE account_id = ? AND day BETWEEN ? AND ?", (account_id, from_day, to_day)).fetchone()
    by_region = dict(conn.execute(
        "SELECT region, sum(payg_units) FROM usage_daily"
        " WHERE account_id = ? AND day BETWEEN ? AND ? GROUP BY region",
        (account_id, from_day, to_day)).fetchall())
    return (int(offset), int(by_region.get(int(Region.CHINESE_MAINLAND), 0)),
            int(by_region.get(int(Region.OUTSIDE_CHINESE_MAINLAND), 0)))


def read_runway_window(conn: sqlite3.Connection, account_id: str, created_at: int, now: int,
                       wanted_days: int) -> Window | None:
    """The runway's window of complete billing days and its usage (docs/runway.md), or None
    when the account has no complete day yet: shared by GetRunway and the forecast notices."""
    days = window_days(created_at, now, wanted_days)
    if days is None:
        return None
    offset, mainland, outside = read_window(conn, account_id, days[0], days[1])
    return Window(days[0], days[1], days[2], offset + mainland + outside, mainland, outside)


def accounts_with_live_plans(conn: sqlite3.Connection, now: int) -> list[str]:
    """Accounts holding a plan that can still be used (the forecast notices, issue 22)."""
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT account_id FROM plans WHERE units_remaining > 0"
        " AND refunded_at_us IS NULL AND expires_at_us > ? ORDER BY account_id",
        (now,)).fetchall()]


NOTICE_COLUMNS = "notice_id, account_id, kind, at_us, payload"


def notice_filter(account_id: str | None, since_us: int, after: tuple[int, str] | None
                  ) -> tuple[list[str], list]:
    """The conditions of a page of notices (or deliveries): an account, an instant, and the
    keyset cursor (at_us, notice_id) of the previous page's last row."""
    where: list[str] = ["at_us >= ?"]
    params: list = [since_us]
    if account_id is not None:
        where.append("account_id = ?")
        params.append(account_id)
    if after is not None:
        where.append("(at_us > ? OR (at_us = ? AND notice_id > ?))")
        params += [after[0], after[0], after[1]]
    return where, params


def read_notices(conn: sqlite3.Connection, account_id: str | None, since_us: int,
                 after: tuple[int, str] | None, limit: int) -> list[tuple]:
    """Notices in (at_us, notice_id) order from ``since_us``, after the page cursor
    ``after``: rows (notice_id, account_id, kind, at_us, payload JSON)."""
    where, params = notice_filter(account_id, since_us, after)
    return [tuple(r) for r in conn.execute(
        f"SELECT {NOTICE_COLUMNS} FROM notices WHERE {' AND '.join(where)}"
        " ORDER BY at_us, notice_id LIMIT ?", (*params, limit)).fetchall()]


def read_notices_by_id(conn: sqlite3.Connection, ids: list[str]) -> list[tuple]:
    """The outbox rows of these notices, in (at_us, notice_id) order."""
    if not ids:
        return []
    return [tuple(r) for r in conn.execute(
        f"SELECT {NOTICE_COLUMNS} FROM notices WHERE notice_id IN ({','.join('?' * len(ids))})"
        " ORDER BY at_us, notice_id", ids).fetchall()]


NOTICE_IDS_PER_READ = 500


def existing_notices(conn: sqlite3.Connection, ids: list[str]) -> set[str]:
    """Which of these notices the outbox already holds."""
    out: set[str] = set()
    for i in range(0, len(ids), NOTICE_IDS_PER_READ):
        chunk = ids[i:i + NOTICE_IDS_PER_READ]
        out.update(r[0] for r in conn.execute(
            f"SELECT notice_id FROM notices WHERE notice_id IN ({','.join('?' * len(chunk))})",
            chunk).fetchall())
    return out
