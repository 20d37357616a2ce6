"""The journal store: the one module that speaks SQL.

SQLite in WAL mode with ``synchronous=FULL`` (an acknowledged request survives a power cut,
not only a crash), explicit ``BEGIN IMMEDIATE`` transactions (TRAPS: sqlite-utils' atomic()
issues a plain BEGIN), and an exclusive lock file so a second server refuses to start.

Tables:
- ``journal``: append-only (R25), refused UPDATE/DELETE by triggers; each entry chained to the
  previous one by a SHA-256 hash; the idempotency key (R12) is a partial unique index on
  ``(account_id, kind, request_id)``.
- derived tables (``accounts``, ``plans``, ``usage_daily``, ``offsets_daily``,
  ``features_daily``), written in the same transaction as the entries that change them.

The engine hands over one :class:`UnitOfWork` per group of requests; :meth:`Store.commit`
writes it in one transaction (group commit: one fsync for the whole group).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from .calendar import day_end
from .errors import Unavailable
from .faults import fault
from .model import AccountState, AccountStatus, PlanState, Validity
from .settlement import Bill, BillLine, DayFigures

BUSY_TIMEOUT_MS = 5_000
JOURNAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
GENESIS_HASH = b"\x00" * 32
KEYS_PER_LOOKUP_MAX = 300  # idempotency keys looked up in one statement (3 parameters each)

SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE journal (
    seq INTEGER PRIMARY KEY,
    at_us INTEGER NOT NULL,
    kind TEXT NOT NULL,
    account_id TEXT,
    request_id TEXT,
    fingerprint TEXT,
    payload TEXT NOT NULL,
    hash BLOB NOT NULL
);
CREATE UNIQUE INDEX journal_idempotency ON journal (account_id, kind, request_id)
    WHERE request_id IS NOT NULL;
CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
    BEGIN SELECT RAISE(ABORT, 'the journal is append-only (R25): UPDATE refused'); END;
CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal
    BEGIN SELECT RAISE(ABORT, 'the journal is append-only (R25): DELETE refused'); END;
CREATE TABLE accounts (
    account_id TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    created_at_us INTEGER NOT NULL,
    status INTEGER NOT NULL,
    cash_micros INTEGER NOT NULL CHECK (cash_micros >= 0),
    voucher_micros INTEGER NOT NULL CHECK (voucher_micros >= 0),
    outstanding_micros INTEGER NOT NULL CHECK (outstanding_micros >= 0),
    overdue_since_us INTEGER,
    suspended_at_us INTEGER,
    scenario_ids TEXT NOT NULL,
    custom_policy INTEGER NOT NULL
);
CREATE TABLE plans (
    plan_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    spec_id TEXT NOT NULL,
    units_total INTEGER NOT NULL,
    units_remaining INTEGER NOT NULL CHECK (units_remaining >= 0),
    units_forfeited INTEGER NOT NULL,
    price_micros INTEGER NOT NULL,
    validity INTEGER NOT NULL,
    purchased_at_us INTEGER NOT NULL,
    expires_at_us INTEGER NOT NULL,
    purchase_seq INTEGER NOT NULL,
    paid_voucher_micros INTEGER NOT NULL,
    paid_cash_micros INTEGER NOT NULL,
    refunded_at_us INTEGER
);
CREATE INDEX plans_by_account ON plans (account_id, expires_at_us, purchase_seq);
CREATE TABLE usage_daily (
    account_id TEXT NOT NULL,
    day TEXT NOT NULL,
    region INTEGER NOT NULL,
    payg_units INTEGER NOT NULL,
    payg_micros INTEGER NOT NULL,
    PRIMARY KEY (account_id, day, region)
) WITHOUT ROWID;
CREATE TABLE offsets_daily (
    account_id TEXT NOT NULL,
    day TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    units INTEGER NOT NULL,
    PRIMARY KEY (account_id, day, plan_id)
) WITHOUT ROWID;
CREATE INDEX offsets_by_day ON offsets_daily (day);
CREATE INDEX usage_by_day ON usage_daily (day);
CREATE TABLE features_daily (
    account_id TEXT NOT NULL,
    day TEXT NOT NULL,
    start_scenarios INTEGER NOT NULL,
    start_custom INTEGER NOT NULL,
    max_scenarios INTEGER NOT NULL,
    custom_any INTEGER NOT NULL,
    PRIMARY KEY (account_id, day)
) WITHOUT ROWID;
"""

