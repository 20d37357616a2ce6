"""ledgerctl notices and notices resend (issue 22) against a real server and receiver."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

from .conftest import T0, ServerProcess
from .test_ledgerctl import ok, refused, run
from .test_notices_delivery import SECRET, owe
from .webhook_receiver import WAIT_S, Receiver, notices_file


def test_list_undelivered_and_resend(tmp_path: Path) -> None:
    receiver = Receiver(SECRET)
    receiver.status = 500
    path = notices_file(tmp_path / "notices.toml", receiver.url, SECRET)
    srv = ServerProcess(tmp_path, extra=["--notices", path]).start()
    try:
        with srv.client() as c:
            owe(c)
            c.set_time(T0 + timedelta(days=1))
        out = ok(srv.target, "notices", "--account", "a1").stdout
        assert "bill_issued/a1/2027-03-10" in out and "overdue" in out and "a0" not in out
        data = json.loads(ok(srv.target, "--json", "notices", "--undelivered").stdout)
        ids = [n["notice_id"] for n in data["notices"]]
        assert len(ids) == 8 and all(d["state"] == "pending" for n in data["notices"]
                                     for d in n.get("deliveries", []))
        receiver.status = 200
        got = receiver.wait_for(set(ids))
        assert set(got) == set(ids)
        posts = len(receiver.posts)
        out = ok(srv.target, "notices", "resend", ids[0]).stdout
        assert ids[0] in out
        receiver.wait_for(set(ids))
        again = _wait_posts(receiver, posts + 1)
        assert [json.loads(p["body"])["id"] for p in again] == [ids[0]]
        refused(run(srv.target, "notices", "resend", "plan_low/nobody/plan-1"), "NOT_FOUND")
        limited = json.loads(ok(srv.target, "--json", "notices", "--limit", "3").stdout)
        assert [n["notice_id"] for n in limited["notices"]] == [
            n["notice_id"] for n in json.loads(ok(srv.target, "--json", "notices").stdout)[
                "notices"]][:3]
    finally:
        srv.stop()
        receiver.close()


def _wait_posts(receiver: Receiver, n: int) -> list[dict]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and len(receiver.posts) < n:
        time.sleep(0.05)
    time.sleep(0.3)  # and no more than that one
    return receiver.posts[n - 1:]
