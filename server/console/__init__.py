"""The read-only web console: a client of the ledger over gRPC that renders HTML pages.

Kept light on purpose: ``quota-ledger --help`` imports ``command`` only; the web stack is
imported when the console actually starts (``app``).
"""
