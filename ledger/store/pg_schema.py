"""The PostgreSQL schema and its migrations (the ``schema_version`` table holds the count).

The same tables as SQLite's (:mod:`.schema`), with what several nodes on one database need
(issue 11, R25 as amended):

- ``journal.node`` and ``journal.seq``: every node appends to its own hash chain, so no
  global lock orders unrelated accounts. ``journal.gseq`` is drawn from a sequence at insert
  time, after the group's account locks are held: two entries of one account are in gseq
  order (a sequence is not commit order in general, but here the later transaction could
  only draw its number after the earlier one released the account).
- ``accounts.version``: bumped by every commit that changes an account's state or plans;
  a node's cached copy is good while the version matches.
- ``consume_keys``: where each Consume's idempotency key (R12) is recorded, inserted under
  the account's lock in the same transaction as its block.
- ``json_array_length(text)``: the SQLite function the shared read queries use.
"""

from __future__ import annotations

PG_SCHEMA_V1 = """
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE journal (
    gseq bigserial PRIMARY KEY,
    node integer NOT NULL,
    seq bigint NOT NULL,
    at_us bigint NOT NULL,
    kind text NOT NULL,
    account_id text,
    request_id text,
    fingerprint text,
    payload bytea NOT NULL,
    hash bytea NOT NULL,
    UNIQUE (node, seq)
);
CREATE UNIQUE INDEX journal_idempotency ON journal (account_id, kind, request_id)
    WHERE request_id IS NOT NULL;
CREATE FUNCTION quota_ledger_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0];
END $$;
CREATE TRIGGER journal_no_change BEFORE UPDATE OR DELETE ON journal FOR EACH ROW
    EXECUTE FUNCTION quota_ledger_refuse('the journal is append-only (R25): change refused');
CREATE TABLE accounts (
    account_id text PRIMARY KEY,
    display_name text NOT NULL,
    created_at_us bigint NOT NULL,
    status integer NOT NULL,
    cash_micros bigint NOT NULL CHECK (cash_micros >= 0),
    voucher_micros bigint NOT NULL CHECK (voucher_micros >= 0),
    outstanding_micros bigint NOT NULL CHECK (outstanding_micros >= 0),
    overdue_since_us bigint,
    suspended_at_us bigint,
    scenario_ids text NOT NULL,
    custom_policy integer NOT NULL,
    version bigint NOT NULL DEFAULT 0
);
CREATE TABLE plans (
    plan_id text PRIMARY KEY,
    account_id text NOT NULL,
    spec_id text NOT NULL,
    units_total bigint NOT NULL,
    units_remaining bigint NOT NULL CHECK (units_remaining >= 0),
    units_forfeited bigint NOT NULL,
    price_micros bigint NOT NULL,
    validity integer NOT NULL,
    purchased_at_us bigint NOT NULL,
    expires_at_us bigint NOT NULL,
    purchase_seq bigint NOT NULL,
    paid_voucher_micros bigint NOT NULL,
    paid_cash_micros bigint NOT NULL,
    refunded_at_us bigint
);
CREATE INDEX plans_by_account ON plans (account_id, expires_at_us, purchase_seq);
CREATE INDEX plans_live_by_expiry ON plans (expires_at_us)
    WHERE refunded_at_us IS NULL AND units_remaining > 0;
CREATE SEQUENCE purchase_order;
CREATE TABLE usage_daily (
    account_id text NOT NULL,
    day text NOT NULL,
    region integer NOT NULL,
    payg_units bigint NOT NULL,
    payg_micros bigint NOT NULL,
    PRIMARY KEY (account_id, day, region)
);
CREATE INDEX usage_by_day ON usage_daily (day);
CREATE TABLE offsets_daily (
    account_id text NOT NULL,
    day text NOT NULL,
    plan_id text NOT NULL,
    units bigint NOT NULL,
    PRIMARY KEY (account_id, day, plan_id)
);
CREATE INDEX offsets_by_day ON offsets_daily (day);
CREATE TABLE features_daily (
    account_id text NOT NULL,
    day text NOT NULL,
    start_scenarios integer NOT NULL,
    start_custom integer NOT NULL,
    max_scenarios integer NOT NULL,
    custom_any integer NOT NULL,
    PRIMARY KEY (account_id, day)
);
CREATE TABLE bills (
    account_id text NOT NULL,
    day text NOT NULL,
    bill_date text NOT NULL,
    lines text NOT NULL,
    plan_offsets text NOT NULL,
    total_micros bigint NOT NULL,
    amount_due_micros bigint NOT NULL,
    paid_voucher_micros bigint NOT NULL,
    paid_cash_micros bigint NOT NULL,
    outstanding_micros bigint NOT NULL,
    issued_at_us bigint NOT NULL,
    journal_seq bigint NOT NULL,
    PRIMARY KEY (account_id, day)
);
CREATE INDEX bills_by_day ON bills (day);
CREATE TRIGGER bills_no_change BEFORE UPDATE OR DELETE ON bills FOR EACH ROW
    EXECUTE FUNCTION quota_ledger_refuse('a bill, once issued, never changes (R19)');
CREATE TABLE consume_keys (
    account_id text NOT NULL,
    request_id text NOT NULL,
    node integer NOT NULL,
    seq bigint NOT NULL,
    idx integer NOT NULL,
    PRIMARY KEY (account_id, request_id)
);
CREATE FUNCTION json_array_length(text) RETURNS integer LANGUAGE sql IMMUTABLE
    AS 'SELECT json_array_length($1::json)';
"""

# The notice outbox (issue 22), as in SQLite's SCHEMA_V5, and the deliveries any node may
# claim (FOR UPDATE SKIP LOCKED: one node at a time delivers one notice to one endpoint).
# ``queued`` marks a notice whose deliveries exist; the writer never updates a notice.
PG_SCHEMA_V2 = """
CREATE TABLE notices (
    notice_id text PRIMARY KEY,
    account_id text NOT NULL,
    kind text NOT NULL,
    at_us bigint NOT NULL,
    payload text NOT NULL,
    queued boolean NOT NULL DEFAULT false
);
CREATE INDEX notices_by_account ON notices (account_id, at_us);
CREATE INDEX notices_by_time ON notices (at_us);
CREATE INDEX notices_to_queue ON notices (at_us) WHERE NOT queued;
CREATE TABLE notice_deliveries (
    notice_id text NOT NULL,
    endpoint text NOT NULL,
    account_id text NOT NULL,
    at_us bigint NOT NULL,
    created_s double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_at_s double precision NOT NULL,
    delivered_at_s double precision,
    failed boolean NOT NULL DEFAULT false,
    last_error text,
    PRIMARY KEY (notice_id, endpoint)
);
CREATE INDEX notice_deliveries_due ON notice_deliveries (next_at_s)
    WHERE delivered_at_s IS NULL AND NOT failed;
"""

# Each migration takes the schema from version i to i+1; never edit one that has shipped.
PG_MIGRATIONS: list[str] = [PG_SCHEMA_V1, PG_SCHEMA_V2]
PG_SCHEMA_VERSION = len(PG_MIGRATIONS)
