"""Where a Consume's idempotency key (R12) was recorded, kept off the commit path.

The durable record of a key is its item in a journal block (:mod:`.blocks`); this index only
points into the journal, and everything in it can be rebuilt from the journal. Inserting
random keys (CAPTCHA servers send UUIDs) into a B-tree dirties a page per key; here nothing
random is written when a group commits:

- the **memtable**, a dict of the keys of the newest blocks: exact, in memory, bounded by
  ``MEMTABLE_KEYS_MAX``;
- **runs**: when the memtable is full it is written, sorted by a 64-bit hash of the key, as
  one run of ``consume_keys`` rows (``(run, h)`` leads the primary key, so a run is appended
  in order, never scattered) in a transaction of its own after a commit;
- a **filter** (Bloom) over the keys of every run, in memory, so that a new key (nearly
  every key) is answered without reading a run; a key the filter may hold is looked up in
  the runs by its hash, and every hit is checked against the journal itself.

Crash safety: a run and the filter's snapshot record how far they cover the journal; at
start the memtable is rebuilt from the blocks after the newest run (at most
``MEMTABLE_KEYS_MAX`` keys), and the keys of runs newer than the snapshot are added to the
filter (at most ``FILTER_SNAPSHOT_EVERY_RUNS`` runs): start-up time does not grow with
history. Consumes written one row each before blocks existed are indexed the same way.
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
FILTER_IO_CHUNK_BYTES = 1 << 20  # the snapshot is written and read a MiB at a time
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
        self.failed_flushes = 0
        self._hashed: dict[Key, int] = {}  # hashes computed by candidates() until add()

    # ------------------------------------------------------------------ start

    def load(self) -> None:
        """Load the runs and the filter (then :meth:`recover` the memtable)."""
        c = self.conn
        for run, through in c.execute("SELECT run, through_seq FROM key_runs ORDER BY run"):
            self.runs.append(run)
            self.through_seq = max(self.through_seq, through)
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
        for seq, idx, account_id, request_id in entries:
            self.memtable[(account_id, request_id)] = (key_hash(account_id, request_id), seq,
                                                       idx)
            if len(self.memtable) >= MEMTABLE_KEYS_MAX:
                self.flush()

    # ------------------------------------------------------------------ lookups

    def candidates(self, keys: Iterable[Key]) -> dict[Key, list[Location]]:
        """Where each key may be recorded; every location must be checked against the
        journal (a hash may collide). Keys absent from the result were never recorded."""
        found: dict[Key, list[Location]] = {}
        maybe: dict[int, list[Key]] = {}
        unseen: list[Key] = []
        memtable = self.memtable
        for key in keys:
            hit = memtable.get(key)
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
        """The keys a group committed: key -> (seq, index in its block, ...)."""
        memtable, hashed = self.memtable, self._hashed
        for key, v in claimed.items():
            h = hashed.get(key)
            memtable[key] = (key_hash(*key) if h is None else h, v[0], v[1])
        self._hashed = {}

    def _write_filter(self, run: int, keys: int) -> None:
        """The filter's snapshot, written through incremental blob I/O a chunk at a time:
        a whole-filter bytes copy (20 MB) on every snapshot made the server's resident
        memory grow in steps (make soak)."""
        bits = self.filter.bits
        self.conn.execute("INSERT OR REPLACE INTO key_filter VALUES (1,?,?,zeroblob(?))",
                          (run, keys, bits.nbytes))
        view = memoryview(bits)
        with self.conn.blobopen("key_filter", "bits", 1) as blob:
            for off in range(0, len(view), FILTER_IO_CHUNK_BYTES):
                blob.write(view[off:off + FILTER_IO_CHUNK_BYTES])

    def _read_filter(self, size: int) -> Filter:
        """The snapshot read back the same way, into one array (no intermediate copy)."""
        bits = np.empty(size, dtype=np.uint8)
        with self.conn.blobopen("key_filter", "bits", 1, readonly=True) as blob:
            for off in range(0, size, FILTER_IO_CHUNK_BYTES):
                chunk = blob.read(FILTER_IO_CHUNK_BYTES)
                bits[off:off + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        return Filter(bits=bits)

    def flush_if_full(self) -> None:
        if len(self.memtable) >= MEMTABLE_KEYS_MAX:
            self.flush()

    def flush(self) -> None:
        """Write the memtable as one run, sorted by hash, in a transaction of its own; the
        filter's snapshot goes with every FILTER_SNAPSHOT_EVERY_RUNS-th run. On failure
        (a full disk) the memtable stays and the next commit tries again."""
        if not self.memtable:
            return
        rows = sorted(self.memtable.values())  # (h, seq, idx)
        through = max(seq for _, seq, _ in rows)
        run = (self.runs[-1] + 1) if self.runs else 1
        self.filter.add_many([h for h, _, _ in rows])
        snapshot = (run - self.filter_through_run) >= FILTER_SNAPSHOT_EVERY_RUNS
        c = self.conn
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany(f"INSERT INTO consume_keys VALUES ({run},?,?,?)", rows)
                c.execute("INSERT INTO key_runs VALUES (?,?,?)", (run, through, len(rows)))
                if snapshot:
                    self._write_filter(run, self.filter_keys + len(rows))
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
        except sqlite3.Error:
            self.failed_flushes += 1
            return
        self.runs.append(run)
        self.through_seq = max(self.through_seq, through)
        self.filter_keys += len(rows)
        if snapshot:
            self.filter_through_run = run
        self.memtable.clear()
