"""Disk full: the journal on a 3 MiB tmpfs, filled until writes fail (R11, R25).

The server must refuse cleanly (UNAVAILABLE with reason JOURNAL_UNAVAILABLE, or
RESOURCE_EXHAUSTED), never INTERNAL and never crash; nothing partial may reach the journal;
once space is freed it must take writes again, and `quota-ledger verify` must pass.
Needs root (mount); skipped with the reason when mounting is not permitted.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from quota_ledger.v1 import accounts_pb2 as apb
from quota_ledger.v1 import accounts_pb2_grpc as apb_grpc
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import quota_ledger_pb2_grpc as qpb_grpc
from quota_ledger.v1 import test_clock_pb2 as tpb
from quota_ledger.v1 import test_clock_pb2_grpc as tpb_grpc

from ledger.store import consume_entries
from ledger.store.sqlite import CHECKPOINT_INTERVAL_S

from .conftest import ROOT, T0, ServerProcess

TMPFS_SIZE = "3M"
HEADROOM_BYTES = 384 * 1024  # left free after the junk file: a few dozen commits' worth
JUNK_CHUNK_BYTES = 64 * 1024
BATCH_ITEMS = 40
BATCHES_MAX = 400  # the disk is full long before this
SINGLE_CALLS_MAX = 200
FAILURES_IN_A_ROW = 5  # single writes refused in a row: the disk is truly full
TIMEOUT_S = 30.0
CHECKPOINTS_TRIED = 4  # the checkpoint thread's attempts the calls keep going through
CALLS_MAX = 20_000
CHECKPOINT_CALL_TIMEOUT_S = 5.0

C = grpc.StatusCode
CLEAN_FAILURES = {(C.UNAVAILABLE, "JOURNAL_UNAVAILABLE")}  # plus any RESOURCE_EXHAUSTED


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs under tmp_path, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs",
                               str(disk)], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, PermissionError) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (mount exited {done.returncode}): "
                    f"{(done.stderr or done.stdout).strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30, check=False)


@pytest.fixture
def disk_server(tmp_path: Path, small_disk: Path) -> Iterator[ServerProcess]:
    """A test-clock server whose database lives on the small disk (its log stays outside)."""
    srv = ServerProcess(tmp_path)
    srv.db = small_disk / "ledger.db"
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def fill(disk: Path, leave_bytes: int) -> Path:
    """Write a junk file until the disk is full, then give back `leave_bytes`."""
    junk = disk / "junk.bin"
    chunk = os.urandom(JUNK_CHUNK_BYTES)
    with open(junk, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        try:
            while f.write(chunk):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    size = junk.stat().st_size
    os.truncate(junk, max(0, size - leave_bytes))
    return junk


def failure(err: grpc.RpcError) -> tuple[grpc.StatusCode, str | None]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return err.code(), info.reason
    return err.code(), None


def is_clean(code: grpc.StatusCode, reason: str | None) -> bool:
    return code is C.RESOURCE_EXHAUSTED or (code, reason) in CLEAN_FAILURES


def consume(account: str, request_id: str) -> qpb.ConsumeRequest:
    return qpb.ConsumeRequest(account_id=account, request_id=request_id, region=1,
                              captcha_type=1, architecture=1, step=1, scenario_id="checkout")


def journal_keys(db: Path) -> Counter[str]:
    """How many consume entries each request_id has in the journal (read-only)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return Counter(r[3] for r in consume_entries(conn))
    finally:
        conn.close()


