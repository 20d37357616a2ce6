"""The ``quota-ledger`` console script: the command line, or one line naming the extra to
install when the server's dependencies are not there (a client-only install; issue 17)."""

from __future__ import annotations

from clients.extras import run_guarded


def main() -> None:
    def load():  # noqa: ANN202  (imported here: server.cli needs the server extra)
        from server.cli import main as cli
        return cli

    run_guarded("quota-ledger", load)
