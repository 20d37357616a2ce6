"""The console's web application (Starlette on uvicorn) and how it is served.

One :class:`AsyncLedgerClient` per process, made inside the server's event loop (grpc.aio
channels belong to one loop). Every page is server-rendered HTML with autoescaping; the
response headers forbid scripts, framing and outside resources.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clients.client import AsyncLedgerClient

from . import formatting as fmt
from . import views
from .ledgerdata import Console, PageError

HERE = Path(__file__).resolve().parent
CONSOLE_TIMEOUT_S = 5.0  # per page call to the ledger, retries included
CONSOLE_RETRIES = 1
HTTP_CONNECTIONS_MAX = 64
HTTP_KEEPALIVE_S = 5
HTTP_HEADER_BYTES_MAX = 16 * 1024
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; style-src 'self' 'unsafe-inline'; "
                                 b"img-src 'self' data:; form-action 'self'; "
                                 b"frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
log = logging.getLogger("quota_ledger.console")


@dataclass
class ConsoleConfig:
    listen: str = "127.0.0.1:8080"
    target: str = "127.0.0.1:50051"
    token: str | None = field(default=None, repr=False)  # never printed
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    timeout_s: float = CONSOLE_TIMEOUT_S
    log_level: str = "info"
    insecure: bool = False  # non-loopback listener and any Host header allowed


def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(usd=fmt.usd, usd_exact=fmt.usd_exact, count=fmt.count,
                       instant=fmt.instant, day=fmt.day_label, region=fmt.region,
                       account_status=fmt.account_status, plan_status=fmt.plan_status,
                       validity=fmt.validity, path=lambda s: views.quote(s, safe=""))
    env.globals.update(field_instant=fmt.field_instant, REGIONS=fmt.REGIONS,
                       REGION_KEYS=fmt.REGION_KEYS, BILL_ITEMS=fmt.BILL_ITEM_LABELS)
    return env


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response, error pages included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RawPathRouting:
    """Routes on the path as sent, so an account id may hold any character, "/" included:
    ``/accounts/a%2Fb/bills`` names account ``a/b``. Views unquote their path parameters."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path") if scope["type"] == "http" else None
        if raw:
            scope = dict(scope, path=raw.decode("latin-1"))
        await self.app(scope, receive, send)


class LoopbackHostOnly:
    """Without --insecure, answers only requests addressed to a loopback name: a page on
    another site cannot read the console through DNS rebinding (the console has no login)."""

    def __init__(self, app: ASGIApp, listen_host: str) -> None:
        self.app = app
        bracketed = f"[{listen_host}]" if ":" in listen_host else listen_host
        self.allowed = {"127.0.0.1", "localhost", "[::1]", bracketed.lower()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            name = host[:host.find("]") + 1] if host.startswith("[") else host.partition(":")[0]
            if name.lower() not in self.allowed:
                await PlainTextResponse(f"421 this console answers only to {sorted(self.allowed)}"
                                        "\n", status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(config: ConsoleConfig) -> Starlette:
    env = templates()

    def render(request: Request, name: str, status: int, context: dict[str, Any]) -> Response:
        html = env.get_template(name).render(request_path=request.url.path, **context)
        return HTMLResponse(html, status_code=status)

    def error_page(request: Request, err: PageError) -> Response:
        return render(request, "error.html", err.status,
                      {"status": err.status, "title": err.title, "detail": err.detail})

    async def on_page_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PageError)
        return error_page(request, exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error_page(request, views.not_found(request.url.path))
        return error_page(request, PageError(exc.status_code, "Not possible here",
                                             "This read-only console serves GET pages only."
                                             if exc.status_code == 405 else str(exc.detail)))

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("console page failed: %s", request.url.path)
        return error_page(request, PageError(500, "Internal error", "The console failed to "
                                             "show this page; the details are in its log."))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = AsyncLedgerClient(config.target, timeout_s=config.timeout_s,
                                   retries=CONSOLE_RETRIES, token=config.token,
                                   tls_ca=config.tls_ca, tls_cert=config.tls_cert,
                                   tls_key=config.tls_key)
        app.state.console = Console(client, config.target, bool(config.token))
        try:
            yield
        finally:
            await client.close()

    routes = [
        Route("/", views.index, methods=["GET", "HEAD"]),
        Route("/go", views.go, methods=["GET", "HEAD"]),
        Route("/healthz", views.healthz, methods=["GET", "HEAD"]),
        Route("/accounts/{account_id}", views.account, methods=["GET", "HEAD"]),
        Route("/accounts/{account_id}/usage", views.usage, methods=["GET", "HEAD"]),
        Route("/accounts/{account_id}/usage.csv", views.usage_csv, methods=["GET", "HEAD"]),
        Route("/accounts/{account_id}/bills", views.bills, methods=["GET", "HEAD"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        PageError: on_page_error, HTTPException: on_http_error, Exception: on_crash})
    app.state.render = render
    return app


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65_535:
        raise ValueError(f"--listen must be HOST:PORT; got {listen!r}")
    return host, int(port)


def bind(listen: str) -> socket.socket:
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(HTTP_CONNECTIONS_MAX)
    return sock


def serve(config: ConsoleConfig, port_file: str | None = None) -> None:
    """Bind, say where, then serve until SIGINT or SIGTERM."""
    sock = bind(config.listen)
    port = sock.getsockname()[1]
    if port_file:
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"http": port, "pid": os.getpid()}, f)
        os.replace(tmp, port_file)
    host = split_listen(config.listen)[0]
    shown = f"[{host}]" if ":" in host else host
    print(f"quota-ledger console on http://{shown}:{port}/ (ledger {config.target})",
          file=sys.stderr, flush=True)
    app: ASGIApp = RawPathRouting(build_app(config))
    if not config.insecure:
        app = LoopbackHostOnly(app, host)
    app = SecurityHeaders(app)
    server = uvicorn.Server(uvicorn.Config(
        app, log_level=config.log_level, lifespan="on",
        proxy_headers=False, server_header=False, limit_concurrency=HTTP_CONNECTIONS_MAX,
        timeout_keep_alive=HTTP_KEEPALIVE_S, h11_max_incomplete_event_size=HTTP_HEADER_BYTES_MAX,
        access_log=config.log_level == "debug"))
    server.run(sockets=[sock])