SCHEMA_V2 = """
CREATE TABLE bills (
    account_id TEXT NOT NULL,
    day TEXT NOT NULL,
    bill_date TEXT NOT NULL,
    lines TEXT NOT NULL,
    plan_offsets TEXT NOT NULL,
    total_micros INTEGER NOT NULL,
    amount_due_micros INTEGER NOT NULL,
    paid_voucher_micros INTEGER NOT NULL,
    paid_cash_micros INTEGER NOT NULL,
    outstanding_micros INTEGER NOT NULL,
    issued_at_us INTEGER NOT NULL,
    journal_seq INTEGER NOT NULL,
    PRIMARY KEY (account_id, day)
) WITHOUT ROWID;
CREATE INDEX bills_by_day ON bills (day);
CREATE TRIGGER bills_no_update BEFORE UPDATE ON bills
    BEGIN SELECT RAISE(ABORT, 'a bill, once issued, never changes (R19)'); END;
CREATE TRIGGER bills_no_delete BEFORE DELETE ON bills
    BEGIN SELECT RAISE(ABORT, 'a bill, once issued, never changes (R19)'); END;
"""

# Each migration takes the schema from version i to i+1; never edit one that has shipped.
MIGRATIONS: list[str] = [SCHEMA_V1, SCHEMA_V2]
SCHEMA_VERSION = len(MIGRATIONS)


class DatabaseLocked(RuntimeError):
    """Another server holds the database: refuse to start (CONTRACT: single writer)."""


@dataclass(slots=True)
class Entry:
    seq: int
    at_us: int
    kind: str
    account_id: str | None
    request_id: str | None
    fingerprint: str | None
    payload: dict[str, Any]


def canonical_json(payload: dict[str, Any]) -> str:
    """Compact and deterministic for a given dict (the hash covers the stored text itself)."""
    return json.dumps(payload, separators=(",", ":"))


def chain_hash(prev: bytes, seq: int, at_us: int, kind: str, account_id: str | None,
               request_id: str | None, payload_json: str) -> bytes:
    """Each entry's hash covers the previous hash and every stored field of the entry."""
    fields = f"{seq}|{at_us}|{kind}|{account_id or ''}|{request_id or ''}|{payload_json}"
    return hashlib.sha256(prev + fields.encode()).digest()


@dataclass(slots=True)
class UnitOfWork:
    """Everything one group commit writes: entries plus the derived rows they change."""

    rows: list[tuple] = field(default_factory=list)
    accounts: dict[str, AccountState] = field(default_factory=dict)
    plans: dict[str, PlanState] = field(default_factory=dict)  # changed plans
    new_plans: dict[str, PlanState] = field(default_factory=dict)  # bought in this group
    usage: dict[tuple[str, str, int], list[int]] = field(default_factory=dict)
    offsets: dict[tuple[str, str, str], int] = field(default_factory=dict)
    features: dict[tuple[str, str], tuple[int, int, int, int]] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    bills: list[tuple] = field(default_factory=list)
    keys: dict[tuple[str, str, str], int] = field(default_factory=dict)
    last_hash: bytes = GENESIS_HASH
    next_seq: int = 1

    def append(self, e: Entry) -> int:
        """Seal the entry into the chain and queue it; returns its seq."""
        assert e.seq == self.next_seq, "journal order is total and gap-free"
        return self.append_json(e.at_us, e.kind, e.account_id, e.request_id, e.fingerprint,
                                canonical_json(e.payload))

    def append_json(self, at_us: int, kind: str, account_id: str | None,
                    request_id: str | None, fingerprint: str | None, payload_json: str) -> int:
        """The same, for a payload already rendered as JSON (the Consume hot path)."""
        seq = self.next_seq
        self.last_hash = chain_hash(self.last_hash, seq, at_us, kind, account_id, request_id,
                                    payload_json)
        self.rows.append((seq, at_us, kind, account_id, request_id, fingerprint, payload_json,
                          self.last_hash))
        if request_id is not None:
            self.keys[(account_id or "", kind, request_id)] = seq
        self.next_seq = seq + 1
        return seq

    def __len__(self) -> int:
        return len(self.rows)


