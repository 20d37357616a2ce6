"""The artefact users get (issue 17): the sdist and wheel built from this tree, installed into
fresh virtual environments outside the source tree, with no editable install.

- the whole wheel (``[all]``) serves, answers health over gRPC, takes a Consume that
  ``ledgerctl`` reads back, renders a console page, and passes ``quota-ledger verify``;
- the client alone (no extra) consumes against that server and brings no server dependency;
  ``quota-ledger serve`` there names the extra to install in one line.

Installs go through pip with constraints.txt (the exact pins), from pip's cache when warm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import ROOT, ServerProcess
from .console_scenario import ConsoleProcess, get

BUILD_TIMEOUT_S = 300
INSTALL_TIMEOUT_S = 600
RUN_TIMEOUT_S = 60
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@dataclass
class Env:
    """A fresh virtual environment, used from a directory outside the source tree."""

    path: Path
    cwd: Path

    def bin(self, name: str) -> str:
        return str(self.path / "bin" / name)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "VIRTUAL_ENV", "LEDGER_TARGET", "LEDGER_TOKEN")}
        done = subprocess.run(list(args), cwd=self.cwd, env=env, capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT_S)
        if check and done.returncode != 0:
            raise AssertionError(f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def installed(self) -> dict[str, str]:
        out = self.run(self.bin("python"), "-m", "pip", "list", "--format=json",
                       "--disable-pip-version-check").stdout
        return {canonicalize_name(d["name"]): d["version"] for d in json.loads(out)}


def _fresh_env(root: Path, name: str, wheel: Path, extras: str) -> Env:
    path, cwd = root / name, root / f"{name}-cwd"
    cwd.mkdir()
    venv.EnvBuilder(with_pip=True).create(path)
    env = Env(path, cwd)
    env.run(env.bin("python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "-c", str(ROOT / "constraints.txt"), f"{wheel}{extras}")
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`python -m build`: the sdist, then the wheel built from that sdist (so the sdist must
    hold everything the wheel needs)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


@pytest.fixture(scope="module")
def full(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Env:
    return _fresh_env(tmp_path_factory.mktemp("venvs"), "full", dist["wheel"], "[all]")


@pytest.fixture(scope="module")
def wheel_server(full: Env) -> Iterator[ServerProcess]:
    """The installed `quota-ledger serve`, run from outside the source tree, on SQLite."""
    proc = ServerProcess(full.cwd, command=[full.bin("quota-ledger")],
                         extra=["--log-level", "info"])
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def test_the_wheel_ships_its_data_files(dist: dict[str, Path]):
    """Templates, static files, .proto files, stubs and monitoring files are in the wheel."""
    import zipfile

    names = set(zipfile.ZipFile(dist["wheel"]).namelist())
    for needed in ("server/console/templates/account.html", "server/console/static/console.css",
                   "quota_ledger/v1/quota_ledger.proto", "quota_ledger/v1/common_pb2.pyi",
                   "ledger/store/postgres.py", "clients/ledgerctl/app.py",
                   "server/monitoring/alerts.yml", "server/monitoring/dashboard.json"):
        assert needed in names, needed
    assert not any(n.startswith(("tests/", "protos/")) for n in names)


def test_the_installed_wheel_serves_consumes_renders_and_verifies(full: Env,
                                                                  wheel_server: ServerProcess):
    """serve (health over gRPC) -> ledgerctl consume and read back -> console page -> verify."""
    import server

    code = full.run(full.bin("python"), "-I", "-c", "import server; print(server.__file__)")
    assert str(full.path) in code.stdout and str(Path(server.__file__).parent) not in code.stdout
    with grpc.insecure_channel(wheel_server.target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING

    ctl = [full.bin("ledgerctl"), "--target", wheel_server.target]
    full.run(*ctl, "account", "create", "wheel-acme")
    full.run(*ctl, "top-up", "wheel-acme", "60")
    full.run(*ctl, "buy", "wheel-acme", "month-100k")
    full.run(*ctl, "consume", "wheel-acme", "--quantity", "3", "--request-id", "wheel-1")
    remaining = json.loads(full.run(*ctl, "--json", "remaining", "wheel-acme").stdout)
    assert int(remaining["units_remaining_total"]) == 100_000 - 3, remaining

    console = ConsoleProcess(full.cwd, wheel_server.target, command=[full.bin("quota-ledger")])
    console.start()
    try:
        status_code, _, body = get(console.url + "/accounts/wheel-acme")
    finally:
        console.stop()
    assert status_code == 200 and "wheel-acme" in body and "99,997" in body, body[:500]

    assert wheel_server.stop() == 0
    done = full.run(full.bin("quota-ledger"), "verify", "--db", str(wheel_server.db))
    assert done.stdout.startswith("ok:"), done.stdout
    wheel_server.start()  # back up for the client-only test


def _server_only_distributions() -> set[str]:
    """Every distribution an extra adds that the client's own requirements do not."""
    base = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    extra = {canonicalize_name(Requirement(r).name)
             for name, reqs in PROJECT["optional-dependencies"].items() if name != "dev"
             for r in reqs}
    return extra - base - {canonicalize_name(PROJECT["name"])}


def test_the_client_alone_installs_only_what_the_client_needs(
        dist: dict[str, Path], wheel_server: ServerProcess,
        tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]):
    """`pip install quota-ledger` (no extra): the client consumes against a server; no server
    dependency came along; `quota-ledger serve` names the extra in one line."""
    client = _fresh_env(tmp_path_factory.mktemp("venvs"), "client", dist["wheel"], "")
    installed = client.installed()
    with capsys.disabled():  # shown in make test's output, pass or fail
        print("\nclient-only install:",
              ", ".join(f"{n}=={v}" for n, v in sorted(installed.items())))
    server_only = _server_only_distributions()
    assert {"numpy", "psycopg", "starlette", "uvicorn", "jinja2", "pygal",
            "prometheus-client", "msgpack", "hdrhistogram"} <= server_only
    assert not server_only & installed.keys(), server_only & installed.keys()

    script = ("import sys; from clients.client import LedgerClient\n"
              "c = LedgerClient(sys.argv[1])\n"
              "c.create_account('client-only')\n"
              "r = c.consume('client-only', quantity=2, request_id='client-only-1')\n"
              "print(r.billable, r.payg_units, c.get_remaining('client-only').payg_units)")
    out = client.run(client.bin("python"), "-I", "-c", script, wheel_server.target).stdout
    assert out.split() == ["True", "2", "2"], out

    ctl = client.run(client.bin("ledgerctl"), "--target", wheel_server.target, "--json",
                     "remaining", "client-only")
    assert json.loads(ctl.stdout)["payg_units"] == "2", ctl.stdout

    serve = client.run(client.bin("quota-ledger"), "serve", check=False)
    lines = serve.stderr.strip().splitlines()
    assert serve.returncode == 2 and len(lines) == 1, serve.stderr
    assert "pip install 'quota-ledger[server]'" in lines[0], lines
    loadtest = client.run(client.bin("ledgerctl"), "--target", wheel_server.target, "loadtest",
                          "--requests", "1", check=False)
    assert loadtest.returncode != 0 and "quota-ledger[loadgen]" in loadtest.stderr, loadtest

