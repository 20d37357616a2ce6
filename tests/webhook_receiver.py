"""A webhook receiver on 127.0.0.1 for the notice tests (issue 22): records every POST,
answers a status the test sets (503 while "down"), and can hold each POST a while to show
whether two deliveries of one notice ever overlap."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from server.webhook import SIGNATURE_HEADER, verify

WAIT_S = 20.0  # the longest a test waits for deliveries to arrive


class Receiver:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.status = 200
        self.hold_s = 0.0
        self.posts: list[dict[str, Any]] = []  # every POST, acknowledged or not
        self.in_flight: dict[str, int] = {}
        self.overlaps: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                nid = json.loads(body)["id"]
                with receiver._lock:
                    receiver.in_flight[nid] = receiver.in_flight.get(nid, 0) + 1
                    if receiver.in_flight[nid] > 1:
                        receiver.overlaps.append(nid)
                try:
                    if receiver.hold_s:
                        time.sleep(receiver.hold_s)
                    status = receiver.status
                    with receiver._lock:
                        receiver.posts.append({
                            "status": status, "body": body,
                            "header_id": self.headers.get("Quota-Ledger-Notice-Id"),
                            "signed": verify(receiver.secret,
                                             self.headers.get(SIGNATURE_HEADER, ""), body,
                                             int(time.time()))})
                    self.send_response(status)
                    self.end_headers()
                finally:
                    with receiver._lock:
                        receiver.in_flight[nid] -= 1

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def acknowledged(self) -> dict[str, dict]:
        """Notices acknowledged (2xx), by id: the payload of each."""
        with self._lock:
            return {json.loads(p["body"])["id"]: json.loads(p["body"])
                    for p in self.posts if p["status"] == 200}

    def wait_for(self, ids: set[str], timeout_s: float = WAIT_S) -> dict[str, dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.acknowledged()
            if ids <= set(got):
                return got
            time.sleep(0.1)
        return self.acknowledged()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def notices_file(path: Any, url: str, secret: str, **thresholds: int) -> str:
    lines = ["[delivery]", "retry_first_s = 0.2"]
    if thresholds:
        lines.append("[thresholds]")
        lines += [f"{k} = {v}" for k, v in thresholds.items()]
    lines += ["[[webhook]]", 'name = "test"', f'url = "{url}"', f'secret = "{secret}"']
    path.write_text("\n".join(lines) + "\n")
    return str(path)
