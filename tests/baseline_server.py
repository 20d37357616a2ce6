"""A baseline for the benchmark: the same gRPC stack as the ledger (grpcio ``grpc.aio``, the
same server options), the same ``quota_ledger.v1.QuotaLedger`` service and response messages
(ConsumeBatch in both views, FULL and COMPACT), and nothing else: no validation, no engine,
no journal, no fsync. What the ledger does beyond this is what `tests/bench.py` measures.

    python -m tests.baseline_server --listen 127.0.0.1:0 --port-file FILE

The port file gets ``{"grpc": port, "pid": pid}`` once serving; SIGTERM or Ctrl-C stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from datetime import UTC, datetime, timedelta

import click
import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from quota_ledger.v1 import common_pb2 as pb
from quota_ledger.v1 import quota_ledger_pb2 as qpb
from quota_ledger.v1 import quota_ledger_pb2_grpc as qpb_grpc

from ledger.errors import InvalidArgument
from server.cpus import confine_front

MESSAGE_BYTES_MAX = 4 * 1024 * 1024  # as server/app.py
UTC8 = timedelta(hours=8)


def _response(request: qpb.ConsumeRequest) -> qpb.ConsumeResponse:
    """A plan-covered, billable answer: one allocation, billing day and time of recording."""
    now_ns = time.time_ns()
    return qpb.ConsumeResponse(
        billable=True,
        allocations=[pb.PlanUnits(plan_id="plan-1", units=request.quantity or 1)],
        billing_day=(datetime.fromtimestamp(now_ns / 1e9, UTC) + UTC8).strftime("%Y-%m-%d"),
        recorded_at=Timestamp(seconds=now_ns // 1_000_000_000, nanos=now_ns % 1_000_000_000),
        request_id=request.request_id)


class BaselineQuotaLedger(qpb_grpc.QuotaLedgerServicer):
    async def Consume(self, request, context):  # noqa: N802
        return _response(request)

    async def ConsumeBatch(self, request, context):  # noqa: N802
        if request.view == qpb.CONSUME_BATCH_VIEW_COMPACT:  # every item OK, plan-covered
            n = len(request.requests)
            now = _response(qpb.ConsumeRequest())
            return qpb.ConsumeBatchResponse(compact=qpb.CompactResults(
                codes=[0] * n, billable=[True] * n, replayed=[False] * n, payg_units=[0] * n,
                payg_amount_micros=[0] * n, billing_day=now.billing_day,
                recorded_at=now.recorded_at))
        return qpb.ConsumeBatchResponse(results=[
            qpb.ConsumeResult(request_id=r.request_id, response=_response(r))
            for r in request.requests])

    async def ConsumeStream(self, request_iterator, context):  # noqa: N802
        async for r in request_iterator:
            yield qpb.ConsumeResult(request_id=r.request_id, response=_response(r))


SERVER_OPTIONS = [  # as server/app.py's
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
    ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
]


async def serve(listen: str, port_file: str | None) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    qpb_grpc.add_QuotaLedgerServicer_to_server(BaselineQuotaLedger(), server)
    port = server.add_insecure_port(listen)
    if not port:
        raise click.ClickException(f"cannot listen on {listen}")
    await server.start()
    if port_file:
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"grpc": port, "pid": os.getpid()}, f)
        os.replace(tmp, port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


@click.command()
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT")
@click.option("--port-file", default=None, metavar="PATH",
              help="Write {\"grpc\": port, \"pid\": pid} here once serving.")
@click.option("--cpus", default=None, metavar="CPUS",
              help="Run on these CPUs only (Linux; as the ledger's --front-cpus).")
def main(listen: str, port_file: str | None, cpus: str | None) -> None:
    """Serve the baseline QuotaLedger (answers only; records nothing)."""
    if cpus:
        try:
            confine_front(cpus)  # before gRPC starts a thread: the whole server
        except InvalidArgument as exc:
            raise click.ClickException(exc.message) from None
    asyncio.run(serve(listen, port_file))


if __name__ == "__main__":
    main()
