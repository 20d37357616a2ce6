"""A ledger with three days of history and the console in front of it, for the console's
tests and for the screenshot in docs/ (``python -m tests.console_scenario --screenshot F``).

The history (the test clock starts at T0 = 2027-03-10 18:00 UTC+8):
- 2027-03-10: acme buys a 1k plan (vouchers), uses it up in both regions, then goes
  pay-as-you-go in both regions; 5 scenarios and custom policy. bolt has 1 USD and fees of
  8 USD a day: its bill leaves an amount outstanding, so it is overdue. Settled.
- 2027-03-11: acme buys a year plan and a second month plan; usage spans both plans;
  features cut back. Settled.
- 2027-03-12 (today, not settled): the year plan runs out, some pay-as-you-go in both
  regions, then a new year plan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from clients.client import LedgerClient

from .conftest import ROOT, START_TIMEOUT_S, T0, ServerProcess, command_is_ours

CATALOG = """
[[spec]]
spec_id = "month-1k"
units = 1000
validity = "one_month"
price_micros = 500000

[[spec]]
spec_id = "year-5k"
units = 5000
validity = "one_year"
price_micros = 2000000
"""
DAYS = ("2027-03-10", "2027-03-11", "2027-03-12")
DAY_S = 86_400
HOSTILE_ID = "<i>x</i>&\"'"  # a valid account id (printable ASCII, no space) full of markup
BROWSER = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


def start_ledger(tmp: Path, extra: list[str] | None = None, db: str | None = None
                 ) -> ServerProcess:
    catalog = tmp / "catalog.toml"
    catalog.write_text(CATALOG)
    return ServerProcess(tmp, extra=["--catalog", str(catalog), *(extra or [])],
                         db=db).start()


def seed_history(c: LedgerClient) -> None:
    """Three billing days of activity (see the module docstring)."""
    c.set_time(T0)
    c.create_account("acme", "Acme Inc.")
    c.top_up("acme", 20_000_000, "cash")
    c.top_up("acme", 3_000_000, "voucher")
    c.create_account("bolt", "Bolt Ltd.")
    c.top_up("bolt", 1_000_000, "cash")
    c.create_account("other", "")
    c.create_account(HOSTILE_ID, "<script>alert(1)</script>")
    # day 1
    c.purchase_plan("acme", "month-1k")
    c.update_features("acme", ["login", "signup", "pay", "vip", "checkout"], True)
    c.consume("acme", region="mainland", quantity=600)
    c.consume("acme", region="outside", quantity=300)
    c.consume("acme", region="mainland", quantity=250)  # 100 from the plan, 150 pay-as-you-go
    c.consume("acme", region="outside", quantity=7)
    c.update_features("bolt", ["a", "b", "c", "d", "e", "f"], True)  # 3 + 5 USD a day
    c.consume("bolt", region="outside", quantity=20)
    c.advance_time(DAY_S)
    # day 2
    c.purchase_plan("acme", "year-5k")
    c.purchase_plan("acme", "month-1k")
    c.consume("acme", region="mainland", quantity=5_900)  # the month plan first, then the year
    c.consume("acme", region="outside", quantity=33)
    c.consume("acme", region="mainland", captcha_type="invisible", architecture="v3", step="4.1",
              quantity=5)
    c.update_features("acme", ["login"], False)
    c.advance_time(DAY_S)
    # day 3 (today): the year plan runs out (62 units left), then a new one
    c.consume("acme", region="mainland", quantity=70)  # 62 from the plan, 8 pay-as-you-go
    c.consume("acme", region="outside", quantity=2, captcha_type="puzzle")
    c.purchase_plan("acme", "year-5k")
    c.consume("acme", region="outside", quantity=40)


@dataclass
class ConsoleProcess:
    """`quota-ledger console` in a subprocess on a free loopback port."""

    tmp: Path
    target: str
    extra: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=lambda: [sys.executable, "-m", "server"])
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ConsoleProcess:
        port_file = self.tmp / f"console-{id(self)}.json"
        cmd = [*self.command, "console", "--listen", "127.0.0.1:0",
               "--target", self.target, "--port-file", str(port_file),
               "--log-level", "warning", *self.extra]
        self.log_path = self.tmp / f"console-{id(self)}.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if k != "LEDGER_TOKEN"}  # only --token
        cwd = ROOT if command_is_ours(self.command) else self.tmp
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self.log, stderr=self.log, env=env)
        try:
            return self._wait_ready(port_file)
        except BaseException:
            self.stop()  # never leave a half-started console behind
            raise

    def _wait_ready(self, port_file: Path) -> ConsoleProcess:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"console exited: {self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError("console did not start")
            if port_file.exists():
                self.port = json.loads(port_file.read_text())["http"]
                try:
                    if get(self.url + "/healthz")[0] == 200:
                        return self
                except OSError:
                    pass
            time.sleep(0.05)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


def get(url: str, method: str = "GET", headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], str]:
    """Status, headers and body; an HTTP error status is an answer, not an exception."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:  # noqa: S310 (loopback only)
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def launch_browser(playwright):  # noqa: ANN001, ANN201
    """Debian's chromium, never a downloaded one (TRAPS: browsers in tests)."""
    return playwright.chromium.launch(executable_path=str(BROWSER), args=BROWSER_ARGS)


def screenshot(out: Path) -> None:
    """Seed a scratch ledger, open acme's account page, save a full-page PNG."""
    import tempfile

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with ExitStack() as stack:
            ledger = start_ledger(tmp)
            stack.callback(ledger.stop)
            with ledger.client() as c:
                seed_history(c)
            console = ConsoleProcess(tmp, ledger.target).start()
            stack.callback(console.stop)
            with sync_playwright() as p:
                browser = launch_browser(p)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(console.url + "/accounts/acme")
                page.screenshot(path=str(out), full_page=True)
                browser.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--screenshot":
        sys.exit("usage: python -m tests.console_scenario --screenshot FILE.png")
    screenshot(Path(sys.argv[2]))
