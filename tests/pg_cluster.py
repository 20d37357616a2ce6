"""A throwaway PostgreSQL cluster for tests (issue 11): initdb, pg_ctl, 127.0.0.1 only.

`PgCluster(base_dir)` lays out, under ``base_dir``:

- ``data/``: the data directory (``initdb -A trust -U postgres --no-sync``);
- ``sock/``: the unix socket directory (kept out of /var/run/postgresql);
- ``postgres.log``: the server log (``pg_ctl -l``), quoted when a start fails.

The server listens on 127.0.0.1 only, on ``port`` or on a free port, with fsync and full page
writes off (a test cluster need not survive power loss) but ``synchronous_commit=on``, so a
committed transaction survives ``restart(mode="immediate")`` (crash recovery from the WAL).

initdb and pg_ctl refuse to run as root, and CI runs as root: then they run as the Debian
``postgres`` user through ``runuser``, and ``base_dir`` is chowned to that user. Its parents
must be traversable by that user (pytest's ``/tmp/pytest-of-root`` is 0700, so the conftest
fixture uses a ``mkdtemp`` directly under the system temp dir).

From the shell (``make run-postgres``): a cluster that is kept between runs::

    python -m tests.pg_cluster start --dir ./data/pg [--port 5432]   # prints the URL base
    python -m tests.pg_cluster stop --dir ./data/pg                   # keeps the data
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql

BINDIR_ENV = "QUOTA_LEDGER_PG_BINDIR"
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
OS_USER = "postgres"  # the unprivileged user that runs the server when we are root
START_TIMEOUT_S = 30.0
_DBNAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _has_server_binaries(d: Path) -> bool:
    return all(os.access(d / name, os.X_OK) for name in SERVER_BINARIES)


def find_bindir() -> Path | None:
    """The directory of initdb, pg_ctl and postgres, or None when there is none.

    Looked up in order: $QUOTA_LEDGER_PG_BINDIR (authoritative when set: a wrong value gives
    None rather than silently using another install), ``pg_config --bindir`` (which may be a
    client-only install, so it is checked too), then the newest /usr/lib/postgresql/*/bin.
    """
    if env := os.environ.get(BINDIR_ENV):
        return Path(env) if _has_server_binaries(Path(env)) else None
    candidates: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            candidates.append(Path(out))
        except (OSError, subprocess.SubprocessError):
            pass

    def major(p: str) -> tuple[int, str]:
        version = Path(p).parent.name
        return (int(version) if version.isdigit() else -1, version)

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                           key=major, reverse=True)]
    return next((c for c in candidates if _has_server_binaries(c)), None)


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the kernel picks it; another process may race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    """One postgres server on 127.0.0.1, its data, socket and log under ``base_dir``."""

    def __init__(self, base_dir: Path, port: int | None = None, *, bindir: Path | None = None,
                 durable: bool = False):
        self.base_dir = Path(base_dir).resolve()
        self.durable = durable  # fsync and full page writes on, as in production (benchmarks)
        self.data_dir = self.base_dir / "data"
        self.sock_dir = self.base_dir / "sock"
        self.log_file = self.base_dir / "postgres.log"
        self.port = port or 0  # 0 until start() picks one
        self._fixed_port = port is not None
        found = bindir or find_bindir()
        if found is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb, pg_ctl, postgres) found;"
                               f" apt-get install postgresql, or set {BINDIR_ENV}")
        self.bindir = found
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # initdb and pg_ctl refuse root
            try:
                pwd.getpwnam(OS_USER)
            except KeyError:
                raise RuntimeError(f"running as root but there is no '{OS_USER}' user to run"
                                   " PostgreSQL as (Debian's postgresql package creates it)"
                                   ) from None
            self._as_user = ["runuser", "-u", OS_USER, "--"]

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [*self._as_user, str(self.bindir / tool), *args]
        proc = subprocess.run(cmd, cwd=self.base_dir, capture_output=True, text=True,
                              timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} exited {proc.returncode}:\n{proc.stdout}"
                               f"{proc.stderr}{self._log_tail()}")
        return proc

    def _log_tail(self, lines: int = 30) -> str:
        try:
            tail = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- postgres.log ---\n" + "\n".join(tail)

    def _server_options(self) -> str:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.sock_dir),
            "fsync": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "synchronous_commit": "on",
            "max_connections": "200",
        }
        return " ".join(f"-c {shlex.quote(f'{k}={v}')}" for k, v in settings.items())

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(exist_ok=True)
        self.base_dir.chmod(0o755)
        if self._as_user:
            uid, gid = pwd.getpwnam(OS_USER)[2:4]
            for p in (self.base_dir, self.sock_dir):
                os.chown(p, uid, gid)
            if subprocess.run([*self._as_user, "test", "-w", str(self.base_dir)]).returncode:
                raise RuntimeError(f"user '{OS_USER}' cannot write {self.base_dir}: is a parent"
                                   " directory 0700, like /tmp/pytest-of-root?")

    def start(self) -> PgCluster:
        """initdb (unless the data dir already holds a cluster), start, wait until ready."""
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8", "--locale", "C")
        for attempt in range(3):  # a port picked by free_port() may be taken by then
            if not self._fixed_port:
                self.port = free_port()
            proc = self._pg_ctl("start", check=self._fixed_port or attempt == 2)
            if proc.returncode == 0:
                break
        self.wait_ready()
        return self

    def _pg_ctl(self, action: str, mode: str | None = None, check: bool = True):
        args = [action, "-D", str(self.data_dir), "-w", "-t", str(int(START_TIMEOUT_S))]
        if mode:
            args += ["-m", mode]
        if action in ("start", "restart"):
            args += ["-l", str(self.log_file), "-o", self._server_options()]
        return self._run("pg_ctl", *args, check=check)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Return once a connection over 127.0.0.1 succeeds; raise after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"PostgreSQL not ready: {e}{self._log_tail()}") from e
                time.sleep(0.1)

    def restart(self, mode: str = "immediate") -> None:
        """``pg_ctl restart -m mode``: "immediate" is a crash (no checkpoint, WAL replay)."""
        self._pg_ctl("restart", mode=mode)
        self.wait_ready()

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False).returncode == 0

    def stop(self, remove: bool = True) -> None:
        """``pg_ctl stop -m fast``, then remove ``base_dir`` unless ``remove`` is False."""
        if self.data_dir.exists() and self.running():
            self._pg_ctl("stop", mode="fast")
        if remove:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, statement: sql.Composable) -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(statement)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` (lower-case letters, digits, _); returns its URL."""
        if not _DBNAME.fullmatch(name):
            raise ValueError(f"not a plain database name: {name!r}")
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS, closing its sessions first (PostgreSQL 13+)."""
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                    .format(sql.Identifier(name)))


def _port_of_running(data_dir: Path) -> int:
    """The port a running server recorded on line 4 of postmaster.pid."""
    return int((data_dir / "postmaster.pid").read_text().splitlines()[3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.pg_cluster",
                                     description="A local PostgreSQL cluster kept in --dir.")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, required=True, help="e.g. ./data/pg")
    parser.add_argument("--port", type=int, help="default: a free port")
    parser.add_argument("--database", help="start: also create this database if missing and "
                                           "print its URL")
    args = parser.parse_args(argv)
    cluster = PgCluster(args.dir, args.port)
    if args.action == "stop":
        cluster.stop(remove=False)
        print(f"stopped the cluster in {cluster.base_dir} (its data is kept)")
        return 0
    if cluster.data_dir.exists() and cluster.running():
        cluster.port = _port_of_running(cluster.data_dir)
        print(f"already running in {cluster.base_dir}", file=sys.stderr)
    else:
        cluster.start()
    if args.database:
        with psycopg.connect(cluster.url("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (args.database,)).fetchone()
        print(cluster.url(args.database) if exists else cluster.create_database(args.database))
        return 0
    print(cluster.url(""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
