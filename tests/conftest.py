"""Real servers on free loopback ports, real clients, a temporary database each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import LedgerClient, LedgerError

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
# A fixed, far-future start for the test clock: every test sets its own time from here on.
T0 = datetime(2027, 3, 10, 10, 0, tzinfo=UTC)


class ServerProcess:
    """`python -m server serve` in a subprocess, so tests can SIGKILL and restart it."""

    def __init__(self, tmp: Path, *, test_clock: bool = True, extra: list[str] | None = None,
                 db: str | None = None, command: list[str] | None = None,
                 listen_port: int = 0):
        self.tmp = tmp
        self.listen_port = listen_port  # 0: any free port, chosen anew at each start
        # how to run `quota-ledger` (the wheel test runs an installed one, outside the tree)
        self.command = command or [sys.executable, "-m", "server"]
        self.db: Path | str = db or tmp / "ledger.db"  # a path, or a postgresql:// URL
        self.test_clock = test_clock
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.metrics_port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        port_file = self.tmp / "ports.json"
        port_file.unlink(missing_ok=True)
        cmd = [*self.command, "serve", "--listen", f"127.0.0.1:{self.listen_port}",
               "--db", str(self.db), "--port-file", str(port_file),
               "--metrics-listen", "127.0.0.1:0", "--log-level", "warning", *self.extra]
        if self.test_clock:
            cmd.append("--test-clock")
        self.log = open(self.tmp / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT if command_is_ours(self.command) else self.tmp,
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {(self.tmp / 'server.log').read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            time.sleep(0.05)
        ports = json.loads(port_file.read_text())
        self.port, self.metrics_port = ports["grpc"], ports["metrics"]
        with grpc.insecure_channel(self.target) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        return self

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup; whatever was committed must survive."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self.log.close()
        return rc

    def client(self, **kwargs) -> LedgerClient:
        return LedgerClient(self.target, **kwargs)

    @property
    def backend(self) -> str:
        return "postgres" if str(self.db).startswith("postgresql://") else "sqlite"

    def read_conn(self):  # noqa: ANN201
        """A read connection to the server's database with sqlite3's face (``?``
        parameters), whichever the backend; close it after use."""
        if self.backend == "postgres":
            import psycopg

            from ledger.store.postgres import PgConn
            conn = PgConn(psycopg.connect(str(self.db), autocommit=True))
            conn.close = conn.raw.close  # type: ignore[attr-defined]
            return conn
        import sqlite3
        return sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)

    def journal_rows(self) -> int:
        """Rows of the journal table (a consume block is one row)."""
        conn = self.read_conn()
        try:
            return conn.execute("SELECT count(*) FROM journal").fetchone()[0]
        finally:
            conn.close()

    def journal_count(self) -> int:
        """Journal entries, each consume of a block (ledger/store/blocks.py) counted once."""
        from ledger.store import consume_entries
        conn = self.read_conn()
        try:
            others = conn.execute("SELECT count(*) FROM journal"
                                  " WHERE kind NOT IN ('consume', 'consume_block')").fetchone()[0]
            return others + sum(1 for _ in consume_entries(conn))
        finally:
            conn.close()


def command_is_ours(command: list[str]) -> bool:
    """The source tree's own `python -m server` (run from the tree), not an installed one."""
    return command[0] == sys.executable


