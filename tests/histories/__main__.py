"""``python -m tests.histories`` (``make histories``): N seeded runs on PostgreSQL with two
nodes, each checked; exits 0 only when no run found an anomaly (issue 23)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from ledger.faults import PLANT_ENV, PLANTS
from tests.pg_cluster import PgCluster, find_bindir

from .run import run_once

DEFAULT_RUNS = 20
DEFAULT_SECONDS = 60.0
DEFAULT_FOLDER = "data/histories"
SHOWN_PER_ANOMALY = 10  # operations printed per anomaly (all of them are in report.json)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.histories", description=(
        "Record histories of two ledger nodes on PostgreSQL under faults and check them "
        f"(issue 23). {PLANT_ENV}=NAME plants a known bug in the nodes (see --list-bugs)."))
    ap.add_argument("--runs", type=int, default=DEFAULT_RUNS)
    ap.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="load per run")
    ap.add_argument("--seed", type=int, default=None,
                    help="the first run's seed (then seed+1, ...); random when unset")
    ap.add_argument("--folder", default=DEFAULT_FOLDER,
                    help="where each run's histories, faults, final state and report go")
    ap.add_argument("--list-bugs", action="store_true", help="the bugs that can be planted")
    args = ap.parse_args(argv)
    if args.list_bugs:
        for name, what in PLANTS.items():
            print(f"{name}: {what}")
        return 0
    if find_bindir() is None:
        print("histories: no PostgreSQL server binaries (apt-get install postgresql)",
              file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C: the nodes, clients and cluster are stopped, not left over
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plant = os.environ.get(PLANT_ENV) or None
    first = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "big")
    folder = Path(args.folder) / time.strftime("%Y%m%d-%H%M%S")
    print(f"histories: {args.runs} runs of {args.seconds:g} s from seed {first}"
          f"{f', bug planted: {plant}' if plant else ''}; saved under {folder}")
    cluster = PgCluster(Path(tempfile.mkdtemp(prefix="quota-ledger-hist-pg-"))).start()
    totals = {"ops": 0, "unknown": 0, "faults": 0, "anomalies": 0}
    try:
        for seed in range(first, first + args.runs):
            r = run_once(cluster, seed, args.seconds, folder / f"seed-{seed}", plant)
            totals["ops"] += r.operations
            totals["unknown"] += r.unknown
            totals["faults"] += r.faults
            totals["anomalies"] += len(r.anomalies)
            print(f"seed {seed}: {r.operations} operations, {r.unknown} unknown, "
                  f"{r.faults} faults, {len(r.anomalies)} anomalies", flush=True)
            for a in r.anomalies:
                print(f"  ANOMALY {a['kind']} on {a['account']} (seed {seed}): {a['why']}")
                for line in a["ops"][:SHOWN_PER_ANOMALY]:
                    print(f"    {line}")
    finally:
        cluster.stop()
    (folder / "summary.json").write_text(json.dumps({"first_seed": first, **totals}))
    print(f"histories: {args.runs} runs, {totals['ops']} operations, {totals['unknown']} "
          f"unknown, {totals['faults']} faults, {totals['anomalies']} anomalies")
    return 1 if totals["anomalies"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
