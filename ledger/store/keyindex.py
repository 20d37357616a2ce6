"""Where a Consume's idempotency key (R12) was recorded, kept off the commit path.

The durable record of a key is its item in a journal block (:mod:`.blocks`); this index only
points into the journal, and everything in it can be rebuilt from the journal. Inserting
random keys (CAPTCHA servers send UUIDs) into a B-tree dirties a page per key; here nothing
random is written when a group commits:

- the **memtable**, a dict of the keys of the newest blocks: exact, in memory, bounded by
  ``MEMTABLE_KEYS_MAX``; beside it, the keys' 64-bit hashes and locations as two lists;
- **runs**: when the memtable is full it is frozen and sorted by hash with numpy (one
  ``argsort``, issue 19), and written as a run of ``key_pages`` rows, each ``PAGE_KEYS``
  hashes and their locations as two arrays in one blob; ``RUN_PAGES_PER_COMMIT`` pages are
  written inside each of the group commits that follow (no transaction and no pause of its
  own); until its ``key_runs`` row commits, the frozen memtable answers for it. The run's
  row holds its **fences** (the first hash of each page) and a filter of its own keys;
- a **filter** (Bloom) over the keys of every run, in memory, so that a new key (nearly
  every key) is answered without reading a run. The few keys it may hold are asked of each
  run's own filter, and a run that may hold one reads the single page its fences name;
  every hit is checked against the journal itself. Each filter is probed once per group,
  vectorized.

Crash safety: a run and the filter's snapshot record how far they cover the journal; at
start the memtable is rebuilt from the blocks after the newest run (at most twice
``MEMTABLE_KEYS_MAX`` keys), the pages of a run whose ``key_runs`` row never committed are
deleted, and the keys of runs newer than the snapshot are added to the filter (at most
``FILTER_SNAPSHOT_EVERY_RUNS`` runs): start-up time does not grow with history, but for the
runs' own filters (``RUN_FILTER_BITS_PER_KEY`` bits a key). The snapshot is written a chunk row
(``FILTER_BYTES_PER_COMMIT``) per group commit: bits are only ever set, so a snapshot half
old and half new still covers every run up to the run its ``meta`` row records, which moves
only with its last chunk (schema 3 kept it as one 20 MB row; updating it rewrote the whole
row in one commit). Runs written as a row per key (schema 3) are converted to pages at
start, a run per transaction.

The largest pause each piece adds to one group commit: a slice of a run (16 pages of 1,024
keys: 256 KiB) or of the snapshot (1 MiB), a few milliseconds each. The freeze only swaps
the memtable; sorting a run, building its pages and filters and adding its 100,000 keys to
the filter (about 50 ms of numpy in all) happen on the builder thread, in calls short
enough that the writer keeps the GIL moving. Measured in process (groups of 1,000 over
1,000 accounts, 300,000 keys: three runs), no commit took over 20 ms.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..threads import name_this_thread
from .keyruns import (
    LOC_IDX_BITS,
    SMALL_KEYS_MAX,
    Filter,
    Key,
    Location,
    Run,
    build_run,
    hash_ints,
    hash_keys,
    key_hash,  # noqa: F401  (the index's own name for it: tests and tools)
    page_arrays,
    unpack,
)

log = logging.getLogger("quota_ledger.keyindex")

MEMTABLE_KEYS_MAX = 100_000
FILTER_KEYS = 16_000_000  # keys one filter holds at about 1% false positives
FILTER_SNAPSHOT_EVERY_RUNS = 8
FILTER_IO_CHUNK_BYTES = 1 << 20  # schema 3's one-row snapshot is read a MiB at a time
FILTER_BYTES_PER_COMMIT = 1 << 18  # the snapshot: a chunk row of 256 KiB per group commit
PAGE_KEYS = 1_024  # keys per page of a run: 16 KiB (hashes, then locations)
RUN_PAGES_PER_COMMIT = 16  # a frozen memtable's pages written per group commit
CONVERT_ROWS_MAX = 10_000_000  # a schema-3 run converted at start (bounded read)
FILTER_META_KEY = "key_filter_through"  # "run:keys" the snapshot covers (meta table)
FILTER_ADD_CHUNK = 10_000  # keys added to the filter per numpy call on the builder thread

def _locations(claimed: Mapping[Key, tuple[Any, ...]]) -> Iterable[int]:
    """The claimed keys' packed locations, in order. A group's keys are claimed once each,
    in the order of its block's items, so when the first is item 0 and the last item n - 1
    of one block, they are that block's items 0..n-1: one range."""
    n = len(claimed)
    first, last = next(iter(claimed.values())), next(reversed(claimed.values()))
    if first[0] == last[0] and first[1] == 0 and last[1] == n - 1:
        base = first[0] << LOC_IDX_BITS
        return range(base + 1, base + n + 1)  # (seq, i) packed: base | (i + 1)
    return [(v[0] << LOC_IDX_BITS) | (v[1] + 1) for v in claimed.values()]


