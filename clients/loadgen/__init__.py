"""`loadtest`: a load generator for quota-ledger's hot path (Consume, ConsumeBatch, ConsumeStream).

Run it against a deployment you own: unless ``--dry-run`` is given, every acknowledged request
is a real, billable journal entry on the accounts it uses (``--account-prefix``, default
``load-``).

What it measures
    Every request's latency goes into an HdrHistogram (microseconds, 1 us .. 60 s, 3
    significant digits); a batch item's latency is its call's. Every request ends in exactly
    one outcome: acknowledged (a ``ConsumeResponse``, billable or not, replayed or not) or an
    error counted under its gRPC status code name. A request whose outcome is unknown (the
    deadline passed, the stream broke) counts as an error with that code, so at the end
    ``sent == acknowledged + sum(errors)``. Per second of the run it keeps throughput and p99
    for ``--plot``.

Closed or open loop (mutually exclusive)
    ``--concurrency N`` (closed loop, the default with N=16): N requests in flight; the next is
    sent when one is answered. For ``unary`` that is N calls, for ``batch`` N calls of
    ``--batch-size`` requests each, for ``stream`` N messages in flight over ``--streams``
    streams. Throughput is whatever the server allows.
    ``--rate R`` (open loop): R requests per second are scheduled at fixed intervals whatever
    the answers (``batch``: R/batch-size calls per second; ``stream``: messages spread over the
    streams). Latency counts from the *scheduled* send time, so a stalled server shows up in
    the percentiles instead of slowing the generator down (no coordinated omission). At most
    ``--max-in-flight`` calls (stream: messages) are outstanding; beyond that the schedule
    waits, and that wait is in the latencies too.

Always bounded
    It stops sending at ``--requests`` (default 10,000) or ``--duration`` (default 30 s),
    whichever comes first, then waits for what is in flight, each call at most ``--timeout``.

The parts: ``config`` (:class:`LoadConfig`, limits and defaults), ``skew`` (how traffic
spreads over accounts), ``wire`` (request bytes), ``recorder`` (the pure accounting, no I/O:
:class:`Recorder`, :class:`LoadResult`), ``accounts`` (setup before a run), ``shapes`` (the
asyncio driver, :func:`run_load`, that ``tests/bench.py`` calls), ``report`` and ``plot``
(the summary table and the PNG), ``command`` (``ledgerctl loadtest``).
"""


from clients.loadgen.accounts import prepare_accounts
from clients.loadgen.command import loadtest
from clients.loadgen.config import LoadConfig, LoadgenError
from clients.loadgen.plot import matplotlib_available, write_plot
from clients.loadgen.recorder import LoadResult, Recorder
from clients.loadgen.shapes import run_load
from clients.loadgen.skew import AccountPicker, Skew, parse_skew
from clients.loadgen.wire import RequestFactory

__all__ = ["AccountPicker", "LoadConfig", "LoadResult", "LoadgenError", "Recorder",
           "RequestFactory", "Skew", "loadtest", "matplotlib_available", "parse_skew",
           "prepare_accounts", "run_load", "write_plot"]
