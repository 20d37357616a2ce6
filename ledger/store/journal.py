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
from . import blocks

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
               request_id: str | None, payload: str | bytes) -> bytes:
    """Each entry's hash covers the previous hash and every stored field of the entry (a
    consume block's payload is bytes, an entry's is JSON text)."""
    fields = f"{seq}|{at_us}|{kind}|{account_id or ''}|{request_id or ''}|"
    body = payload if isinstance(payload, bytes) else payload.encode()
    return hashlib.sha256(prev + fields.encode() + body).digest()


@dataclass(slots=True)
class UnitOfWork:
    """Everything one group commit writes: entries plus the derived rows they change.

    Consumes go into the open block (:mod:`.blocks`), which takes the next seq when it opens
    and is sealed into a row before any other entry is appended, when the clock moves, and
    at commit: the rows stay in seq order and the journal in the order of application.
    """

    rows: list[tuple] = field(default_factory=list)
    accounts: dict[str, AccountState] = field(default_factory=dict)
    plans: dict[str, PlanState] = field(default_factory=dict)  # changed plans
    new_plans: dict[str, PlanState] = field(default_factory=dict)  # bought in this group
    usage: dict[tuple[str, str, int], list[int]] = field(default_factory=dict)
    offsets: dict[tuple[str, str, str], int] = field(default_factory=dict)
    features: dict[tuple[str, str], tuple[int, int, int, int]] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    bills: list[tuple] = field(default_factory=list)
    # Notices (issue 22): (notice_id, account_id, kind, at_us, payload JSON), kept once
    notices: list[tuple] = field(default_factory=list)
    keys: dict[tuple[str, str, str], int] = field(default_factory=dict)
    # Consume keys claimed in this group: (account_id, request_id) -> (seq, index, at_us, day,
    # item)
    consumed: dict[tuple[str, str], tuple[int, int, int, str, list[Any]]] = field(
        default_factory=dict)
    block_items: list[list[Any]] = field(default_factory=list)
    block_seq: int = 0
    block_at_us: int = 0
    block_day: str = ""
    last_hash: bytes = GENESIS_HASH
    next_seq: int = 1

    def append(self, e: Entry) -> int:
        """Seal the entry into the chain and queue it; returns its seq."""
        self.seal_block()
        assert e.seq == self.next_seq, "journal order is total and gap-free"
        return self.append_json(e.at_us, e.kind, e.account_id, e.request_id, e.fingerprint,
                                canonical_json(e.payload))

    def append_json(self, at_us: int, kind: str, account_id: str | None,
                    request_id: str | None, fingerprint: str | None, payload_json: str) -> int:
        """The same, for a payload already rendered as JSON."""
        self.seal_block()
        seq = self.next_seq
        self.last_hash = chain_hash(self.last_hash, seq, at_us, kind, account_id, request_id,
                                    payload_json)
        self.rows.append((seq, at_us, kind, account_id, request_id, fingerprint, payload_json,
                          self.last_hash))
        if request_id is not None:
            self.keys[(account_id or "", kind, request_id)] = seq
        self.next_seq = seq + 1
        return seq

    def open_block(self, at_us: int, day: str) -> int:
        """The block consumes at this instant go into (opened if need be): its seq, which
        is their journal entry. The caller appends each item to ``block_items`` and claims
        its key in ``consumed`` (:mod:`ledger.consume_group`)."""
        if self.block_items and at_us != self.block_at_us:
            self.seal_block()
        if not self.block_items:
            self.block_seq, self.block_at_us, self.block_day = self.next_seq, at_us, day
            self.next_seq += 1
        return self.block_seq

    def add_consume(self, at_us: int, day: str, item: list[Any]) -> int:
        """Queue one consume item into the block of its instant; returns the block's seq."""
        seq = self.open_block(at_us, day)
        self.consumed[(item[0], item[1])] = (seq, len(self.block_items), at_us, day, item)
        self.block_items.append(item)
        return seq

    def seal_block(self) -> None:
        if not self.block_items:
            return
        payload = blocks.encode(self.block_day, self.block_items)
        self.last_hash = chain_hash(self.last_hash, self.block_seq, self.block_at_us,
                                    blocks.BLOCK_KIND, None, None, payload)
        self.rows.append((self.block_seq, self.block_at_us, blocks.BLOCK_KIND, None, None, None,
                          payload, self.last_hash))
        self.block_items = []

    # The derived rows as both stores write them (the column order of their tables).

    def account_rows(self) -> list[tuple]:
        return [(a.account_id, a.display_name, a.created_at, int(a.status), a.cash_micros,
                 a.voucher_micros, a.outstanding_micros, a.overdue_since, a.suspended_at,
                 json.dumps(list(a.scenario_ids)), int(a.custom_policy_enabled))
                for a in self.accounts.values()]

    def new_plan_rows(self) -> list[tuple]:
        return [(p.plan_id, p.account_id, p.spec_id, p.units_total, p.units_remaining,
                 p.units_forfeited, p.price_micros, int(p.validity), p.purchased_at,
                 p.expires_at, p.purchase_seq, p.paid_voucher_micros, p.paid_cash_micros,
                 p.refunded_at) for p in self.new_plans.values()]

    def changed_plan_rows(self) -> list[tuple]:
        """(units_remaining, units_forfeited, refunded_at, plan_id): only these columns of a
        plan ever change (an UPDATE leaves the indexes alone)."""
        return [(p.units_remaining, p.units_forfeited, p.refunded_at, p.plan_id)
                for plan_id, p in self.plans.items() if plan_id not in self.new_plans]

    def add_notice(self, n: Any) -> None:
        """Queue a :class:`ledger.notices.Notice` into this group's transaction."""
        self.notices.append((n.notice_id, n.account_id, n.kind, n.at_us,
                             canonical_json(n.payload)))

    def __bool__(self) -> bool:
        return bool(self.rows or self.meta or self.block_items or self.notices)

    def __len__(self) -> int:
        return len(self.rows)
