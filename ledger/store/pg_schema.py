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

# A small consume group's two steps as one statement per account (issue 20): the same
# statements, in the same order for each account, as the pipelines of
# ``PgStore.open_group_with`` and ``pg_write.queue_write`` send (a lone consume's group:
# fifteen statements, each parsed, bound and executed on its own), with scalar arguments.
# ``ql_open_one``: the settlement lock (shared) and the shared meta (the group's first call:
# a NULL ``settle_class`` skips both), the account's lock with the time it waited, the
# account's version, and its consume key's row. ``ql_write_one``: the
# journal row (the group's first call only), the account's changed plan and offsets row, its
# usage row, its key, and its version bump when a plan changed (as ``pg_write._touched`` has
# it: the (account, version) row it returns). A NULL argument skips its row; the plan UPDATE
# must find its row, as the key INSERT must claim its key (R12).
PG_SCHEMA_V3 = """
CREATE FUNCTION ql_open_one(settle_class integer, settle_key integer, lock_key bigint,
                            acct text, req text,
                            OUT o_meta_keys text[], OUT o_meta_values text[],
                            OUT o_version bigint, OUT o_key_node integer,
                            OUT o_key_seq bigint, OUT o_key_idx integer,
                            OUT o_waited_s double precision)
LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz;
BEGIN
    IF settle_class IS NOT NULL THEN  -- the group's first call
        PERFORM pg_advisory_xact_lock_shared(settle_class, settle_key);
        SELECT array_agg(m.key), array_agg(m.value) INTO o_meta_keys, o_meta_values
            FROM meta m;
    END IF;
    t0 := clock_timestamp();
    PERFORM pg_advisory_xact_lock(lock_key);
    o_waited_s := extract(epoch FROM clock_timestamp() - t0);
    SELECT a.version INTO o_version FROM accounts a WHERE a.account_id = acct;
    IF req IS NOT NULL THEN
        SELECT k.node, k.seq, k.idx INTO o_key_node, o_key_seq, o_key_idx
            FROM consume_keys k WHERE k.account_id = acct AND k.request_id = req;
    END IF;
END $$;
CREATE FUNCTION ql_write_one(j_node integer, j_seq bigint, j_at bigint, j_kind text,
                             j_account text, j_request text, j_fingerprint text,
                             j_payload bytea, j_hash bytea,
                             p_id text, p_remaining bigint, p_forfeited bigint,
                             p_refunded bigint, p_account text,
                             o_account text, o_day text, o_plan text, o_units bigint,
                             u_account text, u_day text, u_region integer, u_units bigint,
                             u_micros bigint,
                             k_account text, k_request text, k_seq bigint, k_idx integer,
                             n_node integer)
RETURNS TABLE (r_account text, r_version bigint) LANGUAGE plpgsql AS $$
BEGIN
    IF j_seq IS NOT NULL THEN
        INSERT INTO journal (node, seq, at_us, kind, account_id, request_id, fingerprint,
                             payload, hash)
            VALUES (j_node, j_seq, j_at, j_kind, j_account, j_request, j_fingerprint,
                    j_payload, j_hash);
    END IF;
    IF p_id IS NOT NULL THEN
        UPDATE plans SET units_remaining = p_remaining, units_forfeited = p_forfeited,
                         refunded_at_us = p_refunded WHERE plan_id = p_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'plan % is not in the plans table', p_id;
        END IF;
    END IF;
    IF o_plan IS NOT NULL THEN
        INSERT INTO offsets_daily VALUES (o_account, o_day, o_plan, o_units)
            ON CONFLICT (account_id, day, plan_id) DO UPDATE
            SET units = offsets_daily.units + excluded.units;
    END IF;
    IF u_region IS NOT NULL THEN
        INSERT INTO usage_daily VALUES (u_account, u_day, u_region, u_units, u_micros)
            ON CONFLICT (account_id, day, region) DO UPDATE
            SET payg_units = usage_daily.payg_units + excluded.payg_units,
                payg_micros = usage_daily.payg_micros + excluded.payg_micros;
    END IF;
    IF k_request IS NOT NULL THEN
        INSERT INTO consume_keys VALUES (k_account, k_request, n_node, k_seq, k_idx);
    END IF;
    IF p_account IS NOT NULL THEN
        UPDATE accounts a SET version = a.version + 1 WHERE a.account_id = p_account
            RETURNING a.account_id, a.version INTO r_account, r_version;
        RETURN NEXT;
    END IF;
END $$;
"""

