"""The SQLite store: the lock, the schema, the writer connection and readers.

SQLite in WAL mode with ``synchronous=FULL`` (an acknowledged request survives a power cut,
not only a crash), explicit ``BEGIN IMMEDIATE`` transactions (TRAPS: sqlite-utils' atomic()
issues a plain BEGIN), and an exclusive lock file so a second server refuses to start.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from ..errors import Unavailable
from ..faults import fault
from ..threads import name_this_thread
from . import blocks
from .base import StoreReads
from .journal import GENESIS_HASH, UnitOfWork
from .keyindex import KeyIndex
from .queries import BUSY_TIMEOUT_MS
from .schema import MIGRATIONS, SCHEMA_VERSION, _statements
from .sqlite_rows import GroupRows

log = logging.getLogger("quota_ledger.store")

JOURNAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
# WAL checkpoints run on a thread of their own (PASSIVE: they never block the writer), never
# inside a group commit (issue 19: SQLite's automatic checkpoint paused commits 100+ ms).
CHECKPOINT_INTERVAL_S = 0.5
BLOCK_CACHE_MAX = 64  # decoded blocks kept for replays (R12)
RECOVER_ROWS_PER_READ = 10_000  # journal rows read at a time to rebuild the key memtable


class DatabaseLocked(RuntimeError):
    """Another server holds the database: refuse to start (CONTRACT: single writer)."""


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


class Store(StoreReads):
    """Owns the database file: the lock, the schema, the writer connection and readers."""

    shared = False  # one writer: its cached state is the truth

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
        self._blocks: dict[int, tuple[int, str, list]] = {}  # seq -> (at_us, day, items)
        self.rows = GroupRows()
        self.keys = self._load_keys()
        self._checkpointer: Checkpointer | None = None
        if lock:  # the writer's store: its WAL is checkpointed off the commit path
            self.conn.execute("PRAGMA wal_autocheckpoint = 0")
            self._checkpointer = Checkpointer(self.path)

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
            self.finish()
        except Exception:  # the keys and metrics of the last group only: close regardless
            log.exception("after-commit work failed at close")
        if self._checkpointer is not None:
            self._checkpointer.stop()
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
        """A full checkpoint now, on the writer's connection (tools; the server's WAL is
        checkpointed by :class:`Checkpointer`)."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def reader(self) -> sqlite3.Connection:
        """A read-only connection for the calling thread; sees only committed data."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path, readonly=True)
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """The calling thread's reader inside one read transaction: every statement sees
        the same committed state (a read of two tables is never torn by a commit between
        them; issue 23 found GetRemaining's plans and usage read at two moments)."""
        conn = self.reader()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    # ------------------------------------------------------------------ writer-side loads

    def journal_tail(self) -> tuple[int, bytes, int]:
        """(last seq, last hash, last at_us): where the next entry continues the chain."""
        row = self.conn.execute(
            "SELECT seq, hash, at_us FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], bytes(row[1]), row[2]) if row else (0, GENESIS_HASH, 0)

    def first_entry_at(self) -> int | None:
        row = self.conn.execute("SELECT at_us FROM journal ORDER BY seq LIMIT 1").fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------ consume keys (R12)

    def _consumes_after(self, seq: int) -> Iterator[tuple[int, int, str, str]]:
        """(seq, index, account_id, request_id) of every consume after seq, in order, read
        RECOVER_ROWS_PER_READ journal rows at a time (a migrated journal of one row per
        consume may hold millions; the key index writes runs between the reads)."""
        while rows := self.conn.execute(
                "SELECT seq, kind, account_id, request_id, payload FROM journal"
                " WHERE seq > ? AND kind IN ('consume', ?) ORDER BY seq LIMIT ?",
                (seq, blocks.BLOCK_KIND, RECOVER_ROWS_PER_READ)).fetchall():
            for row_seq, kind, account_id, request_id, payload in rows:
                if kind == "consume":
                    yield row_seq, -1, account_id, request_id
                else:
                    _, items = blocks.decode(payload)
                    for idx, item in enumerate(items):
                        yield row_seq, idx, item[blocks.ACCOUNT], item[blocks.REQUEST]
            seq = rows[-1][0]

    def find_consume_keys(self, keys: list[tuple[str, str]]
                          ) -> dict[tuple[str, str], blocks.Prior]:
        """R12 for a group's consumes at once: {(account_id, request_id): what it recorded}.
        The index answers where a key may be; the journal itself confirms it."""
        self.finish()  # the previous group's keys first
        found = {}
        for key, locations in self.keys.candidates(keys).items():
            for seq, idx in locations:
                prior = self._prior_at(key, seq, idx)
                if prior is not None:
                    found[key] = prior
                    break
        return found

    def _prior_at(self, key: tuple[str, str], seq: int, idx: int) -> blocks.Prior | None:
        if idx < 0:  # a consume written as one row, before blocks
            row = self.conn.execute(
                "SELECT fingerprint, payload, at_us FROM journal WHERE seq = ?"
                " AND account_id = ? AND request_id = ? AND kind = 'consume'",
                (seq, *key)).fetchone()
            return (blocks.prior_of_entry(seq, row[0], json.loads(row[1]), row[2])
                    if row else None)
        cached = self._blocks.get(seq)
        if cached is None:
            row = self.conn.execute("SELECT at_us, payload FROM journal WHERE seq = ? AND kind = ?",
                                    (seq, blocks.BLOCK_KIND)).fetchone()
            if row is None:
                return None
            cached = (row[0], *blocks.decode(row[1]))
            if len(self._blocks) >= BLOCK_CACHE_MAX:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[seq] = cached
        at_us, day, items = cached
        if idx >= len(items):
            return None
        item = items[idx]
        if (item[blocks.ACCOUNT], item[blocks.REQUEST]) != key:
            return None  # another key with the same 64-bit hash
        return blocks.prior_of_item(seq, at_us, day, item)

    # ------------------------------------------------------------------ the group commit

    def purchase_order(self, seq: int) -> int:
        """A plan's place among its account's purchases (R8 ties): its entry's seq."""
        return seq

    def commit(self, uow: UnitOfWork, *, defer: bool = False) -> None:
        """Write one group in one transaction. Raises Unavailable; then nothing was written.

        ``defer``: what follows the COMMIT (the keys into the key index, the rows' and the
        key runs' bookkeeping, the WAL's restart) waits for :meth:`finish`, which every later
        key lookup and commit runs first. The writer defers it at 1 in flight and finishes
        right after the reply has left (issue 18)."""
        self.finish()
        c = self.conn
        uow.seal_block()
        fault("before_commit")
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                self.rows.write(c, uow)
                self.keys.write_step(c)  # a slice of a pending run or snapshot rides along
                fault("during_commit")
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                self.keys.rolled_back()
                self.rows.rolled_back()
                raise
        except (sqlite3.Error, OverflowError) as exc:
            raise Unavailable(f"the journal could not be written: {exc}") from exc
        self.commits += 1
        self.entries_committed += len(uow.rows)
        if defer:
            self._unfinished = uow
        else:
            self._after_commit(uow)

    def finish(self) -> None:
        """The after-commit work of a group committed with ``defer``, if any (idempotent);
        first, a key index that may lack a committed group's keys is rebuilt (raises
        Unavailable when it cannot be: the calling group then writes nothing)."""
        if self._keys_stale:
            try:
                self.keys = self._load_keys()
            except (sqlite3.Error, OSError) as exc:
                raise Unavailable(f"the idempotency key index could not be rebuilt from the"
                                  f" journal: {exc}") from exc
            self._keys_stale = False
            log.warning("key index rebuilt from the journal", extra={"event": "keys_rebuilt"})
        uow = self._unfinished
        if uow is not None:
            self._unfinished = None
            self._after_commit(uow)

    _unfinished: UnitOfWork | None = None
    _keys_stale = False

    def _after_commit(self, uow: UnitOfWork) -> None:
        """The bookkeeping after a group's COMMIT. Should it fail (a full disk while a run
        is written), the index may lack the group's keys: it is rebuilt from the journal
        before any later lookup (R12: a retry replays, never charged twice)."""
        try:
            self.rows.committed()
            self.restart_wal()
            self.keys.committed()
            # Committed: the keys are durable in their block (R12). Called for every group,
            # so the hashes the group's lookups computed never outlive it.
            self.keys.add(uow.consumed)
        except BaseException:
            self._keys_stale = True
            raise

    def _load_keys(self) -> KeyIndex:
        """The key index as start-up builds it: its runs and filter, and the memtable from
        the journal's newest blocks."""
        keys = KeyIndex(self.conn)
        keys.load()
        keys.recover(self._consumes_after(keys.through_seq))
        return keys

    def restart_wal(self) -> None:
        """Let the WAL start over from its beginning (issue 18). SQLite restarts it only at
        a write that begins when every frame is checkpointed; under steady load the
        checkpointer's thread never sees that moment (the writer appends while it copies),
        so the WAL grew without end and every commit appended to a longer file: its
        fdatasync then also wrote the file's metadata (a one-request commit took 130-160 µs
        of CPU and 280-320 µs of wall time, against 80 and 170 when the WAL is reused).
        After each of the checkpointer's runs the writer checkpoints the few frames it
        wrote since, on its own connection between two transactions (about 1-2 ms); its
        next transaction then starts the WAL over. (``make bench``'s commit floor calls it
        between its commits too.)"""
        ck = self._checkpointer
        if ck is None or ck.runs == self._wal_restart_runs:
            return
        self._wal_restart_runs = ck.runs
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:  # the background checkpointer logs and retries
            log.debug("writer-side checkpoint failed: %s", exc)

    _wal_restart_runs = 0


class Checkpointer:
    """TRAPS: readers that never stop can starve the WAL checkpoint; and SQLite's automatic
    checkpoint runs inside whichever commit crosses its threshold, copying megabytes while
    the group waits. So the writer's connection has it off, and this thread checkpoints
    every ``CHECKPOINT_INTERVAL_S`` on a connection of its own, PASSIVE: it copies what no
    reader still needs, concurrently with the writer, which goes on appending to the WAL
    (the WAL restarts from its start once a checkpoint caught up; ``journal_size_limit``
    then trims the file). A failure (a full disk) is logged and tried again next time."""

    def __init__(self, path: str, interval_s: float = CHECKPOINT_INTERVAL_S) -> None:
        self.path, self.interval_s = path, interval_s
        self._stop = threading.Event()
        self.runs = self.failures = 0
        self._thread = threading.Thread(target=self._run, name="ledger-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        name_this_thread()
        conn = _connect(self.path)
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.runs += 1
                    self.failures = 0
                except sqlite3.Error as exc:  # e.g. disk full: the WAL stays; next time
                    self.failures += 1
                    if self.failures == 1:
                        log.warning("checkpoint failed", extra={"event": "checkpoint_failed",
                                                                "error": str(exc)})
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(max(5.0, self.interval_s * 4))