def _connect(path: str, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
    return conn


class Store:
    """Owns the database file: the lock, the schema, the writer connection and readers."""

    def __init__(self, path: str | os.PathLike[str], *, lock: bool = True) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = self._take_lock() if lock else None
        self.conn = _connect(self.path)
        self.db = sqlite_utils.Database(self.conn)
        self._migrate()
        self._local = threading.local()
        self.commits = 0
        self.entries_committed = 0

    # ------------------------------------------------------------------ lifecycle

    def _take_lock(self) -> int:
        lock_path = self.path + ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DatabaseLocked(
                f"the database {self.path} is in use by another quota-ledger server "
                f"(pid {holder}); only one server may write to it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}, newer than this build's "
                f"{SCHEMA_VERSION}; upgrade quota-ledger"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _statements(MIGRATIONS[target - 1]):
                    self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version = {target}")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self.conn.close()
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def checkpoint(self) -> None:
        """TRAPS: long-lived readers can starve the checkpoint; run this on a schedule."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def reader(self) -> sqlite3.Connection:
        """A read-only connection for the calling thread; sees only committed data."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, readonly=True)
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    # ------------------------------------------------------------------ writer-side loads

    def journal_tail(self) -> tuple[int, bytes, int]:
        """(last seq, last hash, last at_us): where the next entry continues the chain."""
        row = self.conn.execute(
            "SELECT seq, hash, at_us FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], bytes(row[1]), row[2]) if row else (0, GENESIS_HASH, 0)

    def first_entry_at(self) -> int | None:
        row = self.conn.execute("SELECT at_us FROM journal ORDER BY seq LIMIT 1").fetchone()
        return row[0] if row else None

    def overdue_accounts(self) -> list[tuple[str, int]]:
        return [tuple(r) for r in self.conn.execute(  # type: ignore[misc]
            "SELECT account_id, overdue_since_us FROM accounts"
            " WHERE overdue_since_us IS NOT NULL AND status != ?",
            (int(AccountStatus.SUSPENDED),))]

    def meta_get(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def load_account(self, account_id: str) -> AccountState | None:
        acct = read_account(self.conn, account_id)
        if acct is not None:
            acct.live_plans = self.load_plans(
                "WHERE account_id = ? AND refunded_at_us IS NULL AND units_remaining > 0",
                (account_id,))
        return acct

    def load_plans(self, where: str, params: tuple = ()) -> list[PlanState]:
        return read_plans(self.conn, where, params)

    def find_key(self, account_id: str, kind: str, request_id: str
                 ) -> tuple[int, str | None, str, int] | None:
        """R12: the entry that already claimed this key: (seq, fingerprint, payload, at_us)."""
        row = self.conn.execute(
            "SELECT seq, fingerprint, payload, at_us FROM journal"
            " WHERE account_id = ? AND kind = ? AND request_id = ?",
            (account_id, kind, request_id)).fetchone()
        return (row[0], row[1], row[2], row[3]) if row else None

    def find_keys(self, keys: list[tuple[str, str, str]]
                  ) -> dict[tuple[str, str, str], tuple[int, str | None, str, int]]:
        """R12 for a whole group at once: {key: (seq, fingerprint, payload_json, at_us)}."""
        found = {}
        for i in range(0, len(keys), KEYS_PER_LOOKUP_MAX):
            chunk = keys[i:i + KEYS_PER_LOOKUP_MAX]
            values = ",".join(["(?,?,?)"] * len(chunk))
            params = [x for k in chunk for x in k]
            for row in self.conn.execute(
                    f"SELECT j.account_id, j.kind, j.request_id, j.seq, j.fingerprint, j.payload,"
                    f" j.at_us FROM (VALUES {values}) v JOIN journal j ON j.account_id = v.column1"
                    " AND j.kind = v.column2 AND j.request_id = v.column3"
                    " AND j.request_id IS NOT NULL", params):
                found[(row[0], row[1], row[2])] = (row[3], row[4], row[5], row[6])
        return found

    def feature_day(self, account_id: str, day: str) -> tuple[int, int, int, int] | None:
        row = self.conn.execute(
            "SELECT start_scenarios, start_custom, max_scenarios, custom_any FROM features_daily"
            " WHERE account_id = ? AND day = ?", (account_id, day)).fetchone()
        return tuple(row) if row else None  # type: ignore[return-value]

    # ------------------------------------------------------------------ the group commit

    def commit(self, uow: UnitOfWork) -> None:
        """Write one group in one transaction. Raises Unavailable; then nothing was written."""
        c = self.conn
        fault("before_commit")
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                self._write(c, uow)
                fault("during_commit")
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OverflowError) as exc:
            raise Unavailable(f"the journal could not be written: {exc}") from exc
        self.commits += 1
        self.entries_committed += len(uow.rows)

    @staticmethod
    def _write(c: sqlite3.Connection, uow: UnitOfWork) -> None:
        c.executemany("INSERT INTO journal VALUES (?,?,?,?,?,?,?,?)", uow.rows)
        if uow.accounts:
            c.executemany(
                "INSERT OR REPLACE INTO accounts VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [(a.account_id, a.display_name, a.created_at, int(a.status), a.cash_micros,
                  a.voucher_micros, a.outstanding_micros, a.overdue_since, a.suspended_at,
                  json.dumps(list(a.scenario_ids)), int(a.custom_policy_enabled))
                 for a in uow.accounts.values()])
        if uow.new_plans:
            c.executemany(
                "INSERT INTO plans VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(p.plan_id, p.account_id, p.spec_id, p.units_total, p.units_remaining,
                  p.units_forfeited, p.price_micros, int(p.validity), p.purchased_at,
                  p.expires_at, p.purchase_seq, p.paid_voucher_micros, p.paid_cash_micros,
                  p.refunded_at) for p in uow.new_plans.values()])
        changed = [(p.units_remaining, p.units_forfeited, p.refunded_at, p.plan_id)
                   for plan_id, p in uow.plans.items() if plan_id not in uow.new_plans]
        if changed:
            # Only these three columns of a plan ever change; an UPDATE leaves the indexes
            # alone, where INSERT OR REPLACE would delete and re-insert the row.
            cur = c.executemany("UPDATE plans SET units_remaining = ?, units_forfeited = ?,"
                                " refunded_at_us = ? WHERE plan_id = ?", changed)
            if cur.rowcount != len(changed):
                raise sqlite3.IntegrityError("a plan to update is not in the plans table")
        if uow.usage:
            c.executemany(
                "INSERT INTO usage_daily VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET"
                " payg_units = payg_units + excluded.payg_units,"
                " payg_micros = payg_micros + excluded.payg_micros",
                [(*k, v[0], v[1]) for k, v in uow.usage.items()])
        if uow.offsets:
            c.executemany(
                "INSERT INTO offsets_daily VALUES (?,?,?,?) ON CONFLICT DO UPDATE SET"
                " units = units + excluded.units",
                [(*k, v) for k, v in uow.offsets.items()])
        if uow.features:
            c.executemany("INSERT OR REPLACE INTO features_daily VALUES (?,?,?,?,?,?)",
                          [(*k, *v) for k, v in uow.features.items()])
        if uow.bills:
            c.executemany("INSERT INTO bills VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", uow.bills)
        if uow.meta:
            c.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)", list(uow.meta.items()))


