"""The throwaway PostgreSQL cluster of tests/pg_cluster.py and its fixtures work for real.

Every test name holds "postgres" so that `make test-postgres` (-k postgres) selects it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from tests.pg_cluster import PgCluster, find_bindir


def test_postgres_bindir_has_server_binaries(pg_cluster: PgCluster) -> None:
    bindir = find_bindir()
    assert bindir is not None
    assert all((bindir / name).exists() for name in ("initdb", "pg_ctl", "postgres"))


def test_postgres_roundtrip(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE t (id bigint PRIMARY KEY, name text NOT NULL)")
        conn.cursor().executemany("INSERT INTO t VALUES (%s, %s)", [(1, "a"), (2, "b")])
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT id, name FROM t ORDER BY id").fetchall()
        listen = conn.execute("SHOW listen_addresses").fetchone()
        sync = conn.execute("SHOW synchronous_commit").fetchone()
    assert rows == [(1, "a"), (2, "b")]
    assert listen == ("127.0.0.1",)
    assert sync == ("on",)


def test_postgres_url_is_loopback_and_fresh(pg_cluster: PgCluster, pg_url: str) -> None:
    assert pg_url.startswith(f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/t_")
    with psycopg.connect(pg_url) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchone() == (0,)


def test_postgres_databases_are_isolated(pg_cluster: PgCluster, pg_url: str) -> None:
    other = pg_cluster.create_database("t_isolation_other")
    try:
        with psycopg.connect(pg_url) as conn:
            conn.execute("CREATE TABLE only_here (x int)")
            conn.execute("INSERT INTO only_here VALUES (1)")
        with psycopg.connect(other) as conn:
            with pytest.raises(psycopg.errors.UndefinedTable):
                conn.execute("SELECT x FROM only_here")
    finally:
        pg_cluster.drop_database("t_isolation_other")
    with psycopg.connect(pg_cluster.url("postgres")) as conn:
        gone = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s",
                            ("t_isolation_other",))
        assert gone.fetchone() == (0,)


def test_postgres_drop_database_closes_open_sessions(pg_cluster: PgCluster) -> None:
    url = pg_cluster.create_database("t_drop_busy")
    conn = psycopg.connect(url)
    try:
        pg_cluster.drop_database("t_drop_busy")  # WITH (FORCE): no "being accessed" error
    finally:
        conn.close()


def test_postgres_rejects_odd_database_names(pg_cluster: PgCluster) -> None:
    with pytest.raises(ValueError):
        pg_cluster.create_database('x"; DROP DATABASE postgres; --')


def test_postgres_immediate_restart_keeps_committed_data(pg_cluster: PgCluster,
                                                         pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE journal (id bigint PRIMARY KEY)")
        conn.cursor().executemany("INSERT INTO journal VALUES (%s)",
                                  [(i,) for i in range(1000)])
    # An open, uncommitted transaction at the crash must vanish.
    doomed = psycopg.connect(pg_url)
    doomed.execute("INSERT INTO journal VALUES (-1)")
    port = pg_cluster.port
    pg_cluster.restart(mode="immediate")  # no shutdown checkpoint: WAL replay on start
    with pytest.raises(psycopg.OperationalError):
        doomed.execute("SELECT 1")
    doomed.close()
    assert pg_cluster.port == port
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*), min(id), max(id) FROM journal").fetchone() == (
            1000, 0, 999)
        conn.execute("INSERT INTO journal VALUES (1000)")  # and it accepts writes again


def test_postgres_cluster_kept_between_starts(pg_cluster: PgCluster) -> None:
    """stop(remove=False) keeps the data, start() again reuses it (python -m tests.pg_cluster).

    Needs `pg_cluster` only to be skipped with it when there are no binaries.
    """
    base = Path(tempfile.mkdtemp(prefix="quota-ledger-pg-own-"))  # 0700, like pytest's
    base.chmod(0o755)  # the server's user must reach base/pg
    cluster = PgCluster(base / "pg")
    try:
        cluster.start()
        url = cluster.create_database("kept")
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE k AS SELECT 42 AS v")
        cluster.stop(remove=False)
        assert not cluster.running() and (cluster.data_dir / "PG_VERSION").exists()
        cluster.start()
        with psycopg.connect(cluster.url("kept")) as conn:  # maybe on another port now
            assert conn.execute("SELECT v FROM k").fetchone() == (42,)
    finally:
        cluster.stop()
        base.rmdir()
    assert not base.exists()


def test_postgres_unreachable_dir_is_a_clear_error(pg_cluster: PgCluster) -> None:
    """As root, a 0700 root-owned parent stops start() with a message, not an initdb error."""
    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another user")
    base = Path(tempfile.mkdtemp(prefix="quota-ledger-pg-closed-"))  # 0700, owned by root
    try:
        with pytest.raises(RuntimeError, match="cannot write"):
            PgCluster(base / "pg").start()
    finally:
        shutil.rmtree(base)
