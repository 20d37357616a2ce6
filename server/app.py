"""Assemble and run the server: store, engine, writer, servicers, health and reflection."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from quota_ledger.v1 import (
    accounts_pb2,
    accounts_pb2_grpc,
    quota_ledger_pb2,
    quota_ledger_pb2_grpc,
    settlement_pb2,
    settlement_pb2_grpc,
    test_clock_pb2,
    test_clock_pb2_grpc,
)

from ledger import calendar as cal
from ledger import catalog as catalog_mod
from ledger.clock import SharedTestClock, SystemClock, TestClock
from ledger.engine import CLOCK_META_KEY, SETTLED_META_KEY, Engine
from ledger.errors import InvalidArgument, Unavailable
from ledger.store import open_store
from ledger.store.urls import is_pg_url, mask_url
from ledger.verify import ChainBroken, check_node_tail, check_tail
from ledger.writer import Writer, tune_gc

from . import notice_config
from .account_services import AccountsService
from .auth import Authorizer, is_loopback
from .config import ServerConfig
from .cpus import confine_front
from .metrics import Metrics
from .notice_delivery import Delivery
from .notice_queue import open_queue
from .services import (
    Context,
    QuotaLedgerService,
    SettlementService,
    TestClockService,
)

log = logging.getLogger("quota_ledger.server")

DEFAULT_DB = ServerConfig.db
MESSAGE_BYTES_MAX = 4 * 1024 * 1024
DRAIN_REFUSE_S = 0.3  # SIGTERM: how long new calls are refused UNAVAILABLE before grpc stops
SERVICE_NAMES = {
    "QuotaLedger": quota_ledger_pb2.DESCRIPTOR.services_by_name["QuotaLedger"].full_name,
    "Accounts": accounts_pb2.DESCRIPTOR.services_by_name["Accounts"].full_name,
    "Settlement": settlement_pb2.DESCRIPTOR.services_by_name["Settlement"].full_name,
    "TestClock": test_clock_pb2.DESCRIPTOR.services_by_name["TestClock"].full_name,
}


class StartupError(RuntimeError):
    """The server cannot start; the message says why, for a person."""


class LedgerServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.port = 0
        self.metrics_port = 0
        self.metrics = Metrics()
        self.server: grpc.aio.Server | None = None
        self.ctx: Context | None = None

    async def start(self) -> None:
        cfg = self.config
        self.auth = Authorizer.from_file(cfg.tokens)
        if not is_loopback(cfg.listen) and not (self.auth.enabled or cfg.tls_client_ca
                                                or cfg.insecure):
            raise StartupError(
                f"refusing to listen on {cfg.listen} without authentication: give --tokens "
                "(and TLS), or --tls-client-ca, or say --insecure explicitly")
        if bool(cfg.tls_cert) != bool(cfg.tls_key) or (cfg.tls_client_ca and not cfg.tls_cert):
            raise StartupError("TLS needs both --tls-cert and --tls-key (and they are needed "
                               "for --tls-client-ca)")
        try:
            self.notice_cfg = notice_config.load(cfg.notices, insecure=cfg.insecure)
        except InvalidArgument as exc:
            raise StartupError(exc.message) from None
        self.delivery: Delivery | None = None
        self.catalog = catalog_mod.load(cfg.catalog)
        # SQLite: raises DatabaseLocked for a second server; PostgreSQL: claims a node number
        try:
            self.store = open_store(cfg.db)
        except Unavailable as exc:  # PostgreSQL away: one clear line, the password masked
            raise StartupError(exc.message) from None
        try:
            try:
                if self.store.shared:
                    check_node_tail(self.store.conn, self.store.node)
                else:
                    check_tail(self.store.conn)
            except ChainBroken as exc:
                raise StartupError(f"refusing to serve a corrupted journal: {exc}; run "
                                   f"'quota-ledger verify --db {cfg.db}'") from exc
            self.clock = (SystemClock() if not cfg.test_clock
                          else SharedTestClock(self._db_clock_us) if self.store.shared
                          else TestClock())
            self.engine = Engine(self.store, self.clock, self.catalog)
            self.engine.notice_limits = self.notice_cfg.thresholds
            self.writer = Writer(self.engine, on_commit=self._on_commit,
                                 queue_depth_max=cfg.queue_depth_max,
                                 group_requests_max=cfg.group_requests_max)
            self.metrics.queue_depth.set_function(self.writer.depth)
            self.metrics.queue_limit.set(cfg.queue_depth_max)
            self.metrics.last_settled_end.set_function(self._last_settled_end_s)
            self.metrics.journal_rows.set_function(lambda: self.engine.next_seq - 1)
            self.engine.on_settled = self.metrics.on_settled
            self.metrics.watch_state(self._state_query, cfg.metrics_top_accounts)
            if self.store.shared:
                store, engine, stats = self.store, self.engine, self.writer.stats
                self.metrics.watch_contention(lambda: store.lock_wait_s, lambda: engine.reloads,
                                              lambda: stats.group_s)
            tune_gc()
            self.writer.start()
            if self.notice_cfg.endpoints:
                queue = open_queue(cfg.db)
                counters = self.metrics.watch_notices(queue.stats, time.time)
                self.delivery = Delivery(queue, self.notice_cfg, counters).start()
            else:  # the series exist on every node (at 0), so alerts read the same names
                self.metrics.watch_notices(lambda: (0, None), time.time)
            if cfg.metrics_listen:
                self.metrics_port = self.metrics.serve(cfg.metrics_listen)
            try:  # after the writer's thread started, before gRPC starts its own
                confine_front(cfg.front_cpus)
            except InvalidArgument as exc:
                raise StartupError(exc.message) from None
            await self._serve()
        except BaseException:
            self.store.close()
            raise

    async def _serve(self) -> None:
        cfg = self.config
        server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),  # TRAPS: a second server must not share the port
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
        ])
        ctx = self.ctx = Context(self.writer, self.clock, self.catalog, self.metrics, self.auth)
        ctx.notices = self.delivery.queue if self.delivery else None
        quota_ledger_pb2_grpc.add_QuotaLedgerServicer_to_server(QuotaLedgerService(ctx), server)
        accounts_pb2_grpc.add_AccountsServicer_to_server(AccountsService(ctx), server)
        settlement_pb2_grpc.add_SettlementServicer_to_server(SettlementService(ctx), server)
        names = [SERVICE_NAMES["QuotaLedger"], SERVICE_NAMES["Accounts"],
                 SERVICE_NAMES["Settlement"]]
        if cfg.test_clock:
            test_clock_pb2_grpc.add_TestClockServicer_to_server(TestClockService(ctx), server)
            names.append(SERVICE_NAMES["TestClock"])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        try:
            if cfg.tls_cert:
                self.port = server.add_secure_port(cfg.listen, self._credentials())
            else:
                self.port = server.add_insecure_port(cfg.listen)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {cfg.listen}: {exc}") from exc
        if not self.port:
            raise StartupError(f"cannot listen on {cfg.listen} (in use or not a local address)")
        await server.start()
        self.server = server
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.ready.set(1)
        log.info("serving", extra={"event": "start", "listen": cfg.listen, "port": self.port,
                                   "db": mask_url(cfg.db) if is_pg_url(cfg.db) else cfg.db,
                                   "node": getattr(self.store, "node", 0),
                                   "test_clock": cfg.test_clock,
                                   "auth": self.auth.enabled, "tls": bool(cfg.tls_cert)})

    def _state_query(self, sql: str, params: tuple) -> list:
        """For the metrics collector (its own thread): committed state, read-only. A None
        first parameter stands for the ledger's current time."""
        if params and params[0] is None:
            params = (self.clock.now_us(), *params[1:])
        return self.store.reader().execute(sql, params).fetchall()

    def _last_settled_end_s(self) -> float:
        """For the metrics (their own thread): the end of the last settled billing day as
        committed, unix seconds; before any settlement, the start of the ledger's first day
        (nothing before it to settle); NaN while the ledger is empty."""
        rows = self.store.reader().execute("SELECT value FROM meta WHERE key = ?",
                                           (SETTLED_META_KEY,)).fetchall()
        if rows:
            return cal.day_end(rows[0][0]) / cal.US_PER_SECOND
        first = self.engine.next_settle_day
        return cal.day_start(first) / cal.US_PER_SECOND if first else math.nan

    def _db_clock_us(self) -> int | None:
        """The shared test clock as the database holds it (several nodes, --test-clock)."""
        rows = self.store.reader().execute("SELECT value FROM meta WHERE key = ?",
                                           (CLOCK_META_KEY,)).fetchall()
        return int(rows[0][0]) if rows else None

    def _on_commit(self, requests: int, seconds: float) -> None:
        self.metrics.on_commit(requests, seconds)
        if seconds * 1_000 > self.config.slow_commit_ms:
            log.warning("slow commit", extra={"event": "slow_commit", "requests": requests,
                                              "commit_ms": round(seconds * 1_000, 3)})

    def _credentials(self) -> grpc.ServerCredentials:
        cfg = self.config
        assert cfg.tls_cert and cfg.tls_key
        key, cert = Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes()
        ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=ca is not None)

    async def stop(self) -> None:
        """Drain: health NOT_SERVING, new calls answered UNAVAILABLE (a client may retry on
        another node) while in-flight ones finish, then stop, commit, close. grpc's own
        shutdown answers CANCELLED to calls it has received but not yet handed over, which
        a client does not retry: refusing first leaves few of those (issue 9)."""
        log.info("draining", extra={"event": "drain", "grace_s": self.config.grace_s})
        if self.server is not None:
            deadline = time.monotonic() + self.config.grace_s
            self.metrics.ready.set(0)
            await self.health.enter_graceful_shutdown()
            if self.ctx is not None:
                self.ctx.draining = True
                await asyncio.sleep(min(DRAIN_REFUSE_S, self.config.grace_s))
            await self.server.stop(max(0.0, deadline - time.monotonic()))
            self.server = None
        if self.delivery is not None:
            self.delivery.stop()
            self.delivery.queue.close()
        self.writer.stop()
        self.store.close()
        log.info("stopped", extra={"event": "stop"})
