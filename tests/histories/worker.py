"""One client process of a history run (issue 23): ``CALLERS`` threads, each calling the
nodes with raw gRPC stubs and a deadline, recording every operation as two JSON lines:

- ``{"e": "invoke", "id", "p", "k", "acct", "rid", "node", "req", "t"}`` before the call;
- ``{"e": "ok", "id", "t", "ans"}``, ``{"e": "fail", "id", "t", "code", "reason"}`` or
  ``{"e": "unknown", "id", "t", "code"}`` after it.

``t`` is ``time.monotonic_ns()``: one clock for every process of the machine, so real-time
order holds across processes. Each line is one ``os.write`` to an ``O_APPEND`` file, so a
process killed mid-call leaves whole lines: its open invokes become unknowns.

An unknown outcome (deadline, connection cut, UNAVAILABLE) is retried with the same
``request_id`` up to ``RETRIES_MAX`` times, as a CAPTCHA server's client does; an ok one
is sometimes retried too (``RETRY_OK_P``), and some consumes are hedged: sent to both
nodes at once under one ``request_id`` (``HEDGE_P``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from quota_ledger.v1 import accounts_pb2 as apb
from quota_ledger.v1 import accounts_pb2_grpc as apb_grpc
from quota_ledger.v1 import common_pb2 as pb
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import quota_ledger_pb2_grpc as qpb_grpc

CALLERS = 4
DEADLINE_S = 1.0  # each call's deadline: a SIGSTOP longer than this gives unknowns
RETRIES_MAX = 4  # retries of an unknown outcome, same request_id
RETRY_BACKOFF_S = (0.05, 0.4)
RETRY_OK_P = 0.03  # an ok answer retried once more (a replay, R12)
HEDGE_P = 0.04  # a consume sent to both nodes at once under one request_id
WEIGHTS = {"consume": 70, "remaining": 12, "purchase": 6, "top_up": 6, "refund": 6}
NOT_BILLABLE_P = 0.05  # R3: a consume that is acknowledged and changes nothing
SPECS = ("h-month-8", "h-year-12")  # the catalog the run gives the nodes (run.CATALOG)
TOP_UP_MICROS = (500_000, 3_000_000)
# Definite failures: the request was refused and changed nothing. Every other code is an
# unknown outcome (the call may or may not have been applied).
DEFINITE = {"FAILED_PRECONDITION", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS",
            "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED", "OUT_OF_RANGE"}


class Recorder:
    def __init__(self, path: str, process: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.process = process
        self._n = 0
        self._lock = threading.Lock()

    def next_id(self) -> str:
        with self._lock:
            self._n += 1
            return f"{self.process}-{self._n}"

    def write(self, line: dict) -> None:
        os.write(self.fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())


def consume_answer(r: qpb.ConsumeResponse) -> dict:
    return {"billable": r.billable, "alloc": [[a.plan_id, a.units] for a in r.allocations],
            "payg": r.payg_units, "payg_micros": r.payg_amount_micros,
            "replayed": r.replayed, "remaining": r.plan_units_remaining}


def plan_answer(p: pb.Plan) -> dict:
    return {"plan_id": p.plan_id, "spec": p.spec_id, "remaining": p.units_remaining,
            "paid_v": p.paid_voucher_micros, "paid_c": p.paid_cash_micros,
            "status": pb.PlanStatus.Name(p.status)}


def account_answer(a: pb.Account) -> dict:
    return {"cash": a.cash_balance_micros, "voucher": a.voucher_balance_micros,
            "outstanding": a.outstanding_micros}


def remaining_answer(r: qpb.GetRemainingResponse) -> dict:
    return {"total": r.units_remaining_total, "payg": r.payg_units,
            "payg_micros": r.payg_amount_micros,
            "plans": {p.plan_id: p.units_remaining for p in r.plans}}


class Node:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.q = qpb_grpc.QuotaLedgerStub(self.channel)
        self.a = apb_grpc.AccountsStub(self.channel)


def call(node: Node, kind: str, req: dict) -> tuple[str, dict]:
    """One call; returns (outcome, fields) with outcome ok, fail or unknown."""
    try:
        if kind == "consume":
            billable = req["billable"]
            msg = qpb.ConsumeRequest(
                account_id=req["acct"], request_id=req["rid"], quantity=req["qty"],
                region=req["region"], captcha_type=pb.CAPTCHA_TYPE_SLIDER,
                architecture=pb.CLIENT_ARCHITECTURE_V3,
                step=pb.VERIFICATION_STEP_3 if billable else pb.VERIFICATION_STEP_4_1)
            return "ok", {"ans": consume_answer(node.q.Consume(msg, timeout=DEADLINE_S))}
        if kind == "remaining":
            got = node.q.GetRemaining(qpb.GetRemainingRequest(account_id=req["acct"]),
                                      timeout=DEADLINE_S)
            return "ok", {"ans": remaining_answer(got)}
        if kind == "purchase":
            got = node.a.PurchasePlan(apb.PurchasePlanRequest(
                account_id=req["acct"], request_id=req["rid"], spec_id=req["spec"]),
                timeout=DEADLINE_S)
            return "ok", {"ans": plan_answer(got)}
        if kind == "top_up":
            got = node.a.TopUp(apb.TopUpRequest(
                account_id=req["acct"], request_id=req["rid"], kind=req["kind"],
                amount_micros=req["amount"]), timeout=DEADLINE_S)
            return "ok", {"ans": account_answer(got)}
        if kind == "refund":
            got = node.a.RefundPlan(apb.RefundPlanRequest(
                plan_id=req["plan_id"], request_id=req["rid"], reason="history"),
                timeout=DEADLINE_S)
            return "ok", {"ans": plan_answer(got)}
        raise ValueError(kind)
    except grpc.RpcError as exc:
        code = exc.code().name if exc.code() is not None else "UNKNOWN"
        if code in DEFINITE:
            return "fail", {"code": code, "reason": error_reason(exc)}
        return "unknown", {"code": code}


def error_reason(exc: grpc.RpcError) -> str:
    """The ErrorInfo reason of a refusal (CONTRACT), or "" when it carries none."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


