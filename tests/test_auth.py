"""Authentication, roles, account limits and TLS (issue: trust)."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
import trustme

from clients.client import LedgerClient, LedgerError
from server.auth import create_token

from .conftest import ROOT, T0, ServerProcess

# One call per service method a role might be refused, with the role(s) that may make it.
CALLS = [
    ("consume", lambda c: c.consume("acme"), {"consumer", "admin"}),
    ("consume_batch", lambda c: c.consume_batch([c.consume_request("acme")]),
     {"consumer", "admin"}),
    ("get_remaining", lambda c: c.get_remaining("acme"), {"reader", "admin"}),
    ("list_plans", lambda c: c.list_plans("acme"), {"reader", "admin"}),
    ("get_usage", lambda c: c.get_usage("acme", "2027-03-10", "2027-03-10"),
     {"reader", "admin"}),
    ("get_account", lambda c: c.get_account("acme"), {"reader", "admin"}),
    ("list_plan_specs", lambda c: c.list_plan_specs(), {"reader", "admin"}),
    ("list_bills", lambda c: c.list_bills("acme", "2027-03-01", "2027-03-10"),
     {"reader", "admin"}),
    ("top_up", lambda c: c.top_up("acme", 1_000_000), {"admin"}),
    ("update_features", lambda c: c.update_features("acme", [], False), {"admin"}),
    ("purchase_plan", lambda c: c.purchase_plan("acme", "month-100k"), {"admin"}),
    ("settle_day", lambda c: c.settle_day("2027-03-01"), {"admin"}),
    ("get_time", lambda c: c.get_time(), {"reader", "admin"}),
    ("advance_time", lambda c: c.advance_time(0), {"admin"}),
]


@pytest.fixture(scope="module")
def secured(tmp_path_factory, module_db):
    """A server with tokens for each role, one reader limited to account 'acme'."""
    tmp = tmp_path_factory.mktemp("auth")
    tokens_file = str(tmp / "tokens.toml")
    tokens = {role: create_token(tokens_file, f"{role}-1", role, [])
              for role in ("consumer", "reader", "admin")}
    tokens["reader-acme"] = create_token(tokens_file, "reader-acme", "reader", ["acme"])
    srv = ServerProcess(tmp, extra=["--tokens", tokens_file], db=module_db).start()
    with LedgerClient(srv.target, token=tokens["admin"]) as admin:
        admin.set_time(T0)
        for acct in ("acme", "other"):
            admin.create_account(acct)
            admin.top_up(acct, 500_000_000)
    yield srv, tokens
    srv.stop()


@pytest.mark.parametrize("role", ["consumer", "reader", "admin"])
@pytest.mark.parametrize(("name", "call", "allowed"), CALLS, ids=[c[0] for c in CALLS])
def test_every_role_allowed_and_denied(secured, role, name, call, allowed):
    """Each role may make exactly the calls its role grants; others are PERMISSION_DENIED."""
    srv, tokens = secured
    with LedgerClient(srv.target, token=tokens[role], retries=0) as c:
        if role in allowed:
            call(c)
        else:
            with pytest.raises(LedgerError) as info:
                call(c)
            assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert info.value.reason == "ROLE_DENIED"


def test_no_or_unknown_token_is_unauthenticated(secured):
    """No token, or a token the server does not know, is UNAUTHENTICATED."""
    srv, _ = secured
    for token in (None, "qlt_not-a-real-token"):
        with LedgerClient(srv.target, token=token, retries=0) as c:
            with pytest.raises(LedgerError) as info:
                c.get_account("acme")
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_reader_limited_to_account_a_cannot_read_b(secured):
    """A token limited to 'acme' reads acme and is refused 'other' and all-account calls."""
    srv, tokens = secured
    with LedgerClient(srv.target, token=tokens["reader-acme"], retries=0) as c:
        assert c.get_account("acme").account_id == "acme"
        for call in (lambda: c.get_account("other"), lambda: c.get_remaining("other")):
            with pytest.raises(LedgerError) as info:
                call()
            assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert info.value.reason == "ACCOUNT_DENIED"


def test_tokens_never_appear_in_logs(secured):
    """The server log holds no token, even after refused and accepted calls."""
    srv, tokens = secured
    log = (srv.tmp / "server.log").read_text()
    assert all(t not in log for t in tokens.values())


def test_health_needs_no_token(secured):
    """Probes work without credentials."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    srv, _ = secured
    with grpc.insecure_channel(srv.target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_non_loopback_without_auth_refuses_to_start(tmp_path):
    """Listening beyond loopback without authentication needs an explicit --insecure."""
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--listen", "0.0.0.0:0", "--db",
         str(tmp_path / "l.db")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "without authentication" in done.stderr


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("client@example.test")
    other_ca = trustme.CA()
    rogue = other_ca.issue_cert("rogue@example.test")
    files = {}
    for name, blob in {
        "ca": ca.cert_pem.bytes(), "server_cert": server_cert.cert_chain_pems[0].bytes(),
        "server_key": server_cert.private_key_pem.bytes(),
        "client_cert": client_cert.cert_chain_pems[0].bytes(),
        "client_key": client_cert.private_key_pem.bytes(),
        "rogue_cert": rogue.cert_chain_pems[0].bytes(),
        "rogue_key": rogue.private_key_pem.bytes(),
        "other_ca": other_ca.cert_pem.bytes(),
    }.items():
        path = tmp / f"{name}.pem"
        path.write_bytes(blob)
        files[name] = str(path)
    return files


def test_mutual_tls_accepts_good_and_refuses_plaintext_and_bad_certs(tmp_path, tls_material):
    """mTLS: a CA-signed client gets in; plaintext, no client cert or a rogue cert do not."""
    f = tls_material
    srv = ServerProcess(tmp_path, extra=["--tls-cert", f["server_cert"], "--tls-key",
                                         f["server_key"], "--tls-client-ca", f["ca"]])
    srv.start = _start_tls(srv, f)  # type: ignore[method-assign]
    srv.start()
    try:
        with LedgerClient(srv.target, tls_ca=f["ca"], tls_cert=f["client_cert"],
                          tls_key=f["client_key"], retries=0) as good:
            assert len(good.list_plan_specs().specs) > 0
        bad_clients = [
            dict(),  # plaintext
            dict(tls_ca=f["ca"]),  # TLS without a client certificate
            dict(tls_ca=f["ca"], tls_cert=f["rogue_cert"], tls_key=f["rogue_key"]),
            dict(tls_ca=f["other_ca"], tls_cert=f["client_cert"], tls_key=f["client_key"]),
        ]
        for kwargs in bad_clients:
            with LedgerClient(srv.target, timeout_s=3, retries=0, **kwargs) as bad:
                with pytest.raises(LedgerError) as info:
                    bad.list_plan_specs()
                assert info.value.code == grpc.StatusCode.UNAVAILABLE, kwargs
    finally:
        srv.stop()


def _start_tls(srv: ServerProcess, f: dict[str, str]):
    """ServerProcess.start checks health in plaintext; over TLS, check with the client."""
    import json
    import time

    def start() -> ServerProcess:
        port_file = srv.tmp / "ports.json"
        cmd = [sys.executable, "-m", "server", "serve", "--listen", "127.0.0.1:0", "--db",
               str(srv.db), "--port-file", str(port_file), "--test-clock", *srv.extra]
        srv.log = open(srv.tmp / "server.log", "ab")  # noqa: SIM115
        srv.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=srv.log, stderr=srv.log)
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert srv.proc.poll() is None, (srv.tmp / "server.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        srv.port = json.loads(port_file.read_text())["grpc"]
        return srv

    return start
