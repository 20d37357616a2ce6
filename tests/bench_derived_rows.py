"""The derived-row statements of a spread consume group, alone (issue 19, schema v6).

    python -m tests.bench_derived_rows [--rows 865] [--transactions 40]

A fresh SQLite file in a temporary directory with the ledger's schema v6 (WAL,
synchronous=FULL), 1,000 plans and their offsets rows for one day; then, per statement
form, --transactions transactions each writing --rows random distinct rows (a group of
2,000 requests over 1,000 accounts touches about 865), timed around the statement alone.
Prints the median µs a row of each form: plans by text key, by rowid and text key, by
rowid; offsets upserted by text key, upserted by rowid with the text key checked, updated
by rowid; one statement over ``json_each`` for each; and schema v7's one UPDATE of a plan
and its day's offsets (a second file, migrated to v7), per plan. Then the two plan updates by rowid
(``executemany``, and one ``json_each`` statement, which releases the GIL for its whole
run) again while another thread runs Python: what a commit thread beside the writer would
meet. A floor to design against, in the manner of ``../shared/research/``, not a target.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import date

import click

from ledger.store.schema import MIGRATIONS, OFFSET_DAY_SLOTS, _statements
from ledger.store.sqlite_rows import PLAN_COLUMNS

PLANS = 1_000
DAY = "2026-12-04"


def day_number(day: str) -> int:
    """A billing day's number since 1970-01-01: the low part of a schema-v6 offsets row's
    rowid (ledger/store/schema.py)."""
    return (date.fromisoformat(day) - date(1970, 1, 1)).days


V6 = 6  # the forms below are schema v6's; v7's one statement has a database of its own


def build(path: str, version: int = V6) -> tuple[sqlite3.Connection, list[int]]:
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=FULL")
    for script in MIGRATIONS[:version]:
        for stmt in _statements(script):
            c.execute(stmt)
    seqs = [5_000 + 7 * i for i in range(PLANS)]
    c.execute("BEGIN")
    c.executemany(f"INSERT INTO plans (rowid, {PLAN_COLUMNS}) VALUES"
                  " (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                  [(s, f"plan-{s}", f"acct-{i:05d}", "year-100m", 10**8, 10**8, 0, 1, 1, 0,
                    10**15, s, 0, 0, None) for i, s in enumerate(seqs)])
    c.executemany("INSERT INTO offsets_daily (rowid, account_id, day, plan_id, units)"
                  " VALUES (?,?,?,?,?)",
                  [(s * OFFSET_DAY_SLOTS + day_number(DAY), f"acct-{i:05d}", DAY, f"plan-{s}",
                    1) for i, s in enumerate(seqs)])
    c.execute("COMMIT")
    return c, seqs


def build_v7(path: str) -> tuple[sqlite3.Connection, list[int]]:
    """Schema v7: the same plans, each holding its offsets of the day in its own row."""
    c, seqs = build(path)
    for stmt in _statements(MIGRATIONS[V6]):
        c.execute(stmt)
    return c, seqs


def v7_form(c: sqlite3.Connection, seqs: list[int]) -> Callable[[list[int]], object]:
    """A plan's units and its day's offsets in one statement (ledger/store/sqlite_rows.py)."""
    return lambda p: c.executemany(
        "UPDATE plans SET units_remaining = ?, offsets_units = offsets_units + ?"
        " WHERE rowid = ? AND offsets_day IS ?", [(99, 1, seqs[i], DAY) for i in p])


def forms(c: sqlite3.Connection, seqs: list[int]) -> dict[str, Callable[[list[int]], object]]:
    d = day_number(DAY)
    key = {i: s * OFFSET_DAY_SLOTS + d for i, s in enumerate(seqs)}
    checked = ("INSERT INTO offsets_daily (rowid, account_id, day, plan_id, units) VALUES"
               " (?,?,?,?,?) ON CONFLICT DO UPDATE SET units = units + excluded.units WHERE"
               " account_id = excluded.account_id AND day = excluded.day"
               " AND plan_id = excluded.plan_id")
    return {
        "plans by plan_id": lambda p: c.executemany(
            "UPDATE plans SET units_remaining = ? WHERE plan_id = ?",
            [(99, f"plan-{seqs[i]}") for i in p]),
        "plans by rowid and plan_id": lambda p: c.executemany(
            "UPDATE plans SET units_remaining = ? WHERE rowid = ? AND plan_id = ?",
            [(99, seqs[i], f"plan-{seqs[i]}") for i in p]),
        "plans by rowid": lambda p: c.executemany(
            "UPDATE plans SET units_remaining = ? WHERE rowid = ?", [(99, seqs[i]) for i in p]),
        "plans, one statement over json_each": lambda p: c.execute(
            "UPDATE plans SET units_remaining = j.value ->> 1 FROM json_each(?) j"
            " WHERE plans.rowid = j.value ->> 0", (json.dumps([[seqs[i], 99] for i in p]),)),
        "offsets upserted by text key": lambda p: c.executemany(
            "INSERT INTO offsets_daily (account_id, day, plan_id, units) VALUES (?,?,?,?)"
            " ON CONFLICT DO UPDATE SET units = units + excluded.units",
            [(f"acct-{i:05d}", DAY, f"plan-{seqs[i]}", 1) for i in p]),
        "offsets upserted by rowid, text key checked": lambda p: c.executemany(
            checked, [(key[i], f"acct-{i:05d}", DAY, f"plan-{seqs[i]}", 1) for i in p]),
        "offsets updated by rowid": lambda p: c.executemany(
            "UPDATE offsets_daily SET units = units + ? WHERE rowid = ?",
            [(1, key[i]) for i in p]),
        "offsets, one statement over json_each": lambda p: c.execute(
            "UPDATE offsets_daily SET units = units + j.value ->> 1 FROM json_each(?) j"
            " WHERE offsets_daily.rowid = j.value ->> 0",
            (json.dumps([[key[i], 1] for i in p]),)),
    }


def timed(c: sqlite3.Connection, fn: Callable[[list[int]], object], rows: int,
          transactions: int, rng: random.Random) -> float:
    """Median µs a row of ``fn`` over ``transactions`` transactions of ``rows`` rows."""
    times = []
    for _ in range(transactions):
        pick = rng.sample(range(PLANS), rows)
        c.execute("BEGIN IMMEDIATE")
        t = time.perf_counter()
        fn(pick)
        times.append((time.perf_counter() - t) / rows * 1e6)
        c.execute("COMMIT")
    return statistics.median(times)


def spin(stop: threading.Event) -> None:
    """Python that never blocks: another thread wanting the GIL the whole time."""
    x = 0
    while not stop.is_set():
        for i in range(1_000):
            x += i


@click.command()
@click.option("--rows", default=865, show_default=True, type=click.IntRange(1, PLANS))
@click.option("--transactions", default=40, show_default=True, type=click.IntRange(1, 1_000))
def main(rows: int, transactions: int) -> None:
    """Median µs a row of each derived-row statement form (issue 19)."""
    print(f"load average {os.getloadavg()[0]:.2f} at the start; {rows} rows a transaction")
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="bench-derived-") as d:
        c, seqs = build(os.path.join(d, "rows.db"))
        every = forms(c, seqs)
        for label, fn in every.items():
            print(f"  {label:<46} {timed(c, fn, rows, transactions, rng):5.2f} µs a row")
        v7, seqs7 = build_v7(os.path.join(d, "rows-v7.db"))
        label = "v7: plan and its day's offsets, one UPDATE"
        print(f"  {label:<46} {timed(v7, v7_form(v7, seqs7), rows, transactions, rng):5.2f}"
              " µs a plan")
        v7.close()
        stop = threading.Event()
        busy = threading.Thread(target=spin, args=(stop,), daemon=True)
        busy.start()
        try:
            print("while another thread runs Python:")
            for label in ("plans by rowid", "plans, one statement over json_each"):
                us = timed(c, every[label], rows, transactions, rng)
                print(f"  {label:<46} {us:5.2f} µs a row")
        finally:
            stop.set()
            busy.join()
        c.close()


if __name__ == "__main__":
    main()