# An optimistic consume group's check (issue 20, ``PgStore.commit`` with a check): the
# group was decided on the node's cached accounts and meta, without opening its
# transaction first, and its check goes in the same pipeline as its writes and COMMIT (one
# round trip). It takes the settlement lock (shared) and the accounts' locks in the order
# given (sorted: no deadlocks), as ``PgStore.open_group_with`` does, then compares, under
# those locks, the meta's shared clock and settled day and each account's version with what
# the node decided on. A difference raises SQLSTATE QL409 (its detail: the accounts whose
# version moved; its hint: the seconds the locks took), so nothing of the group is written.
# Returns the seconds the accounts' locks took. The lists come as one space-separated text
# each (an id has no space): psycopg dumps a list parameter item by item in Python.
PG_SCHEMA_V4 = """
CREATE FUNCTION ql_check(settle_class integer, settle_key integer, lock_keys text,
                         accts text, versions text, clock_key text, want_clock text,
                         settled_key text, want_settled text)
RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; waited double precision; moved text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(settle_class, settle_key);
    t0 := clock_timestamp();
    PERFORM pg_advisory_xact_lock(k)
        FROM unnest(string_to_array(lock_keys, ' ')::bigint[]) AS k;
    waited := extract(epoch FROM clock_timestamp() - t0);
    IF (SELECT m.value FROM meta m WHERE m.key = clock_key) IS DISTINCT FROM want_clock
       OR (SELECT m.value FROM meta m WHERE m.key = settled_key)
          IS DISTINCT FROM want_settled THEN
        RAISE EXCEPTION 'the shared clock or the settled day moved'
            USING ERRCODE = 'QL409', HINT = waited::text;
    END IF;
    SELECT string_agg(w.a, ' ') INTO moved
        FROM unnest(string_to_array(accts, ' '), string_to_array(versions, ' ')::bigint[])
             AS w(a, v)
        LEFT JOIN accounts x ON x.account_id = w.a
        WHERE x.version IS DISTINCT FROM w.v;
    IF moved IS NOT NULL THEN
        RAISE EXCEPTION 'accounts changed by another node: %', moved
            USING ERRCODE = 'QL409', DETAIL = moved, HINT = waited::text;
    END IF;
    RETURN waited;
END $$;
"""

# Cheaper consume writes (issue 20). Measured with pg_stat_statements on one node under
# 4 x 16 streams (groups of about 24 accounts):
# - A consume updates its plan's units_remaining, which the partial index of live plans
#   named in its predicate: so no update of a plan could be HOT (heap-only: no new index
#   entries), and each cost 23-26 µs. The index now names only refunded_at_us (the
#   expiry query still reads units_remaining > 0 from the rows it finds), and plans and
#   accounts leave a fifth of each new page free for their HOT updates. Measured the same
#   way: 12.7 µs a plan's update.
PG_SCHEMA_V5 = """
DROP INDEX plans_live_by_expiry;
CREATE INDEX plans_live_by_expiry ON plans (expires_at_us) WHERE refunded_at_us IS NULL;
ALTER TABLE plans SET (fillfactor = 80);
ALTER TABLE accounts SET (fillfactor = 80);
"""

