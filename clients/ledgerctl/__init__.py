"""ledgerctl: the command-line client of quota-ledger, over gRPC.

``app`` holds the group (``main``), its global options and :class:`CliState`; ``output`` and
``params`` the shared output helpers and parameter types; each other module one group of
verbs, registered on ``main`` when imported here.
"""

from __future__ import annotations

from clients.extras import run_guarded
from clients.ledgerctl import (  # noqa: F401  (each registers its verbs on main)
    accounts,
    clock,
    consumption,
    notices,
    plans,
    runway,
    settlement,
    spool,
)
from clients.ledgerctl.app import CONTEXT_SETTINGS, CliState, fail, main
from clients.loadgen import loadtest

main.add_command(loadtest)


def run() -> None:
    """The ``ledgerctl`` console script: a verb that needs an extra not installed (``loadtest``
    needs ``[loadgen]``) ends with one line naming it (issue 17)."""
    run_guarded("ledgerctl", lambda: main)


__all__ = ["CONTEXT_SETTINGS", "CliState", "fail", "main", "run"]
