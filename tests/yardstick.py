"""How fast the machine is right now: the research floor of a consume group (issues 18-20).

    python -m tests.yardstick [--accounts 1000]

This machine's speed swings by a third or more from one hour to the next (docs/performance.md):
the same bench on the same code gave 134,736 and 77,363 req/s ten minutes apart. A figure
means little without the machine's speed at the moment it was taken, so the benches print
this yardstick before and after their loads.

The work is ``../shared/research/hot-path-floor/group_floor.py``'s, unchanged in substance
(the floor issue 19 was written against: 3.56 µs a request over 1,000 accounts then): groups
of 1,000 consumes in plain Python (a key check in a dict, R8 over two plans, PAYG), one
MessagePack block chained with SHA-256, and one transaction (WAL, ``synchronous=FULL``)
with the block row, the touched plans' UPDATE and each touched account's usage upsert.
Nothing of the ledger runs: a slower figure is the machine, not the code.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import tempfile
import time
import uuid

import click
import msgpack

REFERENCE_US = 3.56  # the research README's figure when issues 18-20 were written
REQUESTS = 300_000  # as the research script
GROUP = 1_000
_BILLABLE = {(ct, arch, step) for ct in range(1, 5) for arch in (1, 2) for step in range(1, 6)
             if step != 1}


class _Plan:
    __slots__ = ("dirty", "expires", "pid", "remaining")

    def __init__(self, remaining: int, expires: int, pid: int) -> None:
        self.remaining, self.expires, self.pid, self.dirty = remaining, expires, pid, False


class _Acct:
    __slots__ = ("dirty", "id", "payg_micros", "payg_units", "plans", "suspended", "total")

    def __init__(self, i: int) -> None:
        self.id = i
        self.plans = [_Plan(10**9, 10**12, i * 10 + k) for k in range(2)]
        self.total, self.suspended, self.payg_units, self.payg_micros = 2 * 10**9, False, 0, 0
        self.dirty = False


def group_floor_us(accounts: int = 1_000, requests: int = REQUESTS) -> float:
    """µs a request of the floor's consume groups, commit included (a fresh temporary db)."""
    accts = {f"a{i}": _Acct(i) for i in range(accounts)}
    keys: dict[tuple[str, str], int] = {}
    rng = random.Random(1)
    reqs = [(f"a{rng.randrange(accounts)}", str(uuid.uuid4()), 1, 2, 1, 3, None, 1)
            for _ in range(requests)]
    with tempfile.TemporaryDirectory(prefix="yardstick-") as d:
        db = sqlite3.connect(os.path.join(d, "floor.db"), isolation_level=None)
        db.execute("pragma journal_mode=wal")
        db.execute("pragma synchronous=full")
        db.execute("create table journal(seq integer primary key, kind text, payload blob,"
                   " hash blob)")
        db.execute("create table plans(id integer primary key, remaining integer)")
        db.execute("create table usage_daily(account integer, day text, units integer,"
                   " payg_units integer, payg_micros integer, primary key(account, day))")
        db.executemany("insert into plans values(?,?)",
                       [(p.pid, p.remaining) for a in accts.values() for p in a.plans])
        last, seq = b"\0" * 32, 0
        t0 = time.perf_counter()
        for start in range(0, len(reqs), GROUP):
            items, touched = [], []
            for (a, rid, region, ct, arch, step, scen, q) in reqs[start:start + GROUP]:
                k = (a, rid)
                if k in keys:
                    continue
                acct = accts.get(a)
                if acct is None or acct.suspended or (ct, arch, step) not in _BILLABLE:
                    continue
                left, allocs = q, []
                for p in acct.plans:
                    if p.expires <= 5 or p.remaining == 0:
                        continue
                    take = left if left < p.remaining else p.remaining
                    p.remaining -= take
                    p.dirty = True
                    allocs.append((p.pid, take))
                    left -= take
                    if left == 0:
                        break
                if left:
                    acct.payg_units += left
                    acct.payg_micros += left * 700
                acct.total -= q - left
                if not acct.dirty:
                    acct.dirty = True
                    touched.append(acct)
                keys[k] = seq + 1
                items.append((a, rid, region, ct, arch, step, scen, q, allocs, left, acct.total))
            blob = msgpack.packb(items)
            h = hashlib.sha256(last + blob).digest()
            plan_rows, usage_rows = [], []
            for acct in touched:
                acct.dirty = False
                for p in acct.plans:
                    if p.dirty:
                        p.dirty = False
                        plan_rows.append((p.remaining, p.pid))
                usage_rows.append((acct.id, "2027-01-05", acct.payg_units, acct.payg_micros))
            db.execute("begin immediate")
            seq += 1
            db.execute("insert into journal values(?,?,?,?)", (seq, "consume_block", blob, h))
            db.executemany("update plans set remaining=? where id=?", plan_rows)
            db.executemany(
                "insert into usage_daily values(?,?,1,?,?) on conflict(account,day) do update"
                " set units=units+1, payg_units=excluded.payg_units,"
                " payg_micros=excluded.payg_micros", usage_rows)
            db.execute("commit")
            last = h
        elapsed = time.perf_counter() - t0
        db.close()
    return elapsed / len(reqs) * 1e6


def describe(us: float) -> str:
    return (f"group floor {us:.2f} µs a request ({REFERENCE_US} when issues 18-20 were "
            f"written: the machine at {REFERENCE_US / us:.2f}x that speed)")


@click.command()
@click.option("--accounts", default=1_000, show_default=True, type=click.IntRange(1, 100_000))
def main(accounts: int) -> None:
    """Print the machine's speed now: the research floor of a consume group."""
    print(f"load average {os.getloadavg()[0]:.2f}; {describe(group_floor_us(accounts))}")


if __name__ == "__main__":
    main()