class Caller:
    def __init__(self, rec: Recorder, nodes: list[Node], accounts: list[str],
                 rng: random.Random, hedger: ThreadPoolExecutor) -> None:
        self.rec, self.nodes, self.accounts, self.rng = rec, nodes, accounts, rng
        self.hedger = hedger
        self.plans: dict[str, list[str]] = {a: [] for a in accounts}  # seen bought, to refund

    def one(self, kind: str, req: dict, node: int) -> tuple[str, dict]:
        op_id = self.rec.next_id()
        self.rec.write({"e": "invoke", "id": op_id, "p": self.rec.process, "k": kind,
                        "acct": req["acct"], "rid": req.get("rid"), "node": node, "req": req,
                        "t": time.monotonic_ns()})
        outcome, fields = call(self.nodes[node], kind, req)
        self.rec.write({"e": outcome, "id": op_id, "t": time.monotonic_ns(), **fields})
        return outcome, fields

    def request(self) -> tuple[str, dict]:
        rng = self.rng
        kind = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        acct = rng.choice(self.accounts)
        rid = f"{self.rec.process}-{kind}-{rng.getrandbits(48):012x}"
        if kind == "consume":
            return kind, {"acct": acct, "rid": rid, "qty": rng.randint(1, 3),
                          "region": rng.choice((pb.REGION_CHINESE_MAINLAND,
                                                pb.REGION_OUTSIDE_CHINESE_MAINLAND)),
                          "billable": rng.random() >= NOT_BILLABLE_P}
        if kind == "purchase":
            return kind, {"acct": acct, "rid": rid, "spec": rng.choice(SPECS)}
        if kind == "top_up":
            return kind, {"acct": acct, "rid": rid,
                          "kind": rng.choice((pb.FUNDS_KIND_CASH, pb.FUNDS_KIND_VOUCHER)),
                          "amount": rng.randint(*TOP_UP_MICROS)}
        if kind == "refund" and self.plans[acct]:
            return kind, {"acct": acct, "rid": rid, "plan_id": rng.choice(self.plans[acct])}
        return "remaining", {"acct": acct}

    def run(self, until: float) -> None:
        rng = self.rng
        while time.monotonic() < until:
            kind, req = self.request()
            node = rng.randrange(len(self.nodes))
            if kind == "consume" and rng.random() < HEDGE_P:
                other = self.hedger.submit(self.one, kind, req, 1 - node)
                outcome, fields = self.one(kind, req, node)
                other.result()
            else:
                outcome, fields = self.one(kind, req, node)
            retries = 0
            while outcome == "unknown" and retries < RETRIES_MAX and kind != "remaining":
                retries += 1
                time.sleep(rng.uniform(*RETRY_BACKOFF_S))
                outcome, fields = self.one(kind, req, rng.randrange(len(self.nodes)))
            if outcome == "ok" and kind != "remaining" and rng.random() < RETRY_OK_P:
                outcome, fields = self.one(kind, req, rng.randrange(len(self.nodes)))
            if outcome == "ok" and kind == "purchase":
                self.plans[req["acct"]].append(fields["ans"]["plan_id"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", required=True, help="HOST:PORT,HOST:PORT")
    ap.add_argument("--accounts", required=True, help="account ids, comma-separated")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--out", required=True, help="the history file (JSON lines, appended)")
    ap.add_argument("--process", required=True, help="this process's name in the history")
    ap.add_argument("--callers", type=int, default=CALLERS)
    args = ap.parse_args(argv)
    rec = Recorder(args.out, args.process)
    nodes = [Node(t) for t in args.targets.split(",")]
    accounts = args.accounts.split(",")
    until = time.monotonic() + args.seconds
    with ThreadPoolExecutor(args.callers) as hedger:
        threads = [threading.Thread(target=Caller(rec, nodes, accounts,
                                                  random.Random(args.seed * 100 + i),
                                                  hedger).run, args=(until,))
                   for i in range(args.callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
