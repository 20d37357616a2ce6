"""Operability: configuration precedence, structured logs, metrics, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients.client import AsyncLedgerClient, LedgerClient, LedgerError
from ledger.errors import InvalidArgument
from ledger.store import consume_entries
from server import config

from .conftest import ROOT, T0, ServerProcess, make_account

DRAIN_LIMIT_S = 5.0
DRAIN_LOAD_PER_WORKER_MAX = 5_000  # bounded: each caller stops at its first refusal


def test_config_precedence_defaults_file_env_flags(tmp_path):
    """A flag beats the environment, which beats the file, which beats the default."""
    path = tmp_path / "ledger.toml"
    path.write_text('[server]\ndb = "from-file.db"\ngrace_s = 2.0\nlisten = "127.0.0.1:7000"\n')
    env = {"QUOTA_LEDGER_GRACE_S": "3.5", "QUOTA_LEDGER_LISTEN": "127.0.0.1:7001"}
    cfg = config.load(str(path), env=env, flags={"listen": "127.0.0.1:7002", "db": None})
    assert (cfg.db, cfg.grace_s, cfg.listen) == ("from-file.db", 3.5, "127.0.0.1:7002")
    assert config.load(None, env={}).listen == "127.0.0.1:50051"
    for bad in ({"QUOTA_LEDGER_QUEUE_DEPTH_MAX": "-1"}, {"QUOTA_LEDGER_LOG_FORMAT": "xml"}):
        with pytest.raises(InvalidArgument):
            config.load(None, env=bad)
    path.write_text("[server]\nlisten_port = 1\n")
    with pytest.raises(InvalidArgument, match="unknown settings listen_port"):
        config.load(str(path), env={})


def test_config_show_round_trips_through_a_file(tmp_path):
    """`config show` prints a TOML file that --config reads back to the same values."""
    env = {"QUOTA_LEDGER_GRACE_S": "7.25", "QUOTA_LEDGER_LOG_FORMAT": "json", "PATH": ""}
    out = subprocess.run([sys.executable, "-m", "server", "config", "show"], cwd=ROOT,
                         env={**env, "PYTHONPATH": ""}, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    (tmp_path / "c.toml").write_text(out)
    again = config.load(str(tmp_path / "c.toml"), env={})
    assert again.grace_s == 7.25 and again.log_format == "json"
    assert again == config.load(None, env=env)


def test_config_show_masks_a_postgresql_password(tmp_path):
    """Issue 11: credentials never reach the output; the URL is shown with *** instead."""
    env = {"QUOTA_LEDGER_DB": "postgresql://ledger:s3cret@db.internal:5432/ledger",
           "PATH": "", "PYTHONPATH": ""}
    out = subprocess.run([sys.executable, "-m", "server", "config", "show"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert 'db = "postgresql://ledger:***@db.internal:5432/ledger"' in out
    assert "s3cret" not in out


@pytest.fixture
def json_server(tmp_path, db):
    srv = ServerProcess(tmp_path, extra=["--log-format", "json", "--log-level", "info",
                                         "--grace-s", str(DRAIN_LIMIT_S)], db=db)
    srv.start()
    yield srv
    srv.stop()


def test_json_logs_one_object_per_line_with_events(json_server):
    """Start, settlement and refusal events are JSON lines with their fields."""
    with json_server.client() as c:
        c.set_time(T0)
        make_account(c)
        with pytest.raises(LedgerError):
            c.purchase_plan("acme", "month-100k", request_id="buy-1")  # INSUFFICIENT_FUNDS
        c.consume("acme")
        c.advance_time(86_400)
    json_server.stop()
    lines = [json.loads(line) for line in (json_server.tmp / "server.log").read_text()
             .splitlines() if line.startswith("{")]
    events = {line.get("event"): line for line in lines}
    assert {"start", "settlement", "refusal", "drain", "stop"} <= set(events)
    assert events["refusal"]["reason"] == "INSUFFICIENT_FUNDS"
    assert events["refusal"]["request_id"] == "buy-1"
    assert events["settlement"]["bills"] == 1


def _scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_after_load_show_requests_latency_and_batches(server, client):
    """After a short load the counters, latency buckets and commit sizes are non-zero."""
    make_account(client, cash_micros=100_000_000)
    client.purchase_plan("acme", "month-100k")
    client.consume_batch([client.consume_request("acme") for _ in range(200)])
    for _ in range(20):
        client.consume("acme", region="outside")
    m = _scrape(server.metrics_port)
    consume_ok = [s for s in m["ledger_rpc_requests"]
                  if s.labels == {"method": "Consume", "code": "OK"} and s.name.endswith("_total")]
    assert consume_ok and consume_ok[0].value == 20
    buckets = [s for s in m["ledger_rpc_latency_seconds"]
               if s.name.endswith("_bucket") and s.labels["method"] == "Consume"]
    assert buckets and max(s.value for s in buckets) == 20
    sizes = {s.name: s.value for s in m["ledger_commit_group_requests"]}
    assert sizes["ledger_commit_group_requests_sum"] >= 220
    billable = {(s.labels["region"], s.labels["paid_by"]): s.value
                for s in m["ledger_billable_units"] if s.name.endswith("_total")}
    assert billable[("chinese_mainland", "plan")] == 200
    assert billable[("outside_chinese_mainland", "plan")] == 20
    rows = [s.value for s in m["ledger_journal_entries"]]
    assert rows == [server.journal_rows()]


def test_sigterm_during_load_keeps_every_reply_and_exits_zero(tmp_path, db):
    """SIGTERM mid-load: each replied request is journaled whole; exit 0 within the limit."""
    srv = ServerProcess(tmp_path, extra=["--grace-s", str(DRAIN_LIMIT_S)], db=db).start()
    with srv.client() as c:
        c.set_time(T0)
        make_account(c, cash_micros=100_000_000)
        c.purchase_plan("acme", "month-100k")
    acked: dict[str, object] = {}
    stop = threading.Event()

    def load(worker: int) -> None:
        with LedgerClient(srv.target, timeout_s=5, retries=0) as c:
            for i in range(2_000):
                if stop.is_set():
                    return
                rid = f"w{worker}-{i}"
                try:
                    acked[rid] = c.consume("acme", request_id=rid, quantity=3)
                except LedgerError:
                    return  # refused or cut off while draining: not acknowledged

    threads = [threading.Thread(target=load, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    rc = srv.proc.wait(DRAIN_LIMIT_S + 10)
    took = time.monotonic() - started
    stop.set()
    for t in threads:
        t.join(30)
    assert rc == 0 and took < DRAIN_LIMIT_S + 5
    assert len(acked) > 0
    conn = srv.read_conn()
    try:
        journaled = {e[3]: e[4] for e in consume_entries(conn)}
        offsets = conn.execute("SELECT sum(units) FROM offsets_daily").fetchone()[0]
    finally:
        conn.close()
    for rid, reply in acked.items():
        assert journaled[rid]["alloc"] == [[a.plan_id, a.units]
                                                      for a in reply.allocations]
    assert offsets == 3 * len(journaled)  # nothing half-done: every entry fully applied


def test_sigterm_at_64_in_flight_answers_unavailable_never_cancelled(tmp_path, db):
    """Issue 9: a call that arrives while a node drains, or that the drain cuts off, gets
    UNAVAILABLE (retry elsewhere, nothing applied), never CANCELLED; every OK is in the
    journal once."""
    srv = ServerProcess(tmp_path, extra=["--grace-s", str(DRAIN_LIMIT_S)], db=db).start()
    with srv.client() as c:
        c.set_time(T0)
        make_account(c, cash_micros=100_000_000)
    codes: Counter[str] = Counter()
    acked: set[str] = set()

    async def run() -> None:
        async with AsyncLedgerClient(srv.target, timeout_s=10, retries=0) as c:
            async def worker(w: int) -> None:
                for i in range(DRAIN_LOAD_PER_WORKER_MAX):
                    try:
                        await c.consume("acme", request_id=f"d{w}-{i}")
                    except LedgerError as exc:
                        codes[exc.code.name] += 1
                        return
                    acked.add(f"d{w}-{i}")
                    codes["OK"] += 1
            tasks = [asyncio.create_task(worker(w)) for w in range(64)]
            await asyncio.sleep(1.0)
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*tasks), DRAIN_LIMIT_S + 10)

    asyncio.run(run())
    assert srv.proc.wait(DRAIN_LIMIT_S + 10) == 0
    srv.log.close()
    assert codes["OK"] > 0 and codes["UNAVAILABLE"] == 64, codes
    assert set(codes) == {"OK", "UNAVAILABLE"}, codes
    conn = srv.read_conn()
    try:
        journaled = Counter(e[3] for e in consume_entries(conn))
    finally:
        conn.close()
    assert all(journaled[rid] == 1 for rid in acked)
    assert sum(journaled.values()) >= len(acked)


def test_metrics_accounts_by_status_settlements_and_top_accounts(tmp_path, db):
    """Accounts by status, settlement runs and (opt-in) the top-N units remaining."""
    srv = ServerProcess(tmp_path, extra=["--metrics-top-accounts", "1"], db=db).start()
    try:
        with srv.client() as c:
            c.set_time(T0)
            make_account(c, cash_micros=100_000_000)
            make_account(c, "poor")
            c.purchase_plan("acme", "month-100k")
            c.consume("acme", quantity=100)
            c.consume("poor", quantity=10)  # unpaid at settlement: overdue
            c.advance_time(86_400)
        m = _scrape(srv.metrics_port)
        status = {s.labels["status"]: s.value for s in m["ledger_accounts"]}
        assert status == {"active": 1, "overdue": 1, "suspended": 0}
        settled = {s.name: s.value for s in m["ledger_settlements"]}
        assert settled["ledger_settlements_total"] == 1
        durations = {s.name: s.value for s in m["ledger_settlement_duration_seconds"]}
        assert durations["ledger_settlement_duration_seconds_count"] == 1
        top = [(s.labels["account_id"], s.value) for s in m["ledger_account_units_remaining"]]
        assert top == [("acme", 99_900)]
    finally:
        srv.stop()


@pytest.mark.sqlite_only  # several nodes share a PostgreSQL database: tests/test_postgres_nodes.py
def test_second_server_on_the_same_database_refuses_to_start(server):
    """One writer per database: a second `serve` on the same file exits 2 and says why."""
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--listen", "127.0.0.1:0", "--db",
         str(server.db)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "in use by another quota-ledger server" in done.stderr
    assert str(server.proc.pid) in done.stderr


def test_default_serve_listens_on_50051_with_data_dir(tmp_path):
    """`quota-ledger serve` with no flags: 127.0.0.1:50051, SQLite under ./data/."""
    import socket
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 50051)) == 0:
            pytest.skip("something already listens on 127.0.0.1:50051 on this machine")
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve"], cwd=tmp_path,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with LedgerClient("127.0.0.1:50051", timeout_s=2, retries=0) as c:
                    assert len(c.list_plan_specs().specs) > 0
                break
            except LedgerError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert (tmp_path / "data" / "ledger.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_full_queue_fails_fast_with_resource_exhausted(tmp_path, db):
    """A bounded writer queue: past it, calls get RESOURCE_EXHAUSTED at once, none is lost."""
    srv = ServerProcess(tmp_path, extra=["--queue-depth-max", "1"], db=db).start()
    try:
        with srv.client() as c:
            c.set_time(T0)
            make_account(c)
        import asyncio

        from clients.client import AsyncLedgerClient

        async def burst() -> list:
            async with AsyncLedgerClient(srv.target, retries=0, batching=False) as ac:
                return await asyncio.gather(
                    *(ac.consume("acme", request_id=f"q{i}") for i in range(300)),
                    return_exceptions=True)

        outcomes = asyncio.run(burst())
        refused = [o for o in outcomes if isinstance(o, LedgerError)]
        accepted = [o for o in outcomes if not isinstance(o, BaseException)]
        assert refused and all(o.code.name == "RESOURCE_EXHAUSTED" for o in refused)
        assert {o.reason for o in refused} == {"QUEUE_FULL"}
        assert accepted and len(accepted) + len(refused) == 300
        assert srv.journal_count() == 1 + len(accepted)  # the account, then one per accepted
    finally:
        srv.stop()


@pytest.mark.parametrize("db", ["sqlite:///x.db", "file:/tmp/x.db", "mysql://u@h/d",
                                "postgresql:/ledger"])
@pytest.mark.parametrize("verb", ["serve", "verify"])
def test_a_url_given_as_db_is_refused_and_creates_nothing(tmp_path, db, verb):
    """TRAPS: sqlite3 would create a file named after a URL; a scheme the server does not
    know, or a PostgreSQL URL missing its //, is refused instead."""
    out = subprocess.run([sys.executable, "-m", "server", verb, "--db", db], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "--db" in out.stderr and ("file path" in out.stderr or "postgresql://" in out.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", ["serve", "verify"])
def test_an_unreachable_postgresql_url_fails_in_one_clear_line_and_creates_nothing(
        tmp_path, verb):
    """Issue 11: --db postgresql://... is PostgreSQL, never a file; when nothing answers
    there, the command says so (password masked), with no traceback."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = f"postgresql://ledger:s3cret@127.0.0.1:{port}/ledger"
    out = subprocess.run([sys.executable, "-m", "server", verb, "--db", db], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode in (1, 2), out.stderr
    assert "cannot connect" in out.stderr and "Traceback" not in out.stderr
    assert "s3cret" not in out.stderr + out.stdout and "ledger:***@" in out.stderr
    assert list(tmp_path.iterdir()) == []
