"""Check a journal database: SQLite integrity, the hash chain, and R25 (every derived figure
equals a rebuild from the journal alone). Reports the first divergence precisely."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from . import store as st
from .rebuild import rebuild
from .store import blocks

TAIL_CHECK_ENTRIES = 100_000  # rows the server re-hashes at start at most (a full replay is
TAIL_CHECK_BYTES = 16 * 1024 * 1024  # verify's), and about this much payload at most
VERIFY_ROWS_PER_FETCH = 2_000  # PostgreSQL: journal rows fetched at a time


@dataclass
class Report:
    entries: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class ChainBroken(RuntimeError):
    def __init__(self, seq: int, why: str, where: str | None = None) -> None:
        super().__init__(f"{where or f'journal entry {seq}'}: {why}")
        self.seq = seq


def check_chain(conn: sqlite3.Connection, from_seq: int = 1, *, decode: bool = True):
    """Yield (seq, at, kind, account_id, payload) while checking order and hashes (the
    payload decoded, or None with ``decode=False``: the hashes alone cost far less)."""
    rows = ((0, *row) for row in st.iter_journal(conn, from_seq))
    yield from _checked(rows, {0: st.hash_before(conn, from_seq)}, {0: from_seq}, decode)


def check_node_chains(conn: Any, *, decode: bool = True):
    """PostgreSQL (R25 as amended): every node's chain, checked in one pass in gseq order,
    which is each node's seq order and each account's order; yields as check_chain."""
    rows = conn.raw.cursor(name="quota_ledger_verify")  # server-side: streamed
    rows.itersize = VERIFY_ROWS_PER_FETCH
    rows.execute("SELECT node, seq, at_us, kind, account_id, request_id, fingerprint,"
                 " payload, hash FROM journal ORDER BY gseq")
    yield from _checked(rows, {}, {}, decode, nodes=True)


def _checked(rows: Any, prev: dict[int, bytes], expected: dict[int, int], decode: bool,
             nodes: bool = False):
    for node, seq, at, kind, account_id, request_id, _fp, payload_json, digest in rows:
        where = f"node {node}'s entry {seq}" if nodes else None
        if seq != expected.get(node, 1):
            raise ChainBroken(seq, f"sequence gap: expected entry {expected.get(node, 1)}",
                              where)
        payload_json = bytes(payload_json) if isinstance(payload_json, memoryview) else \
            payload_json
        want = st.chain_hash(prev.get(node, st.GENESIS_HASH), seq, at, kind, account_id,
                             request_id, payload_json)
        if bytes(digest) != want:
            raise ChainBroken(seq, f"hash mismatch ({kind} entry altered after it was written)",
                              where)
        payload = None
        if decode:
            try:
                payload = (blocks.decode(payload_json) if kind == blocks.BLOCK_KIND
                           else json.loads(payload_json))
            except ValueError as exc:
                raise ChainBroken(seq, f"payload cannot be read ({exc})", where) from None
        prev[node], expected[node] = want, seq + 1
        yield seq, at, kind, account_id, payload


def check_tail(conn: sqlite3.Connection, entries: int = TAIL_CHECK_ENTRIES,
               bytes_max: int = TAIL_CHECK_BYTES) -> None:
    """At server start: re-hash the newest rows, at most ``entries`` of them and about
    ``bytes_max`` of payload (a consume block holds up to thousands of requests), without
    decoding them; raises ChainBroken. A full replay is ``verify``'s."""
    start, rows, size = 0, 0, 0
    for seq, length in conn.execute(
            "SELECT seq, length(payload) FROM journal ORDER BY seq DESC"):
        start, rows, size = seq, rows + 1, size + length
        if rows >= entries or size >= bytes_max:
            break
    if start:
        for _ in check_chain(conn, start, decode=False):
            pass