def test_r11_disk_full_fails_cleanly_and_recovers(disk_server: ServerProcess,
                                                  small_disk: Path) -> None:
    """R11/R25: a full disk refuses writes cleanly, journals nothing partial, recovers."""
    srv = disk_server
    ch = grpc.insecure_channel(srv.target)
    ql, acc = qpb_grpc.QuotaLedgerStub(ch), apb_grpc.AccountsStub(ch)
    t0 = Timestamp()
    t0.FromDatetime(T0)
    tpb_grpc.TestClockStub(ch).SetTime(tpb.SetTimeRequest(now=t0), timeout=TIMEOUT_S)
    acc.CreateAccount(apb.CreateAccountRequest(account_id="acme"), timeout=TIMEOUT_S)
    acc.TopUp(apb.TopUpRequest(account_id="acme", request_id="cash", kind=1,
                               amount_micros=10**12), timeout=TIMEOUT_S)
    acked: set[str] = set()  # request_ids the server acknowledged as newly recorded
    refused: set[str] = set()  # request_ids whose write failed
    codes: Counter[tuple[str, str | None]] = Counter()
    junk = fill(small_disk, HEADROOM_BYTES)


    def record(rid: str, code: grpc.StatusCode, reason: str | None, detail: object) -> None:
        codes[(code.name, reason)] += 1
        assert is_clean(code, reason), (rid, code, reason, detail)
        refused.add(rid)

    # Batches of fresh requests until one fails: the disk is (nearly) full.
    for b in range(BATCHES_MAX):
        ids = [f"b{b}-{i}" for i in range(BATCH_ITEMS)]
        reply = ql.ConsumeBatch(qpb.ConsumeBatchRequest(
            requests=[consume("acme", i) for i in ids]), timeout=TIMEOUT_S)
        assert len(reply.results) == len(ids)
        for rid, res in zip(ids, reply.results, strict=True):
            assert res.request_id == rid
            if res.WhichOneof("outcome") == "response":
                assert res.response.billable and not res.response.replayed, res
                acked.add(rid)
            else:
                code = next(c for c in C if c.value[0] == res.error.code)
                record(rid, code, res.error.reason, res)
        if refused:
            break
    assert refused, f"the disk never filled up after {BATCHES_MAX} batches"
    assert acked, "nothing was written before the disk filled up"

    # Single writes of every kind until the last bytes are gone too: each one either succeeds
    # (a small write may still fit) or fails cleanly; stop after a run of failures.
    failures_in_a_row = 0
    for n in range(SINGLE_CALLS_MAX):
        rid = f"u{n}"
        try:
            r = ql.Consume(consume("acme", rid), timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            record(rid, *failure(err), err.details())
            failures_in_a_row += 1
        else:
            assert r.billable and not r.replayed, r
            acked.add(rid)
            failures_in_a_row = 0
        for call, req in ((acc.TopUp, apb.TopUpRequest(account_id="acme", request_id=f"t{n}",
                                                       kind=2, amount_micros=1)),
                          (acc.CreateAccount, apb.CreateAccountRequest(account_id=f"new-{n}"))):
            try:
                call(req, timeout=TIMEOUT_S)
            except grpc.RpcError as err:
                code, reason = failure(err)
                codes[(code.name, reason)] += 1
                assert is_clean(code, reason), (req, code, reason, err.details())
        if failures_in_a_row >= FAILURES_IN_A_ROW:
            break
    assert failures_in_a_row >= FAILURES_IN_A_ROW, "writes kept succeeding on a full disk"

    # While full: reads still answer, the server is alive, nothing refused got in.
    got = acc.GetAccount(apb.GetAccountRequest(account_id="acme"), timeout=TIMEOUT_S)
    assert got.account_id == "acme"
    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert srv.proc is not None and srv.proc.poll() is None, "the server died on a full disk"
    keys = journal_keys(srv.db)
    assert all(keys[r] == 1 for r in acked), "an acknowledged request is missing or doubled"
    assert not any(keys[r] for r in refused), "a refused request reached the journal"

    # Free the space: the refused requests now go through, once, as first writes (not replays).
    junk.unlink()
    for rid in sorted(refused):
        r = ql.Consume(consume("acme", rid), timeout=TIMEOUT_S)
        assert r.billable and not r.replayed, (rid, r)
    for rid in sorted(acked)[:20]:  # and the acknowledged ones replay
        assert ql.Consume(consume("acme", rid), timeout=TIMEOUT_S).replayed
    fresh = ql.Consume(consume("acme", "after-space-freed"), timeout=TIMEOUT_S)
    assert fresh.billable and not fresh.replayed and fresh.journal_seq > 0
    acc.CreateAccount(apb.CreateAccountRequest(account_id="after-full"), timeout=TIMEOUT_S)
    ch.close()

    assert srv.stop() == 0, "the server did not drain and exit cleanly"
    keys = journal_keys(srv.db)
    assert {k for k, n in keys.items() if n != 1} == set(), "a request journaled twice"
    assert acked | refused | {"after-space-freed"} <= set(keys)
    verify = subprocess.run([sys.executable, "-m", "server", "verify", "--db", str(srv.db)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    log = (srv.tmp / "server.log").read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback"):][:3_000]
    print(f"\nacknowledged {len(acked)}, refused {len(refused)} then retried; failures: "
          f"{dict(codes)}")


def test_r11_full_disk_checkpoint_never_strands_replies(disk_server: ServerProcess,
                                                        small_disk: Path) -> None:
    """R11: a checkpoint failing on a full disk leaves no call unanswered, logs no Traceback."""
    srv = disk_server
    ch = grpc.insecure_channel(srv.target)
    ql, acc = qpb_grpc.QuotaLedgerStub(ch), apb_grpc.AccountsStub(ch)
    acc.CreateAccount(apb.CreateAccountRequest(account_id="acme"), timeout=TIMEOUT_S)
    for b in range(20):  # ~1.2 MB of WAL that a checkpoint must copy into a growing file
        ql.ConsumeBatch(qpb.ConsumeBatchRequest(
            requests=[consume("acme", f"b{b}-{i}") for i in range(100)]), timeout=TIMEOUT_S)
    fill(small_disk, 0)
    # Non-billable Consumes (R3) write nothing, yet each is a writer group: keep calling
    # while the checkpoint thread tries (and fails) several times.
    nb = qpb.ConsumeRequest(account_id="acme", request_id="nb", region=1, captcha_type=1,
                            architecture=1, step=2)
    stranded: Counter[str] = Counter()
    until = time.monotonic() + CHECKPOINTS_TRIED * CHECKPOINT_INTERVAL_S
    for _ in range(CALLS_MAX):
        if time.monotonic() > until:
            break
        try:
            ql.Consume(nb, timeout=CHECKPOINT_CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            stranded[err.code().name] += 1
    ch.close()
    log = (srv.tmp / "server.log").read_text(errors="replace")
    assert not stranded and "Traceback" not in log, (dict(stranded), log[-1_500:])
