"""The SQLite schema and its migrations (``PRAGMA user_version`` is the applied count)."""

from __future__ import annotations

import sqlite3

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

# Consume blocks (issue 9): consumes are written as journal rows of kind 'consume_block'
# (MessagePack payload, see ledger/store/blocks.py); their keys are indexed off the commit
# path (ledger/store/keyindex.py). Rows written before keep their meaning.
SCHEMA_V3 = """
CREATE TABLE consume_keys (
    run INTEGER NOT NULL,
    h INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    PRIMARY KEY (run, h, seq, idx)
) WITHOUT ROWID;
CREATE TABLE key_runs (
    run INTEGER PRIMARY KEY,
    through_seq INTEGER NOT NULL,
    keys INTEGER NOT NULL
);
CREATE TABLE key_filter (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    through_run INTEGER NOT NULL,
    keys INTEGER NOT NULL,
    bits BLOB NOT NULL
);
"""

# Key runs as sorted pages (issue 19): a run is written as pages of sorted 64-bit key hashes
# and their journal locations, not a row per key; key_runs keeps each run's page fences and
# its own filter; the filter's snapshot is chunk rows, its coverage a meta row. Runs written
# before (rows in consume_keys) are converted at start.
SCHEMA_V4 = """
CREATE TABLE key_pages (
    run INTEGER NOT NULL,
    page INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (run, page)
);
ALTER TABLE key_runs ADD COLUMN fences BLOB;
ALTER TABLE key_runs ADD COLUMN filter BLOB;
CREATE TABLE key_filter_chunks (
    chunk INTEGER PRIMARY KEY,
    bits BLOB NOT NULL
);
"""

# The notice outbox (issue 22): written in the transaction of the entry that causes each
# notice; the id is the fact's, so a fact noticed again (a restart, R19) adds nothing.
# Delivery state lives elsewhere (server/notice_queue.py): the writer never waits on it.
SCHEMA_V5 = """
CREATE TABLE notices (
    notice_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    at_us INTEGER NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX notices_by_account ON notices (account_id, at_us);
CREATE INDEX notices_by_time ON notices (at_us);
"""

# Derived rows found by integer keys (issue 19): a consume group updates each touched plan
# and its offsets row for the day, and found by a text key each costs about half again to
# twice what it costs by rowid. A plan's rowid becomes its purchase_seq (unique in every
# store); an offsets row's rowid becomes its plan's purchase_seq * OFFSET_DAY_SLOTS + its
# day's number since 1970-01-01 (ledger/store/sqlite_rows.py). The text keys stay as they
# were, a unique index now, so every reader keeps its queries. A row whose rowid could not
# be computed (an offsets row of no plan, a day that is not a date) stops the migration: the
# CHECK of the temporary table fails, and nothing of it is applied.
OFFSET_DAY_SLOTS = 1 << 20  # day numbers below 2**20: dates until the year 4840
SCHEMA_V6 = f"""
CREATE TEMP TABLE v6_unkeyed (n INTEGER CHECK (n = 0));
INSERT INTO v6_unkeyed SELECT count(*) FROM offsets_daily o
    WHERE julianday(o.day) IS NULL
       OR NOT EXISTS (SELECT 1 FROM plans p WHERE p.plan_id = o.plan_id);
DROP TABLE v6_unkeyed;
UPDATE plans SET rowid = -purchase_seq;
UPDATE plans SET rowid = -rowid;
CREATE TABLE offsets_daily_v6 (
    account_id TEXT NOT NULL,
    day TEXT NOT NULL,
    plan_id TEXT NOT NULL,
    units INTEGER NOT NULL,
    PRIMARY KEY (account_id, day, plan_id)
);
INSERT INTO offsets_daily_v6 (rowid, account_id, day, plan_id, units)
    SELECT p.purchase_seq * {OFFSET_DAY_SLOTS}
           + CAST(julianday(o.day) - julianday('1970-01-01') AS INTEGER),
           o.account_id, o.day, o.plan_id, o.units
    FROM offsets_daily o JOIN plans p ON p.plan_id = o.plan_id;
DROP TABLE offsets_daily;
ALTER TABLE offsets_daily_v6 RENAME TO offsets_daily;
CREATE INDEX offsets_by_day ON offsets_daily (day);
"""

# A plan's offsets of its newest day live in its own row (issue 19): a consume group then
# writes one row per plan it takes from, not two (the plan and its offsets_daily row). The
# plan's row holds its newest day (``offsets_day``) and that day's units; the older days
# are rows of ``offsets_past``; ``offsets_daily`` becomes a view of both, with the columns
# it had, so every reader keeps its queries. A (plan, day) is in exactly one of the two:
# the writer moves a plan's day into offsets_past only when a later day's consume comes
# (ledger/store/sqlite_rows.py), and the ledger's clock never goes back. The migration
# moves each plan's newest day into its row (correlated subqueries on offsets_past's key, not
# UPDATE ... FROM, which older SQLite builds lack).
SCHEMA_V7 = """
ALTER TABLE offsets_daily RENAME TO offsets_past;
ALTER TABLE plans ADD COLUMN offsets_day TEXT;
ALTER TABLE plans ADD COLUMN offsets_units INTEGER NOT NULL DEFAULT 0;
UPDATE plans SET offsets_day = (SELECT max(o.day) FROM offsets_past o
                                 WHERE o.account_id = plans.account_id
                                   AND o.plan_id = plans.plan_id);
UPDATE plans SET offsets_units = (SELECT o.units FROM offsets_past o
                                  WHERE o.account_id = plans.account_id
                                    AND o.day = plans.offsets_day AND o.plan_id = plans.plan_id)
    WHERE offsets_day IS NOT NULL;
DELETE FROM offsets_past WHERE (plan_id, day) IN
    (SELECT plan_id, offsets_day FROM plans WHERE offsets_units > 0);
CREATE INDEX plans_by_offsets_day ON plans (offsets_day);
CREATE VIEW offsets_daily (account_id, day, plan_id, units) AS
    SELECT account_id, day, plan_id, units FROM offsets_past
    UNION ALL
    SELECT account_id, offsets_day, plan_id, offsets_units FROM plans WHERE offsets_units > 0;
"""

# Each migration takes the schema from version i to i+1; never edit one that has shipped.
MIGRATIONS: list[str] = [SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6,
                         SCHEMA_V7]
SCHEMA_VERSION = len(MIGRATIONS)


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
