"""An independent client needs nothing but the .proto files, and reflection lists every service."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from .conftest import ROOT, T0

PROTO_FILES = ["quota_ledger/v1/common.proto", "quota_ledger/v1/quota_ledger.proto",
               "quota_ledger/v1/accounts.proto", "quota_ledger/v1/settlement.proto",
               "quota_ledger/v1/test_clock.proto"]
SUBPROCESS_TIMEOUT_S = 60

# Runs with `python -I` (no PYTHONPATH, no user site) in a directory holding only .proto files.
CLIENT = textwrap.dedent("""
    import json, os, sys
    project, target, t0 = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # The venv installs the project in editable mode: drop that finder and any project path.
    def in_project(path):  # the project's own sources, not the venv that lives inside it
        p = os.path.abspath(path)
        return ((p == project or p.startswith(project + os.sep))
                and not p.startswith(sys.prefix + os.sep))
    sys.meta_path[:] = [f for f in sys.meta_path
                        if "__editable__" not in getattr(f, "__module__", "")]
    sys.path[:] = [p for p in sys.path if p and not in_project(p)]
    sys.path.insert(0, os.getcwd())
    import importlib.util
    for name in ("ledger", "server", "clients"):
        assert importlib.util.find_spec(name) is None, f"project package {name} is importable"

    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp
    common = grpc.protos("quota_ledger/v1/common.proto")
    qpb, qgrpc = grpc.protos_and_services("quota_ledger/v1/quota_ledger.proto")
    apb, agrpc = grpc.protos_and_services("quota_ledger/v1/accounts.proto")
    tpb, tgrpc = grpc.protos_and_services("quota_ledger/v1/test_clock.proto")
    grpc.protos_and_services("quota_ledger/v1/settlement.proto")
    loaders = {m.__name__: type(m.__loader__).__name__ for m in (common, qpb, qgrpc, apb, tpb)}
    from_project = sorted(n for n, m in sys.modules.items()
                          if getattr(m, "__file__", None) and in_project(m.__file__))

    out = {"loaders": loaders, "from_project": from_project}
    with grpc.insecure_channel(target) as ch:
        ledger, accounts = qgrpc.QuotaLedgerStub(ch), agrpc.AccountsStub(ch)
        clock = tgrpc.TestClockStub(ch)
        out["now"] = clock.SetTime(tpb.SetTimeRequest(now=Timestamp(seconds=t0)),
                                   timeout=10).now.seconds
        specs = accounts.ListPlanSpecs(apb.ListPlanSpecsRequest(), timeout=10).specs
        out["specs"] = {s.spec_id: [s.units, s.price_micros] for s in specs}
        accounts.CreateAccount(apb.CreateAccountRequest(account_id="indie",
                                                        display_name="Indie Ltd"), timeout=10)
        acct = accounts.TopUp(apb.TopUpRequest(account_id="indie", request_id="t1",
                                               kind=common.FUNDS_KIND_CASH,
                                               amount_micros=100_000_000), timeout=10)
        out["cash"] = acct.cash_balance_micros
        plan = accounts.PurchasePlan(apb.PurchasePlanRequest(
            account_id="indie", request_id="p1", spec_id="month-100k"), timeout=10)
        out["plan"] = [plan.plan_id, plan.units_total, plan.status]
        r = ledger.Consume(qpb.ConsumeRequest(
            account_id="indie", request_id="c1", region=common.REGION_CHINESE_MAINLAND,
            captcha_type=common.CAPTCHA_TYPE_INVISIBLE,
            architecture=common.CLIENT_ARCHITECTURE_V3, step=common.VERIFICATION_STEP_4_1,
            quantity=5), timeout=10)
        out["consume"] = [r.billable, [[a.plan_id, a.units] for a in r.allocations],
                          r.payg_units, r.billing_day]
        rem = ledger.GetRemaining(qpb.GetRemainingRequest(account_id="indie"), timeout=10)
        out["remaining"] = rem.units_remaining_total
        out["time"] = clock.AdvanceTime(tpb.AdvanceTimeRequest(seconds=60),
                                        timeout=10).now.seconds
    print(json.dumps(out))
""")


def test_client_from_proto_files_alone(server, tmp_path):
    """A client built at run time from copies of protos/*.proto drives the whole happy path."""
    protos_dir = tmp_path / "protos"  # only the .proto files: generated code cannot help
    for rel in PROTO_FILES:
        (protos_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "protos" / rel, protos_dir / rel)
    t0 = int(T0.timestamp())
    proc = subprocess.run(
        [sys.executable, "-I", "-c", CLIENT, str(ROOT), server.target, str(t0)],
        cwd=protos_dir, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
        env={"PATH": "/usr/bin:/bin", "GRPC_VERBOSITY": "ERROR"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["from_project"] == []
    assert set(out["loaders"].values()) == {"ProtoLoader"}, out["loaders"]
    assert out["now"] == t0
    assert out["specs"]["month-100k"] == [100_000, 60_000_000]
    assert out["cash"] == 100_000_000
    plan_id, units, status = out["plan"]
    assert units == 100_000 and status == 1  # PLAN_STATUS_ACTIVE
    assert out["consume"] == [True, [[plan_id, 5]], 0, "2027-03-10"]
    assert out["remaining"] == 100_000 - 5
    assert out["time"] == t0 + 60


def test_reflection_lists_all_services_and_describes_them(server):
    """Server reflection lists the four quota_ledger.v1 services and health, with their types."""
    with grpc.insecure_channel(server.target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        expected = {"quota_ledger.v1.QuotaLedger", "quota_ledger.v1.Accounts",
                    "quota_ledger.v1.Settlement", "quota_ledger.v1.TestClock",
                    "grpc.health.v1.Health"}
        assert expected <= services, services
        pool = descriptor_pool.DescriptorPool(db)
        consume = pool.FindServiceByName("quota_ledger.v1.QuotaLedger").FindMethodByName(
            "Consume")
        fields = {f.name for f in consume.input_type.fields}
        assert {"account_id", "request_id", "region", "captcha_type", "architecture", "step",
                "scenario_id", "quantity", "dry_run", "client_timestamp"} <= fields
        methods = {m.name for m in pool.FindServiceByName("quota_ledger.v1.Accounts").methods}
        assert {"CreateAccount", "GetAccount", "TopUp", "UpdateFeatures", "Reactivate",
                "ListPlanSpecs", "PurchasePlan", "RefundPlan"} <= methods
        settle = {m.name for m in pool.FindServiceByName("quota_ledger.v1.Settlement").methods}
        assert settle >= {"SettleDay", "GetBill", "ListBills"}