BACKENDS = ("sqlite", "postgres")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked ``sqlite_only`` (about the SQLite file itself: its lock, its backup,
    its pages) runs on SQLite alone; everything else runs on both backends."""
    dropped = [i for i in items
               if i.get_closest_marker("sqlite_only") and "[postgres" in i.nodeid]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if i not in dropped]


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's ledger keeps its journal: every test that is not about one backend
    runs on both (issue 11): an SQLite file, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def server(tmp_path: Path, db: str) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path, db=db).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[LedgerClient]:
    with server.client() as c:
        c.set_time(T0)
        yield c


def end_day_and_die(srv: ServerProcess, monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """Restart ``srv`` armed to SIGKILL itself at ``point`` of the commit path
    (``ledger/faults.py``), end the day T0 so that settlement commits, and wait for it to
    die: the refused call is the proof that it did."""
    monkeypatch.setenv("QUOTA_LEDGER_FAULT", f"{point}:1.0:1")
    srv.start()
    monkeypatch.delenv("QUOTA_LEDGER_FAULT")
    with srv.client(retries=0, timeout_s=10) as c, pytest.raises(LedgerError):
        c.set_time(T0 + timedelta(days=1))  # the day ends: settlement starts, the process dies
    srv.proc.wait(10)
    srv.log.close()


def make_account(c: LedgerClient, account_id: str = "acme", cash_micros: int = 0,
                 voucher_micros: int = 0) -> None:
    c.create_account(account_id, f"{account_id} Inc.")
    if cash_micros:
        c.top_up(account_id, cash_micros, "cash")
    if voucher_micros:
        c.top_up(account_id, voucher_micros, "voucher")


os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


# -- PostgreSQL (issue 11): one throwaway cluster per session, one database per test ------
import itertools  # noqa: E402  (appended section: the top of this file is edited elsewhere)
import tempfile  # noqa: E402

from tests.pg_cluster import PgCluster, find_bindir  # noqa: E402

_pg_db_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster on 127.0.0.1 for the whole session (tests/pg_cluster.py).

    Skipped when no server binaries are found, unless QUOTA_LEDGER_REQUIRE_PG=1 (make
    test-postgres), which turns that into a failure.
    """
    if find_bindir() is None:
        msg = ("no PostgreSQL server binaries (initdb, pg_ctl, postgres):"
               " apt-get install postgresql, or set QUOTA_LEDGER_PG_BINDIR")
        if os.environ.get("QUOTA_LEDGER_REQUIRE_PG") == "1":
            pytest.fail(f"QUOTA_LEDGER_REQUIRE_PG=1 but {msg}", pytrace=False)
        pytest.skip(msg)
    # Not tmp_path_factory: /tmp/pytest-of-root is 0700, and the server runs as `postgres`.
    cluster = PgCluster(Path(tempfile.mkdtemp(prefix="quota-ledger-pg-"))).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """The URL of a fresh, empty database of its own, dropped after the test."""
    name = f"t_{next(_pg_db_counter)}_{os.getpid()}"
    url = pg_cluster.create_database(name)
    try:
        yield url
    finally:
        pg_cluster.drop_database(name)


@pytest.fixture(scope="module", params=BACKENDS)
def module_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The module-scoped ``db``: one SQLite file, or one PostgreSQL database, per module."""
    if request.param == "sqlite":
        return str(tmp_path_factory.mktemp("db") / "ledger.db")
    cluster = request.getfixturevalue("pg_cluster")
    name = f"m_{next(_pg_db_counter)}_{os.getpid()}"
    url = cluster.create_database(name)
    request.addfinalizer(lambda: cluster.drop_database(name))
    return url


LEDGER_TABLES = ("journal", "accounts", "plans", "usage_daily", "offsets_daily",
                 "features_daily", "bills", "meta", "consume_keys", "notices",
                 "notice_deliveries")


def empty_pg_ledger(url: str) -> None:
    """Make a PostgreSQL ledger database empty again, schema kept (a fresh ledger per
    hypothesis example costs a TRUNCATE, not a CREATE DATABASE). No node may be running."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('journal')").fetchone()[0] is None:
            return
        conn.execute(f"TRUNCATE {', '.join(LEDGER_TABLES)} RESTART IDENTITY")
        conn.execute("ALTER SEQUENCE purchase_order RESTART")


def start_nodes(tmp_path: Path, url: str, n: int = 2, *, test_clock: bool = True,
                env_extra: list[str] | None = None) -> list[ServerProcess]:
    nodes = []
    for i in range(n):
        d = tmp_path / f"node{i}"
        d.mkdir(exist_ok=True)
        nodes.append(ServerProcess(d, db=url, test_clock=test_clock, extra=env_extra).start())
    return nodes


@pytest.fixture
def two_nodes(tmp_path: Path, pg_url: str):
    nodes = start_nodes(tmp_path, pg_url)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()
