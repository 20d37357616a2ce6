"""The pieces of the key index (:mod:`.keyindex`) that hold no state: the 64-bit hash of a
consume key, a key's packed journal location, the Bloom filter, and a run's pages, fences
and filter built from its keys (numpy throughout: no Python loop a key; a lone key's probe
excepted)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np

FILTER_BITS_PER_KEY = 10
RUN_FILTER_BITS_PER_KEY = 10
FILTER_HASHES = 7
LOC_IDX_BITS = 20  # a location packs (seq, index in its block + 1) into one int64

Key = tuple[str, str]  # (account_id, request_id)
Location = tuple[int, int]  # (journal seq, index in its block; -1: a one-row entry)


_U64, _U32 = (1 << 64) - 1, (1 << 32) - 1
_BLAKE2B_8 = hashlib.blake2b(digest_size=8)  # copied: cheaper than a new one's parameters


def _digest(account_id: str, request_id: str) -> bytes:
    """A consume key's 8-byte BLAKE2b digest: the one hash of the index (big-endian)."""
    h = _BLAKE2B_8.copy()
    h.update(f"{account_id}\x00{request_id}".encode())
    return h.digest()


def hash_keys(keys: Iterable[Key]) -> np.ndarray:
    """Signed 64-bit hashes (SQLite INTEGER) of consume keys, as one int64 array."""
    copy, digests = _BLAKE2B_8.copy, []
    for a, r in keys:  # _digest, inlined: this runs for every key of every group
        h = copy()
        h.update(f"{a}\x00{r}".encode())
        digests.append(h.digest())
    return np.frombuffer(b"".join(digests), dtype=">i8").astype(np.int64)


SMALL_KEYS_MAX = 16  # up to this many keys are hashed without numpy (a unary group's few)


def hash_ints(keys: list[Key]) -> list[int]:
    """The same hashes as Python ints; a few keys skip numpy's fixed cost."""
    if len(keys) > SMALL_KEYS_MAX:
        return hash_keys(keys).tolist()
    return [int.from_bytes(_digest(a, r), "big", signed=True) for a, r in keys]


def key_hash(account_id: str, request_id: str) -> int:
    return hash_ints([(account_id, request_id)])[0]


def unpack(loc: int) -> Location:
    return loc >> LOC_IDX_BITS, (loc & ((1 << LOC_IDX_BITS) - 1)) - 1


class Filter:
    """A Bloom filter over 64-bit key hashes (double hashing on the hash's two halves),
    added to and asked a whole group of hashes at a time (numpy: no Python loop a key)."""

    def __init__(self, bits: np.ndarray | None = None, keys_max: int = 1,
                 bits_per_key: int = FILTER_BITS_PER_KEY) -> None:
        if bits is not None:
            self.bits = bits
        else:
            size = max(8, keys_max * bits_per_key // 8)
            self.bits = np.zeros(size, dtype=np.uint8)
        self.m = np.uint64(len(self.bits) * 8)

    def _positions(self, hashes: Any) -> np.ndarray:
        hs = np.asarray(hashes, dtype=np.int64).view(np.uint64)
        h1, h2 = hs & np.uint64(0xFFFFFFFF), (hs >> np.uint64(32)) | np.uint64(1)
        i = np.arange(FILTER_HASHES, dtype=np.uint64)
        return (h1[:, None] + i[None, :] * h2[:, None]) % self.m  # wraps mod 2**64: fine

    def add_many(self, hashes: Any) -> None:
        """Set the hashes' bits: one pass per bit of a byte, so that every write a pass
        makes to one byte sets the same bit (a fancy-indexed ``|=`` keeps one write per
        byte); about twice as fast as ``np.bitwise_or.at``."""
        if len(hashes):
            p = self._positions(hashes).ravel()
            byte, bit = (p >> np.uint64(3)).astype(np.int64), (p & np.uint64(7)).astype(np.uint8)
            for b in range(8):
                self.bits[byte[bit == b]] |= np.uint8(1 << b)

    def contains_many(self, hashes: Any) -> np.ndarray:
        if not len(hashes):
            return np.zeros(0, dtype=bool)
        p = self._positions(hashes)
        hit = self.bits[p >> np.uint64(3)] & np.left_shift(1, p & np.uint64(7)).astype(np.uint8)
        return (hit != 0).all(axis=1)

    def contains(self, h: int) -> bool:
        """:meth:`contains_many` for one hash (a Python int), without numpy: a lone call's
        key (issue 18). numpy's fixed cost is some 10 µs a call warm, and several times
        that in a server between two commits; these are seven bit reads. The positions are
        the same: ``h1 + i * h2`` stays below 2**36, so numpy's uint64 arithmetic never
        wraps there either."""
        u = h & _U64
        h1, h2, m, bits = u & _U32, (u >> 32) | 1, int(self.m), self.bits.data
        for i in range(FILTER_HASHES):
            p = (h1 + i * h2) % m
            if not bits[p >> 3] >> (p & 7) & 1:
                return False
        return True


class Run:
    """A written run, as memory keeps it: its fences and its own filter."""

    __slots__ = ("run", "fences", "filter")

    def __init__(self, run: int, fences: np.ndarray, filt: Filter) -> None:
        self.run, self.fences, self.filter = run, fences, filt


def build_run(hashes: np.ndarray, locs: np.ndarray, page_keys: int
              ) -> tuple[list[bytes], np.ndarray, Filter]:
    """A run's pages of ``page_keys`` keys, its fences and its filter, from its keys'
    hashes and locations (any order)."""
    order = np.argsort(hashes, kind="stable")
    hs, ls = hashes[order], locs[order]
    pages = [hs[i:i + page_keys].tobytes() + ls[i:i + page_keys].tobytes()
             for i in range(0, len(hs), page_keys)]
    filt = Filter(keys_max=max(1, len(hs)), bits_per_key=RUN_FILTER_BITS_PER_KEY)
    filt.add_many(hs)
    return pages, hs[::page_keys].copy(), filt


def page_arrays(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    n = len(data) // 16
    return (np.frombuffer(data, dtype=np.int64, count=n),
            np.frombuffer(data, dtype=np.int64, count=n, offset=n * 8))
