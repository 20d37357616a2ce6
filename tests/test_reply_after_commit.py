"""R11: no reply leaves before its group's commit (issue 18's acceptance).

Every commit stalls STALL_S inside its transaction (the fault point ``during_commit``: the
group's rows are written, COMMIT not yet issued). A Consume, a ConsumeBatch and a
ConsumeStream message, each alone (the inline path at 1 in flight) and several at once (the
writer thread's groups), must all still be waiting while the stall lasts, and the unit they
took must be committed, seen by another connection, when their reply arrives. The planted bug
``reply_before_commit`` (replies first, commit later) makes the same check fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from quota_ledger.v1 import common_pb2 as pb
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import quota_ledger_pb2_grpc as qpb_grpc

from ledger.faults import ENV as FAULT_ENV
from ledger.faults import PLANT_ENV

from .test_spool import FixedPortServer, free_port, payg_units_today, setup_account

STALL_S = 0.6  # every commit holds its transaction open this long before COMMIT
EARLY_S = 0.3  # a reply before this much of the stall went by left before its commit
CONCURRENT = 6


def _consume(account_id: str, request_id: str) -> qpb.ConsumeRequest:
    return qpb.ConsumeRequest(account_id=account_id, request_id=request_id,
                              region=pb.REGION_CHINESE_MAINLAND,
                              captcha_type=pb.CAPTCHA_TYPE_SLIDER,
                              architecture=pb.CLIENT_ARCHITECTURE_V2,
                              step=pb.VERIFICATION_STEP_3, quantity=1)


def _stalled_server(tmp_path: Path, db: str, monkeypatch: pytest.MonkeyPatch
                    ) -> FixedPortServer:
    srv = FixedPortServer(tmp_path, free_port(), db).start()  # set up without the stall
    setup_account(srv.target)
    srv.stop()
    monkeypatch.setenv(FAULT_ENV, f"during_commit:1:1:{STALL_S}")
    return srv.start()


def _calls(stub: qpb_grpc.QuotaLedgerStub, shape: str, ids: list[str]) -> list[float]:
    """Send one call per id at once; each call's seconds until its reply."""

    def one(rid: str) -> float:
        t0 = time.monotonic()
        if shape == "unary":
            assert stub.Consume(_consume("acme", rid), timeout=30).billable
        elif shape == "batch":
            r = stub.ConsumeBatch(qpb.ConsumeBatchRequest(requests=[_consume("acme", rid)]),
                                  timeout=30)
            assert r.results[0].response.billable
        else:
            (r,) = list(stub.ConsumeStream(iter([_consume("acme", rid)]), timeout=30))
            assert r.response.billable
        return time.monotonic() - t0

    with ThreadPoolExecutor(len(ids)) as pool:
        return list(pool.map(one, ids))


@pytest.mark.parametrize("shape", ["unary", "batch", "stream"])
def test_no_reply_before_its_commit(tmp_path: Path, db: str,
                                    monkeypatch: pytest.MonkeyPatch, shape: str):
    srv = _stalled_server(tmp_path, db, monkeypatch)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = qpb_grpc.QuotaLedgerStub(ch)
            before = payg_units_today(srv.target, "acme")
            lone = _calls(stub, shape, [f"{shape}-lone"])
            assert min(lone) >= EARLY_S, f"a lone {shape} reply came {lone} s after sending"
            assert payg_units_today(srv.target, "acme") == before + 1  # committed by then
            many = _calls(stub, shape, [f"{shape}-{i}" for i in range(CONCURRENT)])
            assert min(many) >= EARLY_S, f"concurrent {shape} replies came after {many} s"
            assert payg_units_today(srv.target, "acme") == before + 1 + CONCURRENT
    finally:
        srv.stop()


def test_the_check_catches_replies_before_commit(tmp_path: Path):
    """The same check, against a server with the planted bug: it must fail (the check is
    not one that always passes)."""
    env = {**os.environ, PLANT_ENV: "reply_before_commit"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "t"), __file__, "-k",
                           "test_no_reply_before_its_commit and unary and sqlite"],
                          env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "reply came" in done.stdout, done.stdout[-2000:]
