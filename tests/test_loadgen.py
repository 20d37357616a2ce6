"""clients/loadgen.py: the accounting on its own, then short bounded runs against a real server.

Nothing here is timed: these tests prove counts and shapes, not speed (that is tests/bench.py).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from quota_ledger.v1 import quota_ledger_pb2 as qpb

from clients.loadgen import (
    AccountPicker,
    LoadConfig,
    Recorder,
    RequestFactory,
    loadtest,
    matplotlib_available,
    parse_skew,
    prepare_accounts,
    run_load,
)
from ledger.faults import ENV as FAULT_ENV

from .conftest import ServerProcess, make_account

SHORT = {"requests": 300, "duration_s": 10.0}  # every real run: ~300 requests, 10 s at most
RESULT_FIELDS = {"sent", "acknowledged", "errors", "elapsed_s", "rate_per_s", "p50_ms",
                 "p90_ms", "p99_ms", "p99_9_ms", "max_ms", "series", "consistent"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, module_db: str
           ) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path_factory.mktemp("loadgen"), db=module_db).start()
    try:
        yield srv
    finally:
        srv.stop()


def assert_accounted(result) -> None:
    assert result.sent == result.acknowledged + sum(result.errors.values()), result.to_dict()
    assert result.consistent


# --------------------------------------------------------------------------- pure accounting

def test_recorder_percentiles_on_uniform_sample():
    """1..10,000 us uniform gives p50 ~ 5,000, p90 ~ 9,000, p99 ~ 9,900 us within 3 digits."""
    rec = Recorder(clock=lambda: 0.0)
    for v in range(1, 10_001):
        rec.record(v, True)
    p = rec.percentiles()
    for key, expected_us in (("p50_ms", 5_000), ("p90_ms", 9_000), ("p99_ms", 9_900),
                             ("p99_9_ms", 9_990), ("max_ms", 10_000)):
        assert p[key] * 1000 == pytest.approx(expected_us, rel=1e-3), (key, p)
    assert rec.acknowledged == 10_000 and rec.errors == {}


def test_recorder_counts_errors_by_code_and_keeps_a_series_per_second():
    """Outcomes are counted by code, n at a time; every request sent gets one outcome; the
    per-second series has throughput and p99 (None for a second without answers)."""
    rec = Recorder(clock=lambda: 0.0)
    rec.start(at=100.0)
    rec.on_sent(11)
    rec.record(1_000, True, n=4, billable=3, replayed=1, at=100.2)
    rec.record(2_000, False, "NOT_FOUND", n=3, at=100.9)
    rec.record(0, False, "DEADLINE_EXCEEDED", at=102.5)  # clamped to 1 us
    rec.record(10**9, True, n=2, billable=2, at=102.7)  # clamped to 60 s
    assert rec.sent == 11 and rec.acknowledged == 6 and rec.billable == 5
    assert rec.errors == {"NOT_FOUND": 3, "DEADLINE_EXCEEDED": 1}
    assert not rec.consistent  # one request is still without an outcome
    rec.record(500, False, "UNAVAILABLE", at=102.8)
    result = rec.result()
    assert result.consistent and result.elapsed_s == pytest.approx(2.8)
    assert [s["acknowledged"] for s in result.series] == [4, 0, 2]
    assert [s["errors"] for s in result.series] == [3, 0, 2]
    assert result.series[1]["p99_ms"] is None
    assert result.max_ms == pytest.approx(60_000, rel=1e-3)


def test_request_factory_bytes_are_valid_consume_requests():
    """The concatenated bytes parse as ConsumeRequests with the configured fields and fresh
    request ids, alone and in a ConsumeBatchRequest."""
    config = LoadConfig(region="outside", captcha_type="invisible", architecture="v3",
                        step="4.1", quantity=7, dry_run=True)
    ids = ["acct-a", "acct-b"]
    wire = RequestFactory(config, ids, AccountPicker(2, parse_skew("uniform"),
                                                     random.Random(1)))
    one = qpb.ConsumeRequest.FromString(wire.one())
    assert one.account_id in ids and one.request_id.startswith("lg-")
    assert (one.region, one.captcha_type, one.architecture, one.step) == (2, 5, 2, 2)
    assert one.quantity == 7 and one.dry_run
    batch = qpb.ConsumeBatchRequest.FromString(wire.batch(1_000))
    assert len(batch.requests) == 1_000
    assert len({r.request_id for r in batch.requests} | {one.request_id}) == 1_001
    assert all(r.quantity == 7 and r.account_id in ids for r in batch.requests)


def test_skew_sends_the_requested_share_to_hot_accounts():
    """90/10 puts ~90% of picks on the first 10% of accounts; zipf favours rank 0; bad
    specs are refused."""
    picker = AccountPicker(100, parse_skew("90/10"), random.Random(7))
    picks = [picker.pick() for _ in range(20_000)]
    assert sum(p < 10 for p in picks) / len(picks) == pytest.approx(0.9, abs=0.02)
    assert parse_skew("0.8", hot_fraction=0.2) == parse_skew("80/20")
    zipf = AccountPicker(50, parse_skew("zipf:1.2"), random.Random(7))
    counts = Counter(zipf.pick() for _ in range(20_000))
    assert counts.most_common(1)[0][0] == 0 and set(counts) <= set(range(50))
    uniform = AccountPicker(4, parse_skew("uniform"), random.Random(7))
    assert {uniform.pick() for _ in range(1_000)} == {0, 1, 2, 3}
    for bad in ("banana", "zipf:x", "150/10"):
        with pytest.raises(ValueError):
            parse_skew(bad)


def test_config_refuses_unbounded_or_contradictory_runs():
    """Closed and open loop together, batches over 1,000, and unbounded runs are refused."""
    for bad in (LoadConfig(concurrency=4, rate=100.0), LoadConfig(batch_size=1_001),
                LoadConfig(requests=0), LoadConfig(duration_s=float("inf"))):
        with pytest.raises(ValueError):
            bad.validate()
    LoadConfig(rate=100.0).validate()


# --------------------------------------------------------------------------- real server

@pytest.mark.parametrize("shape", ["unary", "stream", "batch"])
def test_every_request_is_accounted_for_with_failures_by_code(server, shape):
    """Half the accounts do not exist: their requests come back NOT_FOUND and are counted by
    code, the rest are acknowledged, and sent == acknowledged + errors (each shape)."""
    prefix = f"half-{shape}-"
    config = LoadConfig(target=server.target, accounts=10, account_prefix=prefix, shape=shape,
                        concurrency=8, batch_size=25, seed=3, **SHORT)
    with server.client() as c:
        for account_id in config.ids()[:5]:
            make_account(c, account_id)
    result = asyncio.run(run_load(config))
    assert_accounted(result)
    assert result.sent == 300
    assert set(result.errors) == {"NOT_FOUND"} and result.errors["NOT_FOUND"] > 0
    assert result.acknowledged > 0 and result.billable == result.acknowledged
    assert result.p50_ms > 0 and result.max_ms >= result.p99_ms >= result.p50_ms


@pytest.mark.parametrize("shape", ["unary", "stream", "batch"])
def test_open_loop_run_is_accounted_for(server, shape):
    """An open-loop run at a fixed rate sends exactly the requested count, all accounted."""
    config = LoadConfig(target=server.target, accounts=5, account_prefix=f"open-{shape}-",
                        create_accounts=True, shape=shape, rate=600.0, batch_size=20,
                        requests=120, duration_s=10.0)
    result = asyncio.run(run_load(config))
    assert_accounted(result)
    assert result.sent == 120 and result.acknowledged == 120 and result.errors == {}


DEADLINE_STALL_S = 0.3  # every commit of the deadline test's server stalls this long
DEADLINE_TIMEOUT_S = 0.03  # its calls' deadline: well inside the stall


@pytest.mark.parametrize("shape", ["unary", "batch"])
def test_deadline_exceeded_counts_as_an_error(tmp_path, monkeypatch, shape):
    """A call whose deadline passes has an unknown outcome: DEADLINE_EXCEEDED, counted. The
    server stalls in every commit (fault point ``during_commit``) and replies only after it
    (R11), so every deadline passes; a deadline of a microsecond did not always (gRPC may
    round it up, and a fast server answered a batch within it)."""
    monkeypatch.setenv(FAULT_ENV, f"during_commit:1:1:{DEADLINE_STALL_S}")
    srv = ServerProcess(tmp_path).start()
    try:
        config = LoadConfig(target=srv.target, accounts=3, account_prefix=f"late-{shape}-",
                            create_accounts=True, shape=shape, concurrency=2, batch_size=10,
                            requests=40, duration_s=10.0)
        asyncio.run(prepare_accounts(config))
        config.create_accounts, config.timeout_s = False, DEADLINE_TIMEOUT_S
        result = asyncio.run(run_load(config))
    finally:
        srv.stop()
    assert_accounted(result)
    assert result.sent == 40 and result.errors.get("DEADLINE_EXCEEDED", 0) > 0


def test_account_setup_buys_plans_and_is_a_replay_when_repeated(server):
    """--create-accounts --plan: every request is plan-covered; setting up again creates and
    charges nothing new (request ids derived from account and plan are replays)."""
    config = LoadConfig(target=server.target, accounts=4, account_prefix="plan-",
                        create_accounts=True, plan="month-100k", concurrency=4, **SHORT)
    result = asyncio.run(run_load(config))
    assert_accounted(result)
    assert result.acknowledged == result.billable == 300 and result.errors == {}
    again = asyncio.run(prepare_accounts(config))
    assert again.get("existing") == 4 and "created" not in again
    with server.client() as c:
        plans = c.list_plans("plan-0000", include_inactive=True).plans
        assert len(plans) == 1
        assert sum(c.get_remaining(a).units_remaining_total for a in config.ids()) == (
            4 * 100_000 - 300)


def test_command_writes_json_with_every_field(server, tmp_path: Path):
    """`loadtest ... --json-out FILE` exits 0 and writes a JSON result with every field;
    --plot without matplotlib says so and the run goes on."""
    out = tmp_path / "result.json"
    plot = tmp_path / "plot.png"
    result = CliRunner().invoke(loadtest, [
        "--target", server.target, "--accounts", "6", "--account-prefix", "cli-",
        "--create-accounts", "--shape", "batch", "--batch-size", "30", "--requests", "300",
        "--duration", "10", "--quiet", "--json-out", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(out.read_text())
    assert RESULT_FIELDS <= set(data)
    assert data["sent"] == data["acknowledged"] + sum(data["errors"].values()) == 300
    assert data["consistent"] is True and data["shape"] == "batch"
    if matplotlib_available():
        assert plot.exists()
    else:
        assert "matplotlib is not installed" in result.output and not plot.exists()


def test_command_help_and_usage_errors():
    """--help exits 0 with an example; --concurrency with --rate is a usage error (exit 2)."""
    runner = CliRunner()
    result = runner.invoke(loadtest, ["--help"])
    assert result.exit_code == 0 and "Example:" in result.output and "--rate" in result.output
    result = runner.invoke(loadtest, ["--concurrency", "2", "--rate", "10"])
    assert result.exit_code == 2 and "mutually exclusive" in result.output


@pytest.mark.parametrize("extra", [{"shape": "unary", "client_batching": True},
                                   {"shape": "batch", "view": "compact"}],
                         ids=["client-batching", "compact-view"])
def test_client_batching_and_compact_view_are_accounted_for(server, extra):
    """--client-batching (consume() calls coalesced by the typed client) and --view compact
    count like the other shapes: NOT_FOUND by code for the missing half, the rest
    acknowledged; client batching sends fewer calls than requests."""
    prefix = f"half-{'-'.join(map(str, extra.values()))}-"
    config = LoadConfig(target=server.target, accounts=10, account_prefix=prefix,
                        concurrency=32, batch_size=25, seed=3, **SHORT, **extra)
    with server.client() as c:
        for account_id in config.ids()[:5]:
            make_account(c, account_id)
    result = asyncio.run(run_load(config))
    assert_accounted(result)
    assert result.sent == 300 and set(result.errors) == {"NOT_FOUND"}
    assert 0 < result.acknowledged == result.billable < 300
    if extra.get("client_batching"):
        assert 0 < result.calls < result.sent


def test_client_batching_goes_with_unary_only():
    """--client-batching with --shape batch is refused with a message that says why."""
    with pytest.raises(ValueError, match="--shape unary"):
        LoadConfig(shape="batch", client_batching=True).validate()
    with pytest.raises(ValueError, match="view"):
        LoadConfig(shape="batch", view="tiny").validate()