# A consume group's writes as one statement (issue 20, ``pg_write.group_call``): its
# journal row, its changed plans, its offsets and usage rows, its keys and its accounts'
# version bumps, each list as one text of its values separated by chr(31) (no id holds
# it), which psycopg sends as it is instead of dumping a list item by item in Python, and
# one statement instead of six, each parsed, bound and answered on its own. 'None' is a
# NULL refund instant. Returns the bumped accounts' (account, version) rows.
PG_SCHEMA_V6 = """
CREATE FUNCTION ql_write_group(j_node integer, j_seq bigint, j_at bigint, j_kind text,
                               j_account text, j_request text, j_fingerprint text,
                               j_payload bytea, j_hash bytea,
                               p_ids text, p_remaining text, p_forfeited text,
                               p_refunded text,
                               o_accounts text, o_days text, o_plans text, o_units text,
                               u_accounts text, u_days text, u_regions text, u_units text,
                               u_micros text,
                               k_accounts text, k_requests text, k_seqs text, k_idxs text,
                               bump text)
RETURNS TABLE (r_account text, r_version bigint) LANGUAGE plpgsql AS $$
DECLARE sep constant text := chr(31);
BEGIN
    INSERT INTO journal (node, seq, at_us, kind, account_id, request_id, fingerprint,
                         payload, hash)
        VALUES (j_node, j_seq, j_at, j_kind, j_account, j_request, j_fingerprint,
                j_payload, j_hash);
    IF p_ids <> '' THEN
        UPDATE plans p SET units_remaining = u.r, units_forfeited = u.f,
                           refunded_at_us = u.ra
            FROM unnest(string_to_array(p_ids, sep),
                        string_to_array(p_remaining, sep)::bigint[],
                        string_to_array(p_forfeited, sep)::bigint[],
                        string_to_array(p_refunded, sep, 'None')::bigint[]) AS u(id, r, f, ra)
            WHERE p.plan_id = u.id;
    END IF;
    IF o_accounts <> '' THEN
        INSERT INTO offsets_daily
            SELECT * FROM unnest(string_to_array(o_accounts, sep),
                                 string_to_array(o_days, sep),
                                 string_to_array(o_plans, sep),
                                 string_to_array(o_units, sep)::bigint[])
            ON CONFLICT (account_id, day, plan_id) DO UPDATE
            SET units = offsets_daily.units + excluded.units;
    END IF;
    IF u_accounts <> '' THEN
        INSERT INTO usage_daily
            SELECT * FROM unnest(string_to_array(u_accounts, sep),
                                 string_to_array(u_days, sep),
                                 string_to_array(u_regions, sep)::integer[],
                                 string_to_array(u_units, sep)::bigint[],
                                 string_to_array(u_micros, sep)::bigint[])
            ON CONFLICT (account_id, day, region) DO UPDATE
            SET payg_units = usage_daily.payg_units + excluded.payg_units,
                payg_micros = usage_daily.payg_micros + excluded.payg_micros;
    END IF;
    IF k_accounts <> '' THEN
        INSERT INTO consume_keys
            SELECT w.a, w.r, j_node, w.s, w.i
            FROM unnest(string_to_array(k_accounts, sep), string_to_array(k_requests, sep),
                        string_to_array(k_seqs, sep)::bigint[],
                        string_to_array(k_idxs, sep)::integer[]) AS w(a, r, s, i);
    END IF;
    IF bump <> '' THEN
        RETURN QUERY UPDATE accounts a SET version = a.version + 1
            WHERE a.account_id = ANY(string_to_array(bump, sep))
            RETURNING a.account_id, a.version;
    END IF;
END $$;
"""

# Each migration takes the schema from version i to i+1; never edit one that has shipped.
PG_MIGRATIONS: list[str] = [PG_SCHEMA_V1, PG_SCHEMA_V2, PG_SCHEMA_V3, PG_SCHEMA_V4,
                            PG_SCHEMA_V5, PG_SCHEMA_V6]
PG_SCHEMA_VERSION = len(PG_MIGRATIONS)
