"""Journal entries, their hash chain (R25) and the unit of work one group commit writes.

Independent of the database engine: each entry's hash covers the previous hash and every
stored field of the entry, so changing, removing or reordering an entry is detected.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..model import AccountState, PlanState

GENESIS_HASH = b"\x00" * 32


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