def _statements(script: str) -> list[str]:
    """Split a schema script into statements, keeping trigger bodies whole."""
    out, buf = [], []
    for line in script.strip().splitlines():
        buf.append(line)
        joined = "\n".join(buf).strip()
        if joined.endswith(";") and sqlite3.complete_statement(joined):
            out.append(joined)
            buf = []
    return out


# ---------------------------------------------------------------------- read queries
# Run on a reader connection (Store.reader()): they see only committed state.

_ACCOUNT_COLUMNS = (
    "account_id, display_name, created_at_us, status, cash_micros, voucher_micros,"
    " outstanding_micros, overdue_since_us, suspended_at_us, scenario_ids, custom_policy")


def read_account(conn: sqlite3.Connection, account_id: str) -> AccountState | None:
    row = conn.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE account_id = ?",
                       (account_id,)).fetchone()
    if row is None:
        return None
    return AccountState(
        account_id=row[0], display_name=row[1], created_at=row[2],
        status=AccountStatus(row[3]), cash_micros=row[4], voucher_micros=row[5],
        outstanding_micros=row[6], overdue_since=row[7], suspended_at=row[8],
        scenario_ids=tuple(json.loads(row[9])), custom_policy_enabled=bool(row[10]))


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
            " WHERE (json_array_length(scenario_ids) > 0 OR custom_policy) AND created_at_us < ?",
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
    cur = conn.execute("SELECT * FROM plans")
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