class KeyIndex:
    """The memtable, the runs and the filter of one SQLite journal (the writer's side)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.memtable: dict[Key, int] = {}  # key -> packed location
        self._hashes: list[int] = []  # the memtable's keys' hashes and locations, in order
        self._locs: list[int] = []
        self.runs: list[Run] = []
        self.through_seq = 0  # the runs cover every key at or before this seq
        self.filter = Filter(keys_max=FILTER_KEYS)
        self.filter_through_run = 0
        self.filter_keys = 0
        # The keys candidates() hashed since the last add(), in order, and their hashes:
        # add() takes them as they are when the group claimed exactly those keys.
        self._hashed_keys: list[Key] = []
        self._hashed: list[int] = []
        # A full memtable being written as a run: its keys, its pages, how many are
        # committed; and a filter snapshot under way (run, keys, bytes committed).
        self.frozen: dict[Key, int] = {}
        self._pages: list[bytes] = []
        self._page_pos = self._run_id = 0
        self._builder: threading.Thread | None = None
        # (pages, fences, filter, keys, through_seq) once built, or the build's exception
        self._built: Any = None
        self._build_args: tuple[list[int], list[int]] = ([], [])
        self._snapshot: tuple[int, int, int] | None = None
        self._step: tuple[str, int] | None = None  # written in the open transaction

    # ------------------------------------------------------------------ start

    def load(self) -> None:
        """Load the runs and the filter (then :meth:`recover` the memtable)."""
        c = self.conn
        self._convert_row_runs()
        for run, through, fences, filt in c.execute(
                "SELECT run, through_seq, fences, filter FROM key_runs ORDER BY run"):
            self.runs.append(Run(run, np.frombuffer(fences, dtype=np.int64),
                                 Filter(bits=np.frombuffer(filt, dtype=np.uint8))))
            self.through_seq = max(self.through_seq, through)
        last = self.runs[-1].run if self.runs else 0
        if c.execute("SELECT 1 FROM key_pages WHERE run > ? LIMIT 1", (last,)).fetchone():
            c.execute("DELETE FROM key_pages WHERE run > ?", (last,))  # never completed
        meta = c.execute("SELECT value FROM meta WHERE key = ?", (FILTER_META_KEY,)).fetchone()
        legacy = c.execute("SELECT through_run, keys, length(bits) FROM key_filter WHERE id = 1"
                           ).fetchone()
        if meta is not None:  # a snapshot of schema 4: chunk rows, coverage in meta
            bits = self._read_chunks()
            if bits is not None:
                self.filter = Filter(bits=bits)
                self.filter_through_run, self.filter_keys = map(int, meta[0].split(":"))
            if legacy is not None:  # schema 3's one-row snapshot, superseded
                c.execute("DELETE FROM key_filter")
        elif legacy is not None:  # schema 3: one row, its coverage in its own columns
            self.filter = self._read_filter(legacy[2])
            self.filter_through_run, self.filter_keys = legacy[0], legacy[1]
        for r in self.runs:
            if r.run > self.filter_through_run:
                hashes = self._run_hashes(r.run)
                self.filter.add_many(hashes)
                self.filter_keys += len(hashes)

    def _run_hashes(self, run: int) -> np.ndarray:
        parts = [page_arrays(data)[0] for (data,) in self.conn.execute(
            "SELECT data FROM key_pages WHERE run = ? ORDER BY page", (run,))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _convert_row_runs(self) -> None:
        """Runs written a row per key (schema 3) become pages, one transaction a run."""
        c = self.conn
        old = [r for (r,) in c.execute("SELECT run FROM key_runs WHERE fences IS NULL"
                                       " ORDER BY run")]
        for run in old:
            rows = c.execute("SELECT h, seq, idx FROM consume_keys WHERE run = ? LIMIT ?",
                             (run, CONVERT_ROWS_MAX)).fetchall()
            arr = np.array(rows, dtype=np.int64).reshape(-1, 3)
            locs = (arr[:, 1] << LOC_IDX_BITS) | (arr[:, 2] + 1)
            pages, fences, filt = build_run(arr[:, 0].copy(), locs, PAGE_KEYS)
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany(f"INSERT INTO key_pages VALUES ({run},?,?)", enumerate(pages))
                c.execute("UPDATE key_runs SET fences = ?, filter = ? WHERE run = ?",
                          (fences.tobytes(), filt.bits.tobytes(), run))
                c.execute("DELETE FROM consume_keys WHERE run = ?", (run,))
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise

    def recover(self, entries: Iterable[tuple[int, int, str, str]]) -> None:
        """The memtable from (seq, index, account_id, request_id) of each consume after
        ``through_seq``, in journal order (runs written on the way if it fills up)."""
        last_seq = 0
        pending: dict[Key, tuple[int, int]] = {}
        for seq, idx, account_id, request_id in entries:
            # A run ends between journal rows, never inside a block: a run's through_seq
            # says every key at or before it is in the runs.
            if seq != last_seq and len(self.memtable) + len(pending) >= MEMTABLE_KEYS_MAX:
                self._add_now(pending)
                pending = {}
                self.flush()
            last_seq = seq
            pending[(account_id, request_id)] = (seq, idx)
        self._add_now(pending)
        self.flush_pending()

    def _add_now(self, claimed: Mapping[Key, tuple[Any, ...]]) -> None:
        self._hashed_keys, self._hashed = [], []
        self._add(claimed)

    # ------------------------------------------------------------------ lookups

    def candidates(self, keys: Iterable[Key]) -> dict[Key, list[Location]]:
        """Where each key may be recorded; every location must be checked against the
        journal (a hash may collide). Keys absent from the result were never recorded."""
        found: dict[Key, list[Location]] = {}
        unseen: list[Key] = []
        memtable, frozen = self.memtable, self.frozen
        for key in keys:
            loc = memtable.get(key) or (frozen.get(key) if frozen else None)
            if loc is not None:
                found[key] = [unpack(loc)]
            elif self.runs:
                unseen.append(key)
        if not unseen:
            return found
        # Hashed first: a key that cannot be hashed fails the group before the two lists
        # add() pairs up grow, so they never fall out of step.
        if len(unseen) <= SMALL_KEYS_MAX:  # a unary group's few keys: no numpy (issue 18)
            ints = hash_ints(unseen)
            self._remember(unseen, ints)
            contains = self.filter.contains
            may_ints = [i for i, h in enumerate(ints) if contains(h)]
            if may_ints:
                self._search_runs([unseen[i] for i in may_ints],
                                  np.array([ints[i] for i in may_ints], dtype=np.int64), found)
            return found
        hashes = hash_keys(unseen)
        self._remember(unseen, hashes.tolist())
        may = np.flatnonzero(self.filter.contains_many(hashes))
        if len(may):
            self._search_runs([unseen[i] for i in may], hashes[may], found)
        return found

    def _remember(self, keys: list[Key], hashes: list[int]) -> None:
        """The keys candidates() hashed, and their hashes, for add()."""
        if len(self._hashed) > MEMTABLE_KEYS_MAX:  # groups that committed no consume
            self._hashed_keys, self._hashed = [], []
        self._hashed_keys += keys
        self._hashed += hashes

    def _search_runs(self, keys: list[Key], hashes: np.ndarray,
                     found: dict[Key, list[Location]]) -> None:
        """The keys the filter may hold: each run's filter, then the page its fences name."""
        pages: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for r in self.runs:
            hit = np.flatnonzero(r.filter.contains_many(hashes))
            for i in hit.tolist():
                h = hashes[i]
                # The pages whose range holds h: one, unless equal hashes span pages.
                first = max(0, int(np.searchsorted(r.fences, h, side="left")) - 1)
                for page in range(first, int(np.searchsorted(r.fences, h, side="right"))):
                    got = pages.get((r.run, page))
                    if got is None:
                        row = self.conn.execute("SELECT data FROM key_pages WHERE run = ?"
                                                " AND page = ?", (r.run, page)).fetchone()
                        if row is None:
                            continue
                        got = pages[(r.run, page)] = page_arrays(row[0])
                    hs, ls = got
                    lo, hi = np.searchsorted(hs, h, "left"), np.searchsorted(hs, h, "right")
                    for loc in ls[lo:hi].tolist():
                        found.setdefault(keys[i], []).append(unpack(loc))

    # ------------------------------------------------------------------ after a commit

    def add(self, claimed: Mapping[Key, tuple[Any, ...]]) -> None:
        """The keys a group committed: key -> (seq, index in its block, ...). A full
        memtable is frozen, to be written as a run by the next group commits."""
        try:
            self._add(claimed)
        finally:  # the hashes candidates() kept never outlive their group
            self._hashed_keys, self._hashed = [], []
        if len(self.memtable) >= MEMTABLE_KEYS_MAX:
            self._freeze()

    def _add(self, claimed: Mapping[Key, tuple[Any, ...]]) -> None:
        if not claimed:
            return
        keys = list(claimed)
        if keys == self._hashed_keys:  # the common group: every key new, all claimed
            known = self._hashed
        else:
            hashed = dict(zip(self._hashed_keys, self._hashed, strict=True))
            known = [hashed.get(k) for k in keys]
            if None in known:
                missing = [k for k, h in zip(keys, known, strict=True) if h is None]
                hashed = dict(zip(missing, hash_ints(missing), strict=True))
                known = [h if h is not None else hashed[k]
                         for k, h in zip(keys, known, strict=True)]
        locs = _locations(claimed)
        self.memtable.update(zip(keys, locs, strict=True))
        self._hashes += known
        self._locs += locs

    def _freeze(self) -> None:
        """The full memtable becomes the frozen one, which answers until its run commits;
        the run is built (sorted, paged, filtered) on a thread of its own, so the commit
        that filled the memtable does not wait for it (issue 19)."""
        if self.frozen:  # the previous run is not written yet (a very fast writer): finish it
            self.flush_pending()
        self.frozen, self.memtable = self.memtable, {}
        hashes, locs = self._hashes, self._locs
        self._hashes, self._locs = [], []
        self._pages, self._page_pos, self._built = [], 0, None
        self._run_id = (self.runs[-1].run + 1) if self.runs else 1
        self._build_args = (hashes, locs)
        self._builder = threading.Thread(target=self._build, args=self._build_args,
                                         name="ledger-keyrun", daemon=True)
        self._builder.start()

    def _build(self, hashes: list[int], locs: list[int]) -> None:
        """On the builder thread: the run's pages, fences and filter, and its keys' bits in
        the filter of every run (set early: until the run commits, the frozen memtable
        answers for its keys, and a bit set early only makes another key a maybe).
        Only this thread and start-up ever set the filter's bits."""
        name_this_thread()
        try:
            hs, ls = np.array(hashes, dtype=np.int64), np.array(locs, dtype=np.int64)
            pages, fences, filt = build_run(hs, ls, PAGE_KEYS)
            for i in range(0, len(hs), FILTER_ADD_CHUNK):  # short calls: the GIL moves on
                self.filter.add_many(hs[i:i + FILTER_ADD_CHUNK])
            self._built = (pages, fences, filt, len(hs), int(ls.max()) >> LOC_IDX_BITS)
        except BaseException as exc:  # noqa: BLE001  (e.g. MemoryError): told at write time
            self._built = exc

    def _run_ready(self) -> bool:
        """Whether the frozen run is built; a build that failed is done again here, on the
        writer's thread (its exception, if it fails again, fails this commit)."""
        built = self._built
        if isinstance(built, BaseException):
            log.warning("key run build failed; building it on the writer",
                        extra={"event": "key_run_build_failed", "error": repr(built)})
            self._built = None
            self._build(*self._build_args)
            if isinstance(self._built, BaseException):
                raise self._built
            built = self._built
        if built is None:
            return False
        if not self._pages:
            self._pages = built[0]
        return True

    # ------------------------------------------------------------------ inside a group commit
    # ------------------------------------------------------------------ inside a group commit

    def write_step(self, c: sqlite3.Connection) -> None:
        """Inside a group's transaction: the next slice of a frozen run once it is built,
        else of a filter snapshot under way. What was written counts once the transaction
        commits (:meth:`committed`); if it rolls back, nothing moved (:meth:`rolled_back`)."""
        self._step = None
        if self.frozen:
            if not self._run_ready():
                return
            run = self._run_id
            end = min(len(self._pages), self._page_pos + RUN_PAGES_PER_COMMIT)
            c.executemany(f"INSERT INTO key_pages VALUES ({run},?,?)",
                          [(p, self._pages[p]) for p in range(self._page_pos, end)])
            if end == len(self._pages):
                _, fences, filt, keys, through = self._built  # type: ignore[misc]
                c.execute("INSERT INTO key_runs VALUES (?,?,?,?,?)",
                          (run, through, keys, fences.tobytes(), filt.bits.tobytes()))
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
        self._page_pos = upto
        if upto < len(self._pages):
            return
        _, fences, filt, keys, through = self._built  # type: ignore[misc]
        self._pages, self._page_pos, self._built = [], 0, None
        self._build_args = ([], [])  # the run is written: its keys' lists go
        run = self._run_id
        self.runs.append(Run(run, fences, filt))
        self.through_seq = max(self.through_seq, through)
        self.filter_keys += keys
        self.frozen = {}
        if self._snapshot is None and run - self.filter_through_run >= FILTER_SNAPSHOT_EVERY_RUNS:
            # -1: the row is to be created or checked first
            self._snapshot = (run, self.filter_keys, -1)

    def rolled_back(self) -> None:
        self._step = None

    def _write_filter_slice(self, c: sqlite3.Connection) -> int:
        """The next chunk of the snapshot: a ``key_filter_chunks`` row of
        FILTER_BYTES_PER_COMMIT bytes, written whole (no row ever grows or is rewritten in
        place: updating a column of one 20 MB row rewrote all of it, a 270 ms commit, and
        preallocating it cannot be done on a small disk). A torn snapshot keeps the
        coverage recorded before it in ``meta``, which its newer bits also cover (bits are
        only set). The last chunk records the run it now covers. Returns the bytes written
        so far."""
        run, keys, done = self._snapshot  # type: ignore[misc]
        bits = self.filter.bits
        done = max(done, 0)
        end = min(bits.nbytes, done + FILTER_BYTES_PER_COMMIT)
        c.execute("INSERT OR REPLACE INTO key_filter_chunks VALUES (?, ?)",
                  (done // FILTER_BYTES_PER_COMMIT, bits[done:end].tobytes()))
        if end == bits.nbytes:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (FILTER_META_KEY,
                                                                    f"{run}:{keys}"))
        return end

    def _read_chunks(self) -> np.ndarray | None:
        """The snapshot's chunks as one array of the filter's size, or None when they do
        not make up exactly that (the filter's size changed): then it covers nothing."""
        bits = np.zeros_like(self.filter.bits)
        filled = 0
        for chunk, data in self.conn.execute(
                "SELECT chunk, bits FROM key_filter_chunks ORDER BY chunk"):
            off = chunk * FILTER_BYTES_PER_COMMIT
            if off + len(data) > bits.nbytes:
                return None
            bits[off:off + len(data)] = np.frombuffer(data, dtype=np.uint8)
            filled += len(data)
        return bits if filled == bits.nbytes else None

    def _read_filter(self, size: int) -> Filter:
        """Schema 3's one-row snapshot, read a MiB at a time into one array."""
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
        if self.frozen and self._builder is not None:
            self._builder.join()
        while self.frozen or self._snapshot is not None:
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
