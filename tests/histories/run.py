"""One history run (issue 23): a fresh database on the cluster, two ledger nodes on it,
client processes recording, the nemesis, then the final state read through the API and
the checker's verdict. Everything a run leaves is under its folder:

- ``history-<process>.jsonl``: each client process's operations (:mod:`.worker`);
- ``faults.json``: the faults injected; ``final.json``: the final state;
- ``report.json``: the checker's findings; ``node0/``, ``node1/``: the nodes' logs.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
from quota_ledger.v1 import accounts_pb2 as apb
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import test_clock_pb2 as tpb
from quota_ledger.v1 import test_clock_pb2_grpc as tpb_grpc

from tests.conftest import ROOT, ServerProcess
from tests.pg_cluster import PgCluster, free_port

from . import checker, nemesis, worker

NODES = 2
CLIENT_PROCESSES = 3
ACCOUNTS = 6
START_MICROS = 5_000_000  # each account's first top-up (cash), recorded as an operation
T0 = datetime(2027, 5, 12, 10, 0, tzinfo=UTC)  # the shared test clock, never moved
CATALOG = """\
[[spec]]
spec_id = "h-month-8"
units = 8
validity = "one_month"
price_micros = 1000000

[[spec]]
spec_id = "h-year-12"
units = 12
validity = "one_year"
price_micros = 1500000
"""
WORKER_EXIT_S = 20.0  # after the load ends: the last retries and their deadlines
SETTLE_S = 1.0  # after healing, before reading the final state (late commits land)


@dataclass
class RunResult:
    seed: int
    folder: Path
    operations: int = 0
    unknown: int = 0
    faults: int = 0
    anomalies: list[dict] = field(default_factory=list)


class Clients:
    """The client processes of a run; a killed one is replaced by a fresh one (new name,
    new file), as a restarted CAPTCHA server would be."""

    def __init__(self, folder: Path, targets: str, accounts: list[str], seed: int,
                 until: float) -> None:
        self.folder, self.targets, self.accounts = folder, targets, accounts
        self.seed, self.until = seed, until
        self.procs: list[subprocess.Popen] = []
        self.started = 0

    def spawn(self) -> subprocess.Popen:
        name = f"c{self.started}"
        self.started += 1
        seconds = max(0.1, self.until - time.monotonic())
        return subprocess.Popen(
            [sys.executable, "-m", "tests.histories.worker", "--targets", self.targets,
             "--accounts", ",".join(self.accounts), "--seed", str(self.seed * 1000 + self.started),
             "--seconds", f"{seconds:.3f}", "--process", name,
             "--out", str(self.folder / f"history-{name}.jsonl")],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(self.folder / f"{name}.err", "wb"))  # noqa: SIM115

    def start(self, n: int) -> None:
        self.procs = [self.spawn() for _ in range(n)]

    def kill_and_replace(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait()
        self.procs[i] = self.spawn()

    def wait(self) -> None:
        deadline = time.monotonic() + WORKER_EXIT_S
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def setup(folder: Path, target: str, accounts: list[str]) -> None:
    """The shared test clock at T0, the accounts, and each one's first top-up: recorded
    as operations of process ``setup``, which the checker reads like any other."""
    with grpc.insecure_channel(target) as ch:
        tpb_grpc.TestClockStub(ch).SetTime(tpb.SetTimeRequest(
            now=_timestamp(T0)), timeout=10)
        node = worker.Node(target)
        rec = worker.Recorder(str(folder / "history-setup.jsonl"), "setup")
        caller = worker.Caller(rec, [node], accounts, random.Random(0), None)  # type: ignore[arg-type]
        for acct in accounts:
            node.a.CreateAccount(apb.CreateAccountRequest(account_id=acct, display_name=acct),
                                 timeout=10)
            outcome, fields = caller.one("top_up", {
                "acct": acct, "rid": f"setup-{acct}", "kind": 1, "amount": START_MICROS}, 0)
            if outcome != "ok":
                raise RuntimeError(f"setup top-up of {acct} failed: {fields}")


def _timestamp(t: datetime):  # noqa: ANN202
    from google.protobuf.timestamp_pb2 import Timestamp
    ts = Timestamp()
    ts.FromDatetime(t)
    return ts


def final_state(target: str, accounts: list[str]) -> dict:
    """What the API reports once the load is over and every node is back."""
    node = worker.Node(target)
    out = {}
    for acct in accounts:
        a = node.a.GetAccount(apb.GetAccountRequest(account_id=acct), timeout=10)
        plans = node.q.ListPlans(qpb.ListPlansRequest(account_id=acct, include_inactive=True),
                                 timeout=10).plans
        rem = node.q.GetRemaining(qpb.GetRemainingRequest(account_id=acct), timeout=10)
        out[acct] = {**worker.account_answer(a), **worker.remaining_answer(rem),
                     "plan_list": [{**worker.plan_answer(p), "units": p.units_total,
                                    "consumed": p.units_consumed,
                                    "expires_us": p.expires_at.ToMicroseconds()}
                                   for p in plans]}
    node.channel.close()
    return out


def run_once(cluster: PgCluster, seed: int, seconds: float, folder: Path,
             plant: str | None = None) -> RunResult:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "catalog.toml").write_text(CATALOG)
    dbname = f"histories_{seed}_{os.getpid()}_{int(time.time())}"
    url = cluster.create_database(dbname)
    nodes: list[ServerProcess] = []
    env_before = os.environ.get("QUOTA_LEDGER_PLANT")
    if plant:
        os.environ["QUOTA_LEDGER_PLANT"] = plant
    else:
        os.environ.pop("QUOTA_LEDGER_PLANT", None)
    clients = None
    try:
        for i in range(NODES):
            d = folder / f"node{i}"
            d.mkdir(exist_ok=True)
            nodes.append(ServerProcess(d, db=url, listen_port=free_port(),
                                       extra=["--catalog", str(folder / "catalog.toml")]).start())
        accounts = [f"acct-{i}" for i in range(ACCOUNTS)]
        setup(folder, nodes[0].target, accounts)
        until = time.monotonic() + seconds
        clients = Clients(folder, ",".join(n.target for n in nodes), accounts, seed, until)
        clients.start(CLIENT_PROCESSES)
        log: list[dict] = []
        nem = nemesis.Nemesis(nodes, cluster, clients, log)
        began = time.monotonic()
        try:
            for f in nemesis.schedule(seed, seconds, NODES, CLIENT_PROCESSES):
                time.sleep(max(0.0, began + f.at_s - time.monotonic()))
                nem.apply(f)
        finally:
            nem.heal()
        clients.wait()
        for node in nodes:
            if node.proc is None or node.proc.poll() is not None:
                node.start()
        time.sleep(SETTLE_S)
        final = final_state(nodes[0].target, accounts)
        (folder / "faults.json").write_text(json.dumps(log, indent=1))
        (folder / "final.json").write_text(json.dumps(final, indent=1))
        report = checker.check_folder(folder)
        (folder / "report.json").write_text(json.dumps(report, indent=1))
        return RunResult(seed, folder, report["operations"], report["unknown"], len(log),
                         report["anomalies"])
    finally:
        if clients is not None:
            for p in clients.procs:
                if p.poll() is None:
                    p.kill()
        for node in nodes:
            node.stop()
        if env_before is None:
            os.environ.pop("QUOTA_LEDGER_PLANT", None)
        else:
            os.environ["QUOTA_LEDGER_PLANT"] = env_before
        cluster.drop_database(dbname)
