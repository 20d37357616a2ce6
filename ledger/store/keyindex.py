"""Where a Consume's idempotency key (R12) was recorded, kept off the commit path.

The durable record of a key is its item in a journal block (:mod:`.blocks`); this index only
points into the journal, and everything in it can be rebuilt from the journal. Inserting
random keys (CAPTCHA servers send UUIDs) into a B-tree dirties a page per key; here nothing
random is written when a group commits:

- the **memtable**, a dict of the keys of the newest blocks: exact, in memory, bounded by
  ``MEMTABLE_KEYS_MAX``;
- **runs**: when the memtable is full it is frozen and written, sorted by a 64-bit hash of
  the key, as one run of ``consume_keys`` rows (``(run, h)`` leads the primary key, so a run
  is appended in order, never scattered), ``RUN_ROWS_PER_COMMIT`` rows at a time inside the
  group commits that follow (no transaction and no pause of its own: issue 19); until its
  ``key_runs`` row commits, the frozen memtable answers for it;
- a **filter** (Bloom) over the keys of every run, in memory, so that a new key (nearly
  every key) is answered without reading a run; a key the filter may hold is looked up in
  the runs by its hash, and every hit is checked against the journal itself.

Crash safety: a run and the filter's snapshot record how far they cover the journal; at
start the memtable is rebuilt from the blocks after the newest run (at most twice
``MEMTABLE_KEYS_MAX`` keys), the rows of a run whose ``key_runs`` row never committed are
deleted, and the keys of runs newer than the snapshot are added to the filter (at most
``FILTER_SNAPSHOT_EVERY_RUNS`` runs): start-up time does not grow with history. The
snapshot is also written a slice (``FILTER_BYTES_PER_COMMIT``) per group commit, in place:
bits are only ever set, so a snapshot half old and half new still covers every run up to
the ``through_run`` it records, which moves only with its last slice. Consumes written one
row each before blocks existed are indexed the same way.

The largest pause each piece adds to one group commit: a slice of a run (5,000 rows, a few
milliseconds) or of the snapshot (1 MiB); the start of a snapshot, when the filter's row
must be created or resized, preallocates it (``zeroblob``, no copy).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

MEMTABLE_KEYS_MAX = 100_000
FILTER_KEYS = 16_000_000  # keys one filter holds at about 1% false positives
FILTER_BITS_PER_KEY = 10
FILTER_HASHES = 7
FILTER_SNAPSHOT_EVERY_RUNS = 8
FILTER_IO_CHUNK_BYTES = 1 << 20  # the snapshot is read a MiB at a time
FILTER_BYTES_PER_COMMIT = 1 << 20  # and written a MiB per group commit
RUN_ROWS_PER_COMMIT = 5_000  # a frozen memtable's rows written per group commit
LOOKUP_HASHES_PER_STATEMENT = 500

Key = tuple[str, str]  # (account_id, request_id)
Location = tuple[int, int]  # (journal seq, index in its block; -1: a one-row entry)


def key_hash(account_id: str, request_id: str) -> int:
    """A signed 64-bit hash (SQLite INTEGER) of a consume key."""
    digest = hashlib.blake2b(f"{account_id}\x00{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class Filter:
    """A Bloom filter over 64-bit key hashes (double hashing on the hash's two halves),
    added to and asked a whole group of hashes at a time (numpy: no Python loop a key)."""

    def __init__(self, bits: np.ndarray | None = None, keys_max: int | None = None) -> None:
        if bits is not None:
            self.bits = bits
        else:
            self.bits = np.zeros((keys_max or FILTER_KEYS) * FILTER_BITS_PER_KEY // 8,
                                 dtype=np.uint8)
        self.m = np.uint64(len(self.bits) * 8)

    def _positions(self, hashes: list[int]) -> np.ndarray:
        hs = np.array(hashes, dtype=np.int64).view(np.uint64)
        h1, h2 = hs & np.uint64(0xFFFFFFFF), (hs >> np.uint64(32)) | np.uint64(1)
        i = np.arange(FILTER_HASHES, dtype=np.uint64)
        return (h1[:, None] + i[None, :] * h2[:, None]) % self.m  # wraps mod 2**64: fine

    def add_many(self, hashes: list[int]) -> None:
        if hashes:
            p = self._positions(hashes).ravel()
            np.bitwise_or.at(self.bits, p >> np.uint64(3),
                             np.left_shift(1, p & np.uint64(7)).astype(np.uint8))

    def contains_many(self, hashes: list[int]) -> list[bool]:
        if not hashes:
            return []
        p = self._positions(hashes)
        hit = self.bits[p >> np.uint64(3)] & np.left_shift(1, p & np.uint64(7)).astype(np.uint8)
        return (hit != 0).all(axis=1).tolist()


class KeyIndex:
    """The memtable, the runs and the filter of one SQLite journal (the writer's side)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        # key -> (hash, seq, index): in the order a run's rows are sorted and written
        self.memtable: dict[Key, tuple[int, int, int]] = {}
        self.runs: list[int] = []
        self.through_seq = 0  # the runs cover every key at or before this seq
        self.filter = Filter()
        self.filter_through_run = 0
        self.filter_keys = 0
        self._hashed: dict[Key, int] = {}  # hashes computed by candidates() until add()
        # A full memtable being written as a run: its keys, its rows sorted by hash, how many
        # are committed; and a filter snapshot under way (run, keys, bytes committed).
        self.frozen: dict[Key, tuple[int, int, int]] = {}
        self._run_rows: list[tuple[int, int, int]] = []
        self._run_pos = self._run_id = self._run_through = 0
        self._snapshot: tuple[int, int, int] | None = None
        self._step: tuple[str, int] | None = None  # written in the open transaction

    # ------------------------------------------------------------------ start

    def load(self) -> None:
        """Load the runs and the filter (then :meth:`recover` the memtable)."""
        c = self.conn
        for run, through in c.execute("SELECT run, through_seq FROM key_runs ORDER BY run"):
            self.runs.append(run)
            self.through_seq = max(self.through_seq, through)
        last = self.runs[-1] if self.runs else 0
        if c.execute("SELECT 1 FROM consume_keys WHERE run > ? LIMIT 1", (last,)).fetchone():
            c.execute("DELETE FROM consume_keys WHERE run > ?", (last,))  # never completed
        row = c.execute("SELECT through_run, keys, length(bits) FROM key_filter WHERE id = 1"
                        ).fetchone()
        if row is not None:
            self.filter = self._read_filter(row[2])
            self.filter_through_run, self.filter_keys = row[0], row[1]
        newer = [h for (h,) in c.execute("SELECT h FROM consume_keys WHERE run > ?",
                                         (self.filter_through_run,))]
        self.filter.add_many(newer)
        self.filter_keys += len(newer)

    def recover(self, entries: Iterable[tuple[int, int, str, str]]) -> None:
        """The memtable from (seq, index, account_id, request_id) of each consume after
        ``through_seq``, in journal order (runs written on the way if it fills up)."""
        last_seq = 0
        for seq, idx, account_id, request_id in entries:
            # A run ends between journal rows, never inside a block: a run's through_seq
            # says every key at or before it is in the runs.
            if seq != last_seq and len(self.memtable) >= MEMTABLE_KEYS_MAX:
                self.flush()
            last_seq = seq
            self.memtable[(account_id, request_id)] = (key_hash(account_id, request_id), seq,
                                                       idx)
        self.flush_pending()

    # ------------------------------------------------------------------ lookups

    def candidates(self, keys: Iterable[Key]) -> dict[Key, list[Location]]:
        """Where each key may be recorded; every location must be checked against the
        journal (a hash may collide). Keys absent from the result were never recorded."""
        found: dict[Key, list[Location]] = {}
        maybe: dict[int, list[Key]] = {}
        unseen: list[Key] = []
        memtable, frozen = self.memtable, self.frozen
        for key in keys:
            hit = memtable.get(key) or (frozen.get(key) if frozen else None)
            if hit is not None:
                found[key] = [(hit[1], hit[2])]
            elif self.runs:
                unseen.append(key)
        hashes = [key_hash(a, r) for a, r in unseen]
        if len(self._hashed) > MEMTABLE_KEYS_MAX:  # groups that committed no consume
            self._hashed = {}
        self._hashed.update(zip(unseen, hashes, strict=True))  # for add(), after the commit
        for key, h, may in zip(unseen, hashes, self.filter.contains_many(hashes), strict=True):
            if may:
                maybe.setdefault(h, []).append(key)
        if maybe:
            hashes = list(maybe)
            runs = ",".join(str(r) for r in self.runs)
            for i in range(0, len(hashes), LOOKUP_HASHES_PER_STATEMENT):
                chunk = hashes[i:i + LOOKUP_HASHES_PER_STATEMENT]
                marks = ",".join("?" * len(chunk))
                for h, seq, idx in self.conn.execute(
                        f"SELECT h, seq, idx FROM consume_keys WHERE run IN ({runs})"
                        f" AND h IN ({marks})", chunk):
                    for key in maybe[h]:
                        found.setdefault(key, []).append((seq, idx))
        return found

    # ------------------------------------------------------------------ after a commit

    def add(self, claimed: Mapping[Key, tuple[Any, ...]]) -> None:
        """The keys a group committed: key -> (seq, index in its block, ...). A full
        memtable is frozen, to be written as a run by the next group commits."""
        memtable, hashed = self.memtable, self._hashed
        for key, v in claimed.items():
            h = hashed.get(key)
            memtable[key] = (key_hash(*key) if h is None else h, v[0], v[1])
        self._hashed = {}
        if len(memtable) >= MEMTABLE_KEYS_MAX:
            self._freeze()

    def _freeze(self) -> None:
        if self.frozen:  # the previous run is not written yet (a very fast writer): finish it
            self.flush_pending()
        self.frozen, self.memtable = self.memtable, {}
        self._run_rows, self._run_pos = sorted(self.frozen.values()), 0  # (h, seq, idx)
        self._run_id = (self.runs[-1] + 1) if self.runs else 1
        self._run_through = max(seq for _, seq, _ in self._run_rows)

    # ------------------------------------------------------------------ inside a group commit

    def write_step(self, c: sqlite3.Connection) -> None:
        """Inside a group's transaction: the next slice of a frozen run, else of a filter
        snapshot under way. What was written counts once the transaction commits
        (:meth:`committed`); if it rolls back, nothing moved (:meth:`rolled_back`)."""
        self._step = None
        if self._run_rows:
            run = self._run_id
            end = min(len(self._run_rows), self._run_pos + RUN_ROWS_PER_COMMIT)
            c.executemany(f"INSERT INTO consume_keys VALUES ({run},?,?,?)",
                          self._run_rows[self._run_pos:end])
            if end == len(self._run_rows):
                c.execute("INSERT INTO key_runs VALUES (?,?,?)", (run, self._run_through, end))
            self._step = ("run", end)
        elif self._snapshot is not None:
            self._step = ("filter", self._write_filter_slice(c))

    def committed(self) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        kind, upto = step
        if kind == "filter":
            run, keys, _ = self._snapshot  # type: ignore[misc]
            if upto >= self.filter.bits.nbytes:
                self._snapshot = None
                self.filter_through_run = run
            else:
                self._snapshot = (run, keys, upto)
            return
        self._run_pos = upto
        if upto < len(self._run_rows):
            return
        rows, self._run_rows, self._run_pos = self._run_rows, [], 0
        run = self._run_id
        self.filter.add_many([h for h, _, _ in rows])
        self.runs.append(run)
        self.through_seq = max(self.through_seq, self._run_through)
        self.filter_keys += len(rows)
        self.frozen = {}
        if self._snapshot is None and run - self.filter_through_run >= FILTER_SNAPSHOT_EVERY_RUNS:
            # -1: the row is to be created or checked first
            self._snapshot = (run, self.filter_keys, -1)

    def rolled_back(self) -> None:
        self._step = None

    def _write_filter_slice(self, c: sqlite3.Connection) -> int:
        """The next FILTER_BYTES_PER_COMMIT of the snapshot, in place; its first step makes
        sure the row exists at the right size (keeping the old through_run, so a torn
        snapshot still reads as the old one, which the new bits cover). The last step
        records the run it now covers. Returns the bytes written so far."""
        run, keys, done = self._snapshot  # type: ignore[misc]
        bits = self.filter.bits
        if done < 0:
            row = c.execute("SELECT length(bits) FROM key_filter WHERE id = 1").fetchone()
            if row is None or row[0] != bits.nbytes:
                c.execute("INSERT OR REPLACE INTO key_filter VALUES (1,0,0,zeroblob(?))",
                          (bits.nbytes,))
            done = 0
        end = min(bits.nbytes, done + FILTER_BYTES_PER_COMMIT)
        with c.blobopen("key_filter", "bits", 1) as blob:
            blob.seek(done)
            blob.write(memoryview(bits)[done:end])
        if end == bits.nbytes:
            c.execute("UPDATE key_filter SET through_run = ?, keys = ? WHERE id = 1", (run, keys))
        return end

    def _read_filter(self, size: int) -> Filter:
        """The snapshot read back the same way, into one array (no intermediate copy)."""
        bits = np.empty(size, dtype=np.uint8)
        with self.conn.blobopen("key_filter", "bits", 1, readonly=True) as blob:
            for off in range(0, size, FILTER_IO_CHUNK_BYTES):
                chunk = blob.read(FILTER_IO_CHUNK_BYTES)
                bits[off:off + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        return Filter(bits=bits)

    def flush(self) -> None:
        """Freeze the memtable and write all of it, with any snapshot it makes due, at once
        (start-up only: the memtable rebuilt from a long tail of the journal)."""
        if self.memtable:
            self._freeze()
        self.flush_pending()

    def flush_pending(self) -> None:
        """Write every pending slice now, one transaction each (start-up, or a run not yet
        written when the memtable fills again)."""
        c = self.conn
        while self._run_rows or self._snapshot is not None:
            c.execute("BEGIN IMMEDIATE")
            try:
                self.write_step(c)
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                self.rolled_back()
                raise
            self.committed()
