"""``python -m clients.loadgen``: the loadtest command on its own."""

from clients.loadgen.command import loadtest

loadtest()