def check_node_tail(conn: Any, node: int, entries: int = TAIL_CHECK_ENTRIES,
                    bytes_max: int = TAIL_CHECK_BYTES) -> None:
    """PostgreSQL, at a node's start: the same bounded re-hash of its own chain's tail."""
    start, rows, size = 0, 0, 0
    for seq, length in conn.execute(
            "SELECT seq, length(payload) FROM journal WHERE node = ? ORDER BY seq DESC",
            (node,)):
        start, rows, size = seq, rows + 1, size + length
        if rows >= entries or size >= bytes_max:
            break
    if not start:
        return
    row = conn.execute("SELECT hash FROM journal WHERE node = ? AND seq = ?",
                       (node, start - 1)).fetchone()
    tail = conn.execute("SELECT node, seq, at_us, kind, account_id, request_id, fingerprint,"
                        " payload, hash FROM journal WHERE node = ? AND seq >= ? ORDER BY seq",
                        (node, start))
    prev = bytes(row[0]) if row else st.GENESIS_HASH
    for _ in _checked(tail, {node: prev}, {node: start}, False, nodes=True):
        pass


def verify(path: str) -> Report:
    """``quota-ledger verify``: an SQLite file, or a PostgreSQL URL (every node's chain)."""
    if st.is_pg_url(path):
        return _verify_pg(path)
    report = Report()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != st.SCHEMA_VERSION:
            report.problems.append(
                f"schema version {version}, this build reads {st.SCHEMA_VERSION} (start the "
                "server once on it to migrate, or use the matching build)")
            return report
        result = conn.execute("PRAGMA integrity_check").fetchall()
        if result != [("ok",)]:
            report.problems.append("SQLite integrity_check: " + "; ".join(r[0] for r in result))
            return report
        _replay(report, conn, check_chain(conn))
    finally:
        conn.close()
    return report


def _verify_pg(url: str) -> Report:
    import psycopg

    from .store.pg_schema import PG_SCHEMA_VERSION
    from .store.postgres import PgConn
    report = Report()
    try:
        raw = psycopg.connect(url, autocommit=True)
    except psycopg.Error as exc:
        report.problems.append(f"cannot connect to {st.mask_url(url)}: {exc}")
        return report
    try:
        with raw.transaction():  # one snapshot: the journal and the tables agree in it
            raw.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            conn = PgConn(raw)
            found = conn.execute("SELECT to_regclass('schema_version')").fetchone()[0]
            version = (conn.execute("SELECT version FROM schema_version").fetchone() or (0,))[0] \
                if found else 0
            if version != PG_SCHEMA_VERSION:
                report.problems.append(f"schema version {version}, this build reads "
                                       f"{PG_SCHEMA_VERSION}")
                return report
            _replay(report, conn, check_node_chains(conn))
    finally:
        raw.close()
    return report


def _replay(report: Report, conn: Any, entries: Any) -> None:
    """R25: fold the checked entries and compare with the stored derived tables."""
    counted = _Counted(entries)  # streamed: memory does not grow with history
    try:
        derived = rebuild(counted)
    except ChainBroken as exc:
        report.problems.append(str(exc))
        return
    except (KeyError, ValueError, TypeError) as exc:
        report.problems.append(f"the journal cannot be replayed: {exc!r}")
        return
    report.entries = counted.n
    stored = st.dump_derived(conn)
    for table in ("accounts", "plans", "usage_daily", "offsets_daily", "features_daily",
                  "bills"):
        problem = _first_difference(table, getattr(derived, table), stored[table])
        if problem:
            report.problems.append(problem)


def _first_difference(table: str, rebuilt: dict[Any, Any], stored: dict[Any, Any]) -> str | None:
    for key in sorted(set(rebuilt) | set(stored), key=repr):
        if key not in stored:
            return f"{table} {key!r}: the journal implies a row the table lacks"
        if key not in rebuilt:
            return f"{table} {key!r}: the table has a row the journal does not imply"
        a, b = rebuilt[key], stored[key]
        if isinstance(a, dict):
            for col in sorted(set(a) | set(b)):
                if col in a and col in b and a[col] != b[col]:
                    return (f"{table} {key!r}.{col}: table has {b[col]!r}, "
                            f"the journal implies {a[col]!r}")
        elif _norm(a) != _norm(b):
            return f"{table} {key!r}: table has {b!r}, the journal implies {a!r}"
    return None


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


class _Counted:
    """Iterate while counting."""

    def __init__(self, it: Any) -> None:
        self.it, self.n = it, 0

    def __iter__(self) -> Any:
        for item in self.it:
            self.n += 1
            yield item
