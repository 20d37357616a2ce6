"""Consume blocks: one journal row holds a run of consecutive Consume entries (R25).

A commit group writes its consumes as one ``consume_block`` row under one hash of the chain
instead of one row each: the row's payload is MessagePack, ``[BLOCK_FORMAT, day, items]``,
where every item is one positional array (no field names):

    [account_id, request_id, region, captcha_type, architecture, step, scenario_id | None,
     quantity, client_observed_us | None, [[plan_id, units], ...], payg_units,
     payg_micros, units_remaining]

All items of a block share the block's instant (``at_us``) and billing day: the entries of a
commit share one reading of the clock. A block never spans another kind of entry, so journal
order is exactly the order in which the engine applied the commands.

Engine-independent: the same bytes go into an SQLite BLOB or a PostgreSQL ``bytea``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from ..model import consume_fingerprint

BLOCK_KIND = "consume_block"
BLOCK_FORMAT = 1

# Positions in an item.
ACCOUNT, REQUEST, REGION, TYPE, ARCH, STEP, SCENARIO, QTY, OBSERVED = range(9)
ALLOC, PAYG_UNITS, PAYG_MICROS, REMAINING = range(9, 13)


class Prior(NamedTuple):
    """What an idempotency key already recorded (R12): enough to compare and to replay."""

    seq: int
    fingerprint: str | None
    allocations: tuple[tuple[str, int], ...]
    payg_units: int
    payg_micros: int
    day: str
    remaining: int
    at_us: int


def encode(day: str, items: list[list[Any]]) -> bytes:
    return msgpack.packb([BLOCK_FORMAT, day, items], use_bin_type=True)


def decode(payload: bytes) -> tuple[str, list[list[Any]]]:
    """(day, items); refuses a format this build does not know."""
    version, day, items = msgpack.unpackb(payload, raw=False, use_list=True)
    if version != BLOCK_FORMAT:
        raise ValueError(f"consume block format {version!r}; this build reads {BLOCK_FORMAT}")
    return day, items


def item_fingerprint(item: list[Any]) -> str:
    return consume_fingerprint(item[REGION], item[TYPE], item[ARCH], item[STEP],
                               item[SCENARIO], item[QTY])


def prior_of_item(seq: int, at_us: int, day: str, item: list[Any]) -> Prior:
    return Prior(seq, item_fingerprint(item), tuple((p, n) for p, n in item[ALLOC]),
                 item[PAYG_UNITS], item[PAYG_MICROS], day, item[REMAINING], at_us)


def prior_of_entry(seq: int, fingerprint: str | None, payload: dict[str, Any], at_us: int
                   ) -> Prior:
    """A consume written before blocks (one JSON row per entry) keeps its meaning."""
    return Prior(seq, fingerprint, tuple((a[0], a[1]) for a in payload["alloc"]),
                 payload["payg_units"], payload["payg_micros"], payload["day"],
                 payload["remaining"], at_us)


def entry_payload(day: str, item: list[Any]) -> dict[str, Any]:
    """An item as the JSON payload a one-row consume entry had (rebuild, tests, tools)."""
    p = {"region": item[REGION], "type": item[TYPE], "arch": item[ARCH], "step": item[STEP],
         "qty": item[QTY], "alloc": item[ALLOC], "payg_units": item[PAYG_UNITS],
         "payg_micros": item[PAYG_MICROS], "day": day, "remaining": item[REMAINING]}
    if item[SCENARIO] is not None:
        p["scenario"] = item[SCENARIO]
    if item[OBSERVED] is not None:
        p["client_ts_us"] = item[OBSERVED]
    return p
