"""The servers `make bench` and its siblings start as subprocesses: the ledger, the no-op
server (``tests/baseline_server.py``) and scripts such as the floors of issue 18
(``tests/floor_unary.py``), each on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from .pg_cluster import free_port

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
FLOOR_SCRIPT = Path(__file__).with_name("floor_unary.py")  # issue 18's lone-call floors


class Proc:
    """A server subprocess that writes its ports to a JSON file once serving."""

    def __init__(self, name: str, cmd: list[str], port_file: Path, log: Path) -> None:
        self.name, self.cmd, self.port_file, self.log_path = name, cmd, port_file, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "started"
        return self.proc.pid

    def start(self) -> Proc:
        env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self.log, stderr=self.log,
                                     env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        self.port = json.loads(self.port_file.read_text())["grpc"]
        self.ready()
        return self

    def ready(self) -> None:
        """Block until the server answers (a subclass may check more)."""
        with grpc.insecure_channel(self.target) as ch:
            grpc.channel_ready_future(ch).result(timeout=START_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self.log.close()
            self.proc = None


def ledger_and_noop(tmp: Path, front_cpus: str | None = None) -> tuple[Proc, Proc]:
    """The ledger (``quota-ledger serve``, its SQLite default in ``tmp/ledger.db``) and the
    no-op server, not yet started. ``front_cpus``: both fronts on those CPUs (the ledger's
    ``--front-cpus``; the no-op, which has no writer, whole)."""
    py = sys.executable
    placed = ["--front-cpus", front_cpus] if front_cpus else []
    ledger = Proc("ledger", [py, "-m", "server", "serve", "--listen", "127.0.0.1:0",
                             "--db", str(tmp / "ledger.db"), "--port-file",
                             str(tmp / "ledger.json"), "--log-level", "warning", *placed],
                  tmp / "ledger.json", tmp / "ledger.log")
    baseline = Proc("baseline", [py, "-m", "tests.baseline_server", "--listen",
                                 "127.0.0.1:0", "--port-file", str(tmp / "baseline.json"),
                                 *(["--cpus", front_cpus] if front_cpus else [])],
                    tmp / "baseline.json", tmp / "baseline.log")
    return ledger, baseline


class ScriptServer(Proc):
    """``SCRIPT PORT ARGS...``, run from the project root (the research folder's
    ``unary_modes.py`` loads ``protos/`` from there; the floors find it themselves). It
    writes no port file: the port is chosen here and written for :meth:`Proc.start`, which
    then waits until the server answers."""

    def __init__(self, name: str, script: Path, args: list[str], tmp: Path) -> None:
        port = free_port()
        slug = name.replace(" ", "-")
        super().__init__(name, [sys.executable, str(script), str(port), *args],
                         tmp / f"{slug}.json", tmp / f"{slug}.log")
        self._chosen = port

    def start(self) -> Proc:
        self.port_file.write_text(json.dumps({"grpc": self._chosen}))
        return super().start()


def bare_floor(tmp: Path, front_cpus: str | None = None) -> ScriptServer:
    """Issue 18's floor under a lone call (``tests/floor_unary.py bare``): the no-op server
    with the one-row commit inside its handler, not yet started; with ``front_cpus``, whole
    on those CPUs, as the no-op is."""
    floor = ScriptServer("floor bare", FLOOR_SCRIPT, [str(tmp), "bare"], tmp)
    if front_cpus:
        floor.cmd = ["taskset", "-c", front_cpus, *floor.cmd]
    return floor
